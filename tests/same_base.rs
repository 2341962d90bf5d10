//! Same-base merges (task arithmetic, TIES, DARE, SLERP, linear) on the bundled fine-tunes of
//! one base: identities between the methods (DARE keeping everything is task arithmetic; task
//! arithmetic at λ = 1/N is the average, whatever the base), the merged weights against an
//! average computed here from the input tensors, the merges' accuracy against the endpoints,
//! the kinship hint and warning, --align-first against mudsc-align, and bad input. TIES and
//! DARE are checked entry by entry against a numpy implementation in tests/python.

mod common;

use common::{calib_set, fixture, merge_cli, task_mean};

use std::collections::HashMap;

use mudsc::onnx::{self, Model, TensorData};
use mudsc::same_base::{merge, Combine, SameBaseOptions};

fn load(name: &str) -> Model {
    onnx::load(fixture(name)).unwrap()
}

/// The float initializers of a model, by name, in f64.
fn floats(m: &Model) -> HashMap<String, Vec<f64>> {
    m.graph()
        .initializer
        .iter()
        .filter(|t| t.data_type == Some(1))
        .filter_map(|t| {
            let d = TensorData::from_proto(t).ok()?;
            Some((
                t.name.clone()?,
                d.to_f32().iter().map(|&x| f64::from(x)).collect(),
            ))
        })
        .collect()
}

fn same_base(combine: Combine, lambda: f64, density: f64) -> Model {
    let (a, b, base) = (
        load("mlp_ft_a.onnx"),
        load("mlp_ft_b.onnx"),
        load("mlp_ft_base.onnx"),
    );
    let opts = SameBaseOptions {
        combine,
        lambda,
        density,
        ..Default::default()
    };
    merge(&[a, b], Some(&base), &opts).unwrap().0
}

fn bytes(m: &Model) -> Vec<Vec<u8>> {
    m.graph()
        .initializer
        .iter()
        .map(|t| TensorData::from_proto(t).unwrap().to_raw_bytes())
        .collect()
}

#[test]
fn dare_keeping_every_entry_is_task_arithmetic() {
    let ta = same_base(Combine::TaskArithmetic, 0.7, 1.0);
    assert_eq!(bytes(&same_base(Combine::DareLinear, 0.7, 1.0)), bytes(&ta));
    // And dropping changes it (the identity above is not vacuous).
    assert_ne!(bytes(&same_base(Combine::DareLinear, 0.7, 0.9)), bytes(&ta));
}

#[test]
fn task_arithmetic_at_one_over_n_is_the_average_computed_from_the_inputs() {
    let merged = floats(&same_base(Combine::TaskArithmetic, 0.5, 1.0));
    let linear = floats(&same_base(Combine::Linear, 1.0, 1.0));
    let (a, b) = (
        floats(&load("mlp_ft_a.onnx")),
        floats(&load("mlp_ft_b.onnx")),
    );
    let mut checked = 0;
    for (name, m) in &merged {
        let avg: Vec<f64> = a[name]
            .iter()
            .zip(&b[name])
            .map(|(x, y)| (x + y) / 2.0)
            .collect();
        for ((x, y), z) in m.iter().zip(&avg).zip(&linear[name]) {
            assert!(
                (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "{name}: {x} vs {y}"
            );
            assert!(
                (z - y).abs() <= 1e-6 * (1.0 + y.abs()),
                "{name}: linear {z} vs {y}"
            );
        }
        checked += m.len();
    }
    assert!(checked > 200_000, "{checked} entries");
}

/// Each fine-tune forgets the other task (task means about 70 %); a same-base merge keeps
/// both: every method's task mean must clear the better endpoint's by 5 points.
#[test]
fn every_same_base_method_keeps_both_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let endpoints = ["mlp_ft_a.onnx", "mlp_ft_b.onnx"].map(|m| task_mean(&fixture(m)));
    let best = endpoints[0].max(endpoints[1]);
    let (a, b, base) = (
        fixture("mlp_ft_a.onnx"),
        fixture("mlp_ft_b.onnx"),
        fixture("mlp_ft_base.onnx"),
    );
    for args in [
        vec!["--method", "linear"],
        vec!["--method", "slerp"],
        vec!["--method", "task-arithmetic", "--lambda", "0.5"],
        vec!["--method", "ties", "--density", "0.2", "--lambda", "0.7"],
        vec![
            "--method",
            "dare-linear",
            "--density",
            "0.5",
            "--lambda",
            "0.5",
        ],
    ] {
        let out = dir.path().join("m.onnx");
        let mut extra = args.to_vec();
        if args[1] != "linear" && args[1] != "slerp" {
            extra.extend(["--base", base.to_str().unwrap()]);
        }
        let run = merge_cli(&a, &b, &out, &extra);
        assert!(
            run.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let score = task_mean(&out);
        assert!(
            score > best + 5.0,
            "{args:?}: task mean {score:.1} vs endpoints {endpoints:?}"
        );
    }
}

/// Fine-tunes of one base correlate near 1 on the identity matching, models of different
/// inits near 0: `merge` says so in its report and on stderr, both ways.
#[test]
fn the_merge_tells_fine_tunes_from_different_inits() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_set();
    let out = dir.path().join("m.onnx");
    let report = dir.path().join("r.json");
    let correlation = |pair: &str| {
        let run = merge_cli(
            &fixture(&format!("{pair}_a.onnx")),
            &fixture(&format!("{pair}_b.onnx")),
            &out,
            &[
                "--calib",
                calib.to_str().unwrap(),
                "--method",
                "avg",
                "--repair-samples",
                "0",
                "--report",
                report.to_str().unwrap(),
            ],
        );
        assert!(run.status.success());
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        (r["identity_weight_correlation"].as_f64().unwrap(), stderr)
    };
    let (same, note) = correlation("mlp_ft");
    assert!(same > 0.8, "{same}");
    assert!(note.contains("fine-tuned from one base") && note.contains("--method ties"));
    let (different, quiet) = correlation("mlp");
    assert!(different.abs() < 0.1, "{different}");
    assert!(!quiet.contains("fine-tuned"));
    // A same-base method on models of different inits warns and points to --align-first.
    let run = merge_cli(
        &fixture("mlp_a.onnx"),
        &fixture("mlp_b.onnx"),
        &out,
        &["--method", "linear"],
    );
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("--align-first"), "{stderr}");
}

