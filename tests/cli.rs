//! The command line: subcommands, help examples, outputs and exit codes.

mod common;

use std::process::{Command, Output};

use common::model;

fn mudsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(args)
        .output()
        .expect("run mudsc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn every_subcommand_has_an_example_in_its_help() {
    for sub in ["inspect", "run", "eval", "landscape"] {
        let o = mudsc(&[sub, "--help"]);
        assert!(o.status.success());
        assert!(
            stdout(&o).contains(&format!("mudsc {sub} ")),
            "{sub}: {}",
            stdout(&o)
        );
        assert!(stdout(&o).contains("Example"), "{sub}");
    }
}

#[test]
fn inspect_reports_the_model() {
    let p = model("convnet.onnx");
    let o = mudsc(&["inspect", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    for want in [
        "ir_version  8",
        "ai.onnx 17",
        "x float32 [N, 3, 8, 8]",
        "logits float32 [N, 5]",
        "Conv",
        "BatchNormalization",
    ] {
        assert!(s.contains(want), "missing '{want}' in:\n{s}");
    }
    // 432 conv + 4*16 BN + 80 fc parameters.
    assert!(s.contains("parameters  576 in 6 initializers"), "{s}");

    let o = mudsc(&["inspect", "--json", model("with_if.onnx").to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ops"]["If"], 1);
    assert_eq!(v["subgraphs"].as_array().unwrap().len(), 2);
}

#[test]
fn run_writes_outputs_matching_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.npz");
    for backend in ["tract", "ort"] {
        let o = mudsc(&[
            "run",
            model("two_inputs.onnx").to_str().unwrap(),
            "--input",
            model("two_inputs_input.npz").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--backend",
            backend,
        ]);
        assert!(o.status.success(), "{backend}: {}", stderr(&o));
        assert!(stdout(&o).contains("y: float32 [3, 4]"), "{}", stdout(&o));
        let got = mudsc::data::read_npz(&out).unwrap();
        let want =
            common::ort_python_outputs(&model("two_inputs.onnx"), &model("two_inputs_input.npz"));
        common::assert_close(got.get("y").unwrap(), want.get("y").unwrap(), backend);
    }
}

/// Exit codes of the command line itself; bad model and data files under every command are
/// the matrix of `tests/bad_inputs.rs`.
#[test]
fn cuda_device_runs_or_falls_back_to_the_cpu_with_a_warning() {
    let fixture = common::root().join("fixtures/models/mlp_a.onnx");
    let data = common::root().join("fixtures/data/test.npz");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            fixture.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ];
        args.extend_from_slice(extra);
        mudsc(&args)
    };
    let cpu = eval(&["--backend", "ort"]);
    assert!(cpu.status.success(), "{}", stderr(&cpu));
    for extra in [
        &["--backend", "ort", "--device", "cuda"][..],
        &["--device", "cuda:0"],
    ] {
        let o = eval(extra);
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        // Same predictions wherever it ran; without a usable GPU, a warning says so.
        assert_eq!(stdout(&o), stdout(&cpu), "{extra:?}");
        let gpu_library = std::env::var_os("ORT_DYLIB_PATH").is_some();
        if !gpu_library || extra[1] != "ort" {
            assert!(
                stderr(&o).contains("warning:") && stderr(&o).contains("CPU"),
                "{extra:?}: {}",
                stderr(&o)
            );
        }
    }
    let bad = eval(&["--device", "gpu"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("cpu, cuda or cuda:N"),
        "{}",
        stderr(&bad)
    );
}

#[test]
fn exit_codes() {
    // Bad usage: unknown flag → 2.
    assert_eq!(mudsc(&["run", "--bogus"]).status.code(), Some(2));
    // A repair batch that is neither a positive count nor `auto` → 2, saying what it takes.
    for bad in ["0", "lots"] {
        let o = mudsc(&[
            "merge",
            "a.onnx",
            "b.onnx",
            "-o",
            "m.onnx",
            "--repair-batch",
            bad,
        ]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(stderr(&o).contains("or auto"), "{}", stderr(&o));
    }
    // Input data that does not fit a two-input model → 2, naming the input.
    let o = mudsc(&[
        "run",
        model("two_inputs.onnx").to_str().unwrap(),
        "--input",
        model("mlp_input.npz").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("'a'"), "{}", stderr(&o));
}

#[test]
fn eval_prints_joint_and_per_task_accuracy() {
    // A labelled set for the 4-class MLP: labels = the ONNX Runtime argmax for half the rows,
    // a wrong class for the other half, so the expected accuracy is known independently.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("labelled.npz");
    let script = format!(
        r#"
import numpy as np, onnxruntime as ort
x = np.load('{inp}')['x']
s = ort.InferenceSession('{m}', providers=['CPUExecutionProvider'])
y = s.run(None, {{'x': x}})[0]
lab = y.argmax(1)
lab[5:] = (lab[5:] + 1) % 4
np.savez('{out}', x=x, labels=lab.astype(np.int64))
"#,
        inp = model("mlp_input.npz").display(),
        m = model("mlp.onnx").display(),
        out = data.display()
    );
    common::python(&["-c", &script]);
    let o = mudsc(&[
        "eval",
        model("mlp.onnx").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "0-1,2-3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["top1"]["correct"], 5);
    assert_eq!(v["top1"]["total"], 10);
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);

    let o = mudsc(&[
        "eval",
        model("mlp.onnx").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--labels",
        "nope",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("nope"));
}

/// The iterative loop takes a unit's earlier result when what it reads is what it read then,
/// instead of computing it again: the merged model is byte for byte the one of the loop that
/// recomputes every unit (`MUDSC_RECOMPUTE_ALL`), and the report counts the matchings taken
/// (21 on the BN ResNet; 34 on the packed-attention ViT, 4 when only the last result was
/// remembered: its reverted sweeps meet the best sweep's inputs again).
#[test]
fn unchanged_matchings_are_kept_with_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let calib = common::root().join("fixtures/data/calib.npz");
    for pair in ["resnet20_bn_folded", "vit_mha"] {
        let run = |recompute: bool| {
            let out = dir.path().join(format!("{pair}_{recompute}.onnx"));
            let report = dir.path().join(format!("{pair}_{recompute}.json"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_mudsc"));
            cmd.arg("merge")
                .arg(common::fixture(&format!("{pair}_a.onnx")))
                .arg(common::fixture(&format!("{pair}_b.onnx")))
                .arg("-o")
                .arg(&out)
                .arg("--calib")
                .arg(&calib)
                .arg("--backend")
                .arg("ort")
                .arg("--report")
                .arg(&report);
            if recompute {
                cmd.env("MUDSC_RECOMPUTE_ALL", "1");
            }
            let o = cmd.output().expect("run mudsc");
            assert!(o.status.success(), "{pair}: {}", stderr(&o));
            let r: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            (
                std::fs::read(&out).unwrap(),
                r["matchings_kept"].as_u64().unwrap(),
            )
        };
        let (kept_model, kept) = run(false);
        let (all_model, none) = run(true);
        assert!(kept > 0, "{pair}: no matching kept");
        assert_eq!(none, 0, "{pair}: kept matchings while recomputing all");
        assert!(kept_model == all_model, "{pair}: the merged models differ");
    }
}

/// `--patience` ends the loop earlier on the same course: with 1 the BN ResNet's loop stops at
/// its first sweep without a real improvement, and its sweep values are the first ones of the
/// default run's (patience 5), which goes on.
#[test]
fn patience_ends_the_same_loop_earlier() {
    let dir = tempfile::tempdir().unwrap();
    let run = |patience: Option<&str>| {
        let out = dir.path().join("m.onnx");
        let report = dir.path().join("r.json");
        let calib = common::calib_set();
        let mut extra = vec![
            "--calib",
            calib.to_str().unwrap(),
            "--backend",
            "ort",
            "--repair-samples",
            "0",
            "--report",
            report.to_str().unwrap(),
        ];
        if let Some(p) = patience {
            extra.extend(["--patience", p]);
        }
        let o = common::merge_cli(
            &common::fixture("resnet20_bn_folded_a.onnx"),
            &common::fixture("resnet20_bn_folded_b.onnx"),
            &out,
            &extra,
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        r["sweep_values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect::<Vec<f64>>()
    };
    let short = run(Some("1"));
    let long = run(None);
    assert!(
        short.len() < long.len(),
        "patience 1: {} sweeps, default: {}",
        short.len(),
        long.len()
    );
    assert_eq!(short, long[..short.len()].to_vec());
}

/// A `--max-memory` below what calibration or the matching cannot do without is said on
/// stderr, once each, and the merge still completes; the default budget (half the RAM) says
/// neither on a small pair.
#[test]
fn a_budget_the_merge_cannot_keep_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let calib = common::calib_set();
    let run = |extra: &[&str]| {
        let out = dir.path().join("m.onnx");
        let _ = std::fs::remove_file(&out);
        let mut args = vec!["--calib", calib.to_str().unwrap(), "--repair-samples", "0"];
        args.extend(extra);
        let o = common::merge_cli(
            &common::fixture("mlp_a.onnx"),
            &common::fixture("mlp_b.onnx"),
            &out,
            &args,
        );
        assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
        assert!(out.is_file(), "{extra:?}: no merged model");
        stderr(&o)
    };
    let tight = run(&["--max-memory", "1M"]);
    for floor in [
        "below what calibration holds",
        "below what the matching holds",
    ] {
        assert_eq!(tight.matches(floor).count(), 1, "{floor}: {tight}");
    }
    let roomy = run(&[]);
    assert!(!roomy.contains("--max-memory"), "{roomy}");
}
