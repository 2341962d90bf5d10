//! CI gates for exported graphs (docs/ci.md): `check --json` and `groups --expect` on the
//! bundled models, through the binary and through `scripts/ci-gate.sh`, which the workflow in
//! docs/ci.md runs. The committed specs (`tests/specs/`) are the independent truth: they were
//! written by `groups --json` and reviewed; edited copies must fail, naming what changed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn mudsc(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(args)
        .output()
        .expect("run mudsc")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn fixture(name: &str) -> String {
    common::root()
        .join("fixtures/models")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn spec(name: &str) -> Value {
    let path = common::root().join("tests/specs").join(name);
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, doc: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(doc).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

/// `groups MODEL --expect SPEC`: exit code and stdout.
fn expect(model: &str, spec: &str) -> (i32, String) {
    let o = mudsc(&["groups", model, "--expect", spec]);
    let (out, err) = text(&o);
    (o.status.code().unwrap_or(-1), format!("{out}{err}"))
}

#[test]
fn check_json_is_the_verdict_with_its_numbers() {
    let o = mudsc(&["check", &fixture("mlp_a.onnx"), "--json", "--trials", "2"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let doc: Value = serde_json::from_str(&out).expect("stdout is one JSON document");
    assert_eq!(doc["format"], "mudsc-check/1");
    assert_eq!(doc["verdict"], "pass");
    assert_eq!(doc["passed"], true);
    assert_eq!(
        doc["groups"],
        spec("mlp.groups.json")["groups"].as_array().unwrap().len()
    );
    assert_eq!(doc["atol"].as_f64().unwrap() as f32, 1e-5);
    let tolerance = doc["tolerance"].as_f64().unwrap();
    let trials = doc["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2);
    for t in trials {
        assert!(t["max_abs_diff"].as_f64().unwrap() <= tolerance, "{t}");
        assert_eq!(t["passed"], true);
    }
    // The negative control is what makes "pass" mean something: far beyond the tolerance.
    assert!(doc["control"]["max_abs_diff"].as_f64().unwrap() > 100.0 * tolerance);
    // Bad input is exit 2 with the file named, and no JSON on stdout.
    let o = mudsc(&["check", "/nonexistent/model.onnx", "--json"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        out.is_empty() && err.contains("/nonexistent/model.onnx"),
        "{err}"
    );
}

#[test]
fn groups_match_the_committed_specs_up_to_numbering() {
    let dir = tempfile::tempdir().unwrap();
    for (model, name) in [
        ("mlp_a.onnx", "mlp.groups.json"),
        ("mlp_b.onnx", "mlp.groups.json"),
        ("vit_a.onnx", "vit.groups.json"),
    ] {
        let committed = common::root().join("tests/specs").join(name);
        let (code, out) = expect(&fixture(model), committed.to_str().unwrap());
        assert_eq!(code, 0, "{model}: {out}");
        assert!(out.contains("match"), "{out}");
        // Renumbered and reordered: still the same structure.
        let mut doc = spec(name);
        let groups = doc["groups"].as_array_mut().unwrap();
        groups.reverse();
        let n = groups.len();
        for (i, g) in groups.iter_mut().enumerate() {
            g["id"] = Value::from(100 + (i * 7) % n);
        }
        let (code, out) = expect(&fixture(model), &write(dir.path(), "renumbered.json", &doc));
        assert_eq!(code, 0, "{model} renumbered: {out}");
    }
}

#[test]
fn an_edited_spec_fails_naming_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let mlp = fixture("mlp_a.onnx");
    let original = spec("mlp.groups.json");
    let group = |doc: &Value, i: usize| doc["groups"][i].clone();

    // A group dropped from the spec: the model has a group the spec lacks, named with its axes.
    let mut doc = original.clone();
    let dropped = doc["groups"].as_array_mut().unwrap().remove(1);
    let (code, out) = expect(&mlp, &write(dir.path(), "dropped.json", &doc));
    assert_eq!(code, 1, "{out}");
    let first = dropped["members"][0]["tensor"].as_str().unwrap();
    assert!(
        out.contains(&format!("group appeared: g{}", dropped["id"])),
        "{out}"
    );
    assert!(out.contains(first), "{out}");
    assert!(out.contains("1 difference(s)"), "{out}");

    // A group the model does not have any more: vanished.
    let mut doc = original.clone();
    let mut extra = group(&original, 0);
    extra["id"] = Value::from(9);
    extra["members"] =
        serde_json::json!([{"tensor": "old.weight", "axis": 0, "size": 8, "layout": "g9"}]);
    doc["groups"].as_array_mut().unwrap().push(extra);
    let (code, out) = expect(&mlp, &write(dir.path(), "extra.json", &doc));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("group vanished: spec g9 (width 256: old.weight[axis 0])"),
        "{out}"
    );

    // A width changed.
    let mut doc = original.clone();
    doc["groups"][0]["width"] = Value::from(128);
    let (code, out) = expect(&mlp, &write(dir.path(), "width.json", &doc));
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("width changed: spec g0 → g0: 128 → 256"),
        "{out}"
    );

    // A weight axis moved from one group to another.
    let mut doc = original.clone();
    let moved = doc["groups"][0]["members"]
        .as_array_mut()
        .unwrap()
        .pop()
        .unwrap();
    doc["groups"][1]["members"]
        .as_array_mut()
        .unwrap()
        .push(moved.clone());
    let (code, out) = expect(&mlp, &write(dir.path(), "moved.json", &doc));
    assert_eq!(code, 1, "{out}");
    let axis = format!(
        "{}[axis {}]",
        moved["tensor"].as_str().unwrap(),
        moved["axis"]
    );
    assert!(
        out.contains(&format!("moved: {axis} from spec g1 to g0")),
        "{out}"
    );

    // Block structure: attention heads turned into a plain group.
    let mut doc = spec("vit.groups.json");
    let g = doc["groups"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|g| g["kind"] == "blocked")
        .unwrap();
    let id = g["id"].clone();
    g["kind"] = Value::from("plain");
    g.as_object_mut().unwrap().remove("blocks");
    let (code, out) = expect(
        &fixture("vit_a.onnx"),
        &write(dir.path(), "blocks.json", &doc),
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!(
            "blocks changed: spec g{id} → g{id}: plain → 4 blocks × 16"
        )),
        "{out}"
    );

    // Not a spec: bad input, exit 2, the file named.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{\"format\": \"something-else\", \"groups\": []}").unwrap();
    let (code, out) = expect(&mlp, bad.to_str().unwrap());
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("bad.json") && out.contains("mudsc-groups/1"),
        "{out}"
    );
}

/// The shell version of docs/ci.md's gate, as the workflow runs it.
#[test]
fn the_documented_gate_script_passes_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let gate = |spec: &str, out: &PathBuf| {
        Command::new("bash")
            .arg(common::root().join("scripts/ci-gate.sh"))
            .args([
                &fixture("mlp_a.onnx"),
                spec,
                out.to_str().unwrap(),
                "--trials",
                "1",
            ])
            .env("MUDSC", env!("CARGO_BIN_EXE_mudsc"))
            .output()
            .unwrap()
    };
    let committed = common::root().join("tests/specs/mlp.groups.json");
    let out = dir.path().join("pass");
    let o = gate(committed.to_str().unwrap(), &out);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let check: Value =
        serde_json::from_slice(&std::fs::read(out.join("check.json")).unwrap()).unwrap();
    assert_eq!(check["verdict"], "pass");
    let groups: Value =
        serde_json::from_slice(&std::fs::read(out.join("groups.json")).unwrap()).unwrap();
    assert_eq!(groups["groups"], spec("mlp.groups.json")["groups"]);

    let mut doc = spec("mlp.groups.json");
    doc["groups"].as_array_mut().unwrap().remove(0);
    let out = dir.path().join("fail");
    let o = gate(&write(dir.path(), "dropped.json", &doc), &out);
    assert_eq!(o.status.code(), Some(1), "{:?}", text(&o));
    let diff = std::fs::read_to_string(out.join("groups-diff.txt")).unwrap();
    assert!(diff.contains("group appeared: g0"), "{diff}");
}
