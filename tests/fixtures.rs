//! The bundled fixtures: every file listed in the manifest is present with its recorded
//! sha256, and `mudsc eval` reproduces each model's recorded accuracy within one point.

mod common;

use std::process::Command;

use sha2::{Digest, Sha256};

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(common::root().join("fixtures/manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_file_matches_its_recorded_sha256() {
    let m = manifest();
    let files = m["files"].as_object().expect("manifest lists files");
    assert!(files.len() >= 40);
    for (path, info) in files {
        let bytes = std::fs::read(common::root().join("fixtures").join(path)).unwrap();
        let digest = format!("{:x}", Sha256::digest(&bytes));
        let want = info["sha256"].as_str().or(info.as_str()).unwrap();
        assert_eq!(digest, want, "{path}");
    }
}

#[test]
fn eval_reproduces_recorded_accuracy() {
    let m = manifest();
    let data = common::root().join("fixtures/data/test.npz");
    for (name, info) in m["models"].as_object().unwrap() {
        let classes = info["task_classes"].as_array().unwrap();
        let (first, last) = (
            classes[0].as_u64().unwrap(),
            classes[classes.len() - 1].as_u64().unwrap(),
        );
        let task = format!("{first}-{last}");
        let model = common::root()
            .join("fixtures")
            .join(info["file"].as_str().unwrap());
        let mut args = vec![
            "eval".to_string(),
            model.display().to_string(),
            "--data".into(),
            data.display().to_string(),
            "--json".into(),
        ];
        let shared = info["output"] == "shared";
        if shared {
            args.extend(["--tasks".into(), task.clone()]);
        } else {
            args.extend(["--classes".into(), task.clone()]);
        }
        let out = Command::new(env!("CARGO_BIN_EXE_mudsc"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let own = if shared {
            r["tasks"][0]["accuracy"].clone()
        } else {
            r["top1"].clone()
        };
        let own = own["correct"].as_f64().unwrap() / own["total"].as_f64().unwrap();
        let recorded = info["own_task_acc"].as_f64().unwrap();
        assert!(
            (own - recorded).abs() <= 0.01,
            "{name}: own-task {own} vs recorded {recorded}"
        );
        if shared {
            let joint =
                r["top1"]["correct"].as_f64().unwrap() / r["top1"]["total"].as_f64().unwrap();
            let recorded = info["joint_acc"].as_f64().unwrap();
            assert!(
                (joint - recorded).abs() <= 0.01,
                "{name}: joint {joint} vs recorded {recorded}"
            );
        }
    }
}