/// --align-first then a plain average is mudsc-align's merge: the same matchings, the same
/// averaged weights, and with statistics repair (on by default when --calib is given) the same
/// repaired weights.
#[test]
fn align_first_then_linear_is_mudsc_align() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_set();
    let (a, b) = (fixture("mlp_a.onnx"), fixture("mlp_b.onnx"));
    let run = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let mut args = vec!["--calib", calib.to_str().unwrap()];
        args.extend(extra);
        let r = merge_cli(&a, &b, &out, &args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        floats(&onnx::load(&out).unwrap())
    };
    let max_diff = |x: &HashMap<String, Vec<f64>>, y: &HashMap<String, Vec<f64>>| {
        x.iter()
            .flat_map(|(n, v)| v.iter().zip(&y[n]).map(|(p, q)| (p - q).abs()))
            .fold(0.0, f64::max)
    };
    let no_repair = ["--repair-samples", "0", "--output-fit", "0"];
    let aligned = run(
        "l.onnx",
        &[
            "--method",
            "linear",
            "--align-first",
            no_repair[0],
            no_repair[1],
        ],
    );
    let reference = run(
        "r.onnx",
        &[&["--method", "mudsc-align"][..], &no_repair].concat(),
    );
    let plain = run("p.onnx", &[&["--method", "avg"][..], &no_repair].concat());
    assert!(
        max_diff(&aligned, &reference) < 1e-6,
        "{}",
        max_diff(&aligned, &reference)
    );
    assert!(
        max_diff(&plain, &reference) > 1e-2,
        "the alignment moved nothing"
    );
    let repaired = run("lr.onnx", &["--method", "linear", "--align-first"]);
    // The same-base path repairs but does not refit the output layer (`merge::output_fit`).
    let reference = run("rr.onnx", &["--method", "mudsc-align", "--output-fit", "0"]);
    assert!(
        max_diff(&repaired, &reference) < 1e-5,
        "{}",
        max_diff(&repaired, &reference)
    );
    assert!(
        max_diff(&repaired, &aligned) > 1e-3,
        "repair changed nothing"
    );
}

