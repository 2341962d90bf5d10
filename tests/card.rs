//! `merge --card`: the model card written beside the merged model, checked against independent
//! sources: sha256 computed here, the report the same run wrote, and `mudsc eval` run on its
//! own for the accuracy lines.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

fn mudsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(args)
        .output()
        .expect("run mudsc")
}

fn fixture(rel: &str) -> String {
    common::root()
        .join("fixtures")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

fn sha256(path: &str) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn percent(accuracy: &serde_json::Value) -> String {
    let (c, t) = (
        accuracy["correct"].as_f64().unwrap(),
        accuracy["total"].as_f64().unwrap(),
    );
    format!("{:.2} %", 100.0 * c / t)
}

#[test]
fn the_card_describes_the_merge_and_its_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.onnx");
    let (card, report) = (dir.path().join("merged.md"), dir.path().join("merge.json"));
    let (a, b) = (fixture("models/mlp_a.onnx"), fixture("models/mlp_b.onnx"));
    let (calib, test) = (fixture("data/calib.npz"), fixture("data/test.npz"));
    let o = mudsc(&[
        "merge",
        &a,
        &b,
        "-o",
        out.to_str().unwrap(),
        "--calib",
        &calib,
        "--card",
        card.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
        "--eval-data",
        &test,
        "--tasks",
        "0-4,5-9",
        "--seed",
        "3",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(&card).unwrap();
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();

    assert!(md.starts_with("# merged.onnx\n"), "{md}");
    for (name, path) in [
        ("mlp_a.onnx", &a),
        ("mlp_b.onnx", &b),
        ("calib.npz", &calib),
        ("test.npz", &test),
    ] {
        assert!(
            md.contains(&format!("{name} | `{}`", sha256(path)))
                || md.contains(&format!("{name} (`{}`)", sha256(path))),
            "{name} with its sha256 in:\n{md}"
        );
    }
    assert!(
        md.contains("| method | mudsc-zip |") && md.contains("| seed | 3 |"),
        "{md}"
    );
    assert!(md.contains("| calibration (1000 samples) |"), "{md}");
    let groups = report["groups"].as_array().unwrap();
    assert!(
        md.contains(&format!("{} groups merged", groups.len())),
        "{md}"
    );
    assert!(
        md.contains(&format!(
            "{} weight axes fixed",
            report["fixed_weight_axes"]
        )),
        "{md}"
    );
    for g in groups {
        assert!(
            md.contains(&format!(
                "| g{} | {} | {} |",
                g["id"],
                g["width"],
                g["kind"].as_str().unwrap()
            )),
            "{g} in:\n{md}"
        );
    }
    for phase in report["seconds"].as_object().unwrap().keys() {
        assert!(
            md.contains(&format!("| {phase} | ")),
            "phase {phase} in:\n{md}"
        );
    }

    // Accuracy lines: what `mudsc eval` says of each model, run on its own.
    for (path, name) in [
        (out.to_str().unwrap(), "merged.onnx (merged)"),
        (a.as_str(), "mlp_a.onnx"),
    ] {
        let o = mudsc(&[
            "eval", path, "--data", &test, "--tasks", "0-4,5-9", "--json",
        ]);
        assert!(o.status.success());
        let eval: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let line = format!(
            "| {name} | {} | {} | {} | {:.2} % |",
            percent(&eval["top1"]),
            percent(&eval["tasks"][0]["accuracy"]),
            percent(&eval["tasks"][1]["accuracy"]),
            100.0 * eval["task_mean"].as_f64().unwrap()
        );
        assert!(md.contains(&line), "{line} in:\n{md}");
        if name.ends_with("(merged)") {
            assert_eq!(
                report["accuracy"]["merged.onnx"]["top1"], eval["top1"],
                "{}",
                report["accuracy"]
            );
        }
    }
}

#[test]
fn a_card_that_cannot_be_written_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let calib = fixture("data/calib.npz");
    let (a, b) = (fixture("models/mlp_a.onnx"), fixture("models/mlp_b.onnx"));
    let merge = |card: &Path, extra: &[&str]| {
        let mut args = vec![
            "merge",
            &a,
            &b,
            "-o",
            out.to_str().unwrap(),
            "--calib",
            &calib,
            "--samples",
            "64",
            "--card",
            card.to_str().unwrap(),
        ];
        args.extend(extra);
        mudsc(&args)
    };
    // In a missing directory: refused before any work, named.
    let o = merge(&dir.path().join("missing/card.md"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing/card.md"));
    assert!(!out.exists());
    // The same file as the model: refused.
    let o = merge(&out, &[]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists());
    // Missing eval data is refused before the merge, named.
    let card = dir.path().join("card.md");
    let o = merge(
        &card,
        &["--eval-data", dir.path().join("none.npz").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("none.npz"));
    // Eval data without the labels fails after the merge: the model written before is removed.
    let test = fixture("data/test.npz");
    let o = merge(&card, &["--eval-data", &test, "--eval-labels", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!out.exists() && !card.exists());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(names.is_empty(), "{names:?}");
}
