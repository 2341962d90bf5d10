//! Shared helpers for the integration tests: reference models built by the Python `onnx`
//! package, the ONNX Runtime Python package as an independent reference, and comparisons.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mudsc::onnx::TensorData;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Directory of reference models built once per test binary by `tests/py/make_models.py`.
/// Python and its packages are installed by `scripts/setup.sh`; without them this panics with
/// the reason (a test that cannot check must fail, not pass silently).
pub fn models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mudsc-test-models-{}", std::process::id()));
        python(&[
            root().join("tests/py/make_models.py").to_str().unwrap(),
            dir.to_str().unwrap(),
        ]);
        dir
    })
}

pub fn model(name: &str) -> PathBuf {
    models().join(name)
}

/// The interpreter of the project's virtual environment, which `scripts/setup.sh` creates and
/// fills with the reference packages; `python3` from PATH when there is none (a checkout set
/// up by hand).
pub fn python_exe() -> PathBuf {
    let venv = root().join(".venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// Runs a Python script; panics with its stderr on failure.
pub fn python(args: &[&str]) {
    let out = Command::new(python_exe())
        .args(args)
        .output()
        .expect("python must be installed (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{} {:?} failed:\n{}",
        python_exe().display(),
        args,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Outputs of ONNX Runtime's Python package for `model` on `input_npz`.
pub fn ort_python_outputs(model: &Path, input_npz: &Path) -> mudsc::data::NamedArrays {
    let out = tempfile::Builder::new().suffix(".npz").tempfile().unwrap();
    python(&[
        root().join("tests/py/ort_run.py").to_str().unwrap(),
        model.to_str().unwrap(),
        input_npz.to_str().unwrap(),
        out.path().to_str().unwrap(),
    ]);
    mudsc::data::read_npz(out.path()).unwrap()
}

/// Largest |a-b| - (atol + rtol*|b|) over the elements; `<= 0` means within tolerance.
pub fn excess(a: &TensorData, b: &TensorData, rtol: f32, atol: f32) -> f32 {
    assert_eq!(a.shape(), b.shape(), "shapes differ");
    let (a, b) = (a.to_f32(), b.to_f32());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| {
            if x.is_nan() && y.is_nan() {
                f32::NEG_INFINITY
            } else {
                (x - y).abs() - (atol + rtol * y.abs())
            }
        })
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The project's tolerance for "same outputs": rtol 1e-4, atol 1e-5 (onnxsim's check).
pub fn assert_close(a: &TensorData, b: &TensorData, what: &str) {
    assert_within(a, b, 1e-4, 1e-5, what);
}

pub fn assert_within(a: &TensorData, b: &TensorData, rtol: f32, atol: f32, what: &str) {
    let e = excess(a, b, rtol, atol);
    assert!(e <= 0.0, "{what}: outside rtol {rtol} / atol {atol} by {e}");
}

/// Every `.onnx` file under `fixtures/` (trained pairs and the zoo), with its input npz when
/// there is one: `<dir>/<stem>.input.npz`, else the shared test set for the trained pairs.
pub fn fixture_models() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for dir in ["fixtures/models", "fixtures/zoo"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else {
            continue;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for p in paths {
            if p.extension().and_then(|e| e.to_str()) != Some("onnx") {
                continue;
            }
            let own = p.with_extension("input.npz");
            let input = if own.exists() {
                own
            } else {
                root().join("fixtures/data/calib.npz")
            };
            out.push((p, input));
        }
    }
    out
}

/// Directory of the per-rule models built once per test binary by
/// `tests/py/make_rule_models.py`, with their `expected.json`.
pub fn rule_models() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mudsc-rule-models-{}", std::process::id()));
        python(&[
            root()
                .join("tests/py/make_rule_models.py")
                .to_str()
                .unwrap(),
            dir.to_str().unwrap(),
        ]);
        dir
    })
}

/// The first `n` rows of every array (a smaller calibration set for slow checks).
pub fn head_rows(arrays: &[TensorData], n: usize) -> Vec<TensorData> {
    arrays
        .iter()
        .map(|t| t.slice_rows(0, n.min(t.shape()[0])))
        .collect()
}

/// A bundled trained model of `fixtures/models`.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// Runs the `mudsc` binary these tests were built with.
pub fn mudsc(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(args)
        .output()
        .unwrap()
}

/// Per-task mean accuracy (%) of a model over tasks 0-4 and 5-9 of the bundled test set, as
/// `mudsc eval` scores it.
pub fn task_mean(path: &Path) -> f64 {
    100.0 * eval_tasks(&[path], &[])["task_mean"].as_f64().unwrap()
}

/// `mudsc eval MODEL… --tasks 0-4,5-9 --json` on the bundled test set, followed by `extra`
/// (`--ensemble`): the JSON it prints.
pub fn eval_tasks(models: &[&Path], extra: &[&str]) -> serde_json::Value {
    let data = root().join("fixtures/data/test.npz");
    let mut args = vec!["eval"];
    args.extend(models.iter().map(|m| m.to_str().unwrap()));
    args.extend([
        "--data",
        data.to_str().unwrap(),
        "--tasks",
        "0-4,5-9",
        "--json",
    ]);
    args.extend(extra);
    let out = mudsc(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The bundled calibration set.
pub fn calib_set() -> PathBuf {
    root().join("fixtures/data/calib.npz")
}

/// Runs `mudsc merge A B -o OUT` followed by `extra`.
pub fn merge_cli(a: &Path, b: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "merge",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    mudsc(&args)
}

/// A copy of `model` with every discovered group randomly permuted: the same function with
/// other weights (the independent truth of the merge tests).
pub fn permuted_copy(model: &mudsc::onnx::Model, inputs: &[TensorData]) -> mudsc::onnx::Model {
    let shapes = mudsc::data::input_shapes(model, Some(inputs), &[], 1).unwrap();
    let shapes = mudsc::graph::infer_shapes(model, &shapes).unwrap();
    let d = mudsc::symmetry::discover(model, &shapes).unwrap();
    let a = mudsc::symmetry::permute::random_assignment(&d.structure, &d.leaves(), 99);
    mudsc::symmetry::check::permuted_model(model, &d, &a).unwrap()
}