#[test]
fn bad_same_base_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let (a, b) = (fixture("mlp_ft_a.onnx"), fixture("mlp_ft_b.onnx"));
    let try_merge = |extra: &[&str]| {
        let r = merge_cli(&a, &b, &out, extra);
        assert_eq!(r.status.code(), Some(2), "{extra:?}");
        assert!(!out.exists(), "{extra:?} left an output");
        String::from_utf8_lossy(&r.stderr).to_string()
    };
    assert!(try_merge(&["--method", "ties"]).contains("needs --base"));
    let base = fixture("mlp_ft_base.onnx");
    let base = base.to_str().unwrap();
    assert!(
        try_merge(&["--method", "ties", "--base", base, "--density", "0"]).contains("--density")
    );
    assert!(
        try_merge(&["--method", "linear", "--weights", "1,2,3"]).contains("3 weights for 2 models")
    );
    assert!(try_merge(&["--method", "mudsc-zip", "--base", base]).contains("same-base"));
    // A base of another width: the error names the tensor.
    let mut other = load("mlp_ft_base.onnx");
    let g = other.proto.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 1)
        .unwrap();
    let name = t.name.clone().unwrap();
    t.dims[0] += 1;
    let mut raw = t.raw_data.clone().unwrap().to_vec();
    raw.extend([0u8; 4]);
    t.raw_data = Some(raw.into());
    let wide = dir.path().join("wide_base.onnx");
    onnx::save(&other.proto, &wide, &Default::default()).unwrap();
    let message = try_merge(&["--method", "ties", "--base", wide.to_str().unwrap()]);
    assert!(message.contains(&name), "{message}");
    // A NaN in one fine-tune's weights.
    let mut nan = load("mlp_ft_b.onnx");
    let g = nan.proto.graph.as_mut().unwrap();
    let t = g
        .initializer
        .iter_mut()
        .find(|t| t.dims.len() == 2)
        .unwrap();
    let name = t.name.clone().unwrap();
    let mut raw = t.raw_data.clone().unwrap().to_vec();
    raw[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    t.raw_data = Some(raw.into());
    let bad = dir.path().join("nan.onnx");
    onnx::save(&nan.proto, &bad, &Default::default()).unwrap();
    let r = merge_cli(&a, &bad, &out, &["--method", "linear"]);
    assert_eq!(r.status.code(), Some(2));
    let message = String::from_utf8_lossy(&r.stderr);
    assert!(
        message.contains(&name) && message.contains("NaN"),
        "{message}"
    );
    assert!(!out.exists());
}

/// With --calib, a same-base merge is followed by statistics repair (identity matchings): on the
/// BN-folded ResNet fine-tunes it lifts the plain average (measured 88.2 → 90.2 % task mean).
#[test]
fn calibration_data_add_statistics_repair() {
    let dir = tempfile::tempdir().unwrap();
    let calib = calib_set();
    let (a, b) = (fixture("resnet20_ft_a.onnx"), fixture("resnet20_ft_b.onnx"));
    let merged = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let report = dir.path().join(format!("{name}.json"));
        let mut args = vec!["--method", "linear", "--report", report.to_str().unwrap()];
        args.extend(extra);
        let r = merge_cli(&a, &b, &out, &args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        (task_mean(&out), r["repaired_layers"].as_u64().unwrap())
    };
    let (plain, none) = merged("plain.onnx", &[]);
    let (repaired, layers) = merged("repaired.onnx", &["--calib", calib.to_str().unwrap()]);
    assert_eq!(none, 0);
    assert!(layers >= 19, "{layers} layers repaired");
    assert!(repaired > plain, "repair {repaired:.1} vs plain {plain:.1}");
}

/// `--card` for a same-base merge: the inputs with their sha256 (the base included), the
/// method's options, and the accuracy lines.
#[test]
fn a_same_base_merge_writes_its_card() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let card = dir.path().join("m.md");
    let (a, b, base) = (
        fixture("mlp_ft_a.onnx"),
        fixture("mlp_ft_b.onnx"),
        fixture("mlp_ft_base.onnx"),
    );
    let test_set = common::root().join("fixtures/data/test.npz");
    let r = merge_cli(
        &a,
        &b,
        &out,
        &[
            "--base",
            base.to_str().unwrap(),
            "--method",
            "ties",
            "--density",
            "0.5",
            "--card",
            card.to_str().unwrap(),
            "--eval-data",
            test_set.to_str().unwrap(),
            "--tasks",
            "0-4,5-9",
        ],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let text = std::fs::read_to_string(&card).unwrap();
    let base_sha = format!("{:x}", Sha256::digest(std::fs::read(&base).unwrap()));
    assert!(
        text.contains(&format!("| base | mlp_ft_base.onnx | `{base_sha}` |")),
        "{text}"
    );
    assert!(
        text.contains("**ties**") && text.contains("| density | 0.5 |"),
        "{text}"
    );
    assert!(
        text.contains("| m.onnx (merged) |") && text.contains("task mean"),
        "{text}"
    );
}
