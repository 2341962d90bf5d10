//! The bad-input matrix, driven through the real binary: every kind of unreadable, mismatched or
//! odd model and data file, under every command that reads it. A refusal must exit with the
//! right code (2 for the input's fault, 1 for a failure of the work itself), say what is wrong
//! and name the file, op or tensor it is about, never panic, leave nothing (no output, no
//! temporary file) in the output directory, and leave the inputs byte for byte as they were.
//! Inputs that are odd but legitimate (NaN calibration data, constant units, ops without a
//! symmetry rule, subgraphs) must merge, conservatively, and say so in the report.
//!
//! The models and data are built by `tests/py/make_bad_inputs.py` (see its docstring).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mudsc::onnx::{self, TensorData};

/// The matrix's input files, built once per test binary: the Python-made models and data, and
/// the broken files made here.
fn inputs() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mudsc-bad-inputs-{}", std::process::id()));
        let script = common::root().join("tests/py/make_bad_inputs.py");
        common::python(&[script.to_str().unwrap(), dir.to_str().unwrap()]);
        let write = |name: &str, bytes: &[u8]| std::fs::write(dir.join(name), bytes).unwrap();
        // Bytes that decode as no protobuf message (a deterministic LCG stream).
        let mut state = 0x2545_f491_u32;
        let garbage: Vec<u8> = (0..4096)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        write("garbage.onnx", &garbage);
        write("garbage.npz", &garbage);
        write("empty.onnx", b"");
        let a = std::fs::read(dir.join("a.onnx")).unwrap();
        write("truncated.onnx", &a[..a.len() / 2]);
        let calib = std::fs::read(dir.join("calib.npz")).unwrap();
        write("truncated.npz", &calib[..calib.len() / 2]);
        // The external-data model without its data file, in a directory of its own.
        std::fs::create_dir_all(dir.join("no_weights")).unwrap();
        std::fs::copy(dir.join("ext_a.onnx"), dir.join("no_weights/ext_a.onnx")).unwrap();
        std::fs::create_dir_all(dir.join("directory.onnx")).unwrap();
        dir
    })
}

fn input(name: &str) -> String {
    inputs().join(name).to_str().unwrap().to_string()
}

/// Every file under `dir`, with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// The output directory (`OUT` in the arguments); dropped with the run.
    out: tempfile::TempDir,
}

impl Run {
    fn out(&self, name: &str) -> PathBuf {
        self.out.path().join(name)
    }
}

/// Runs `mudsc` with `args`, where `OUT/` stands for a fresh, empty output directory.
fn mudsc<S: AsRef<str>>(args: &[S]) -> Run {
    let out = tempfile::tempdir().unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.as_ref()
                .replace("OUT/", &format!("{}/", out.path().display()))
        })
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(&args)
        .output()
        .unwrap();
    Run {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        out,
    }
}

/// Asserts that `args` are refused with `code`, a message holding every `needle`, no panic,
/// nothing left in the output directory and the inputs unchanged.
fn assert_refused<S: AsRef<str>>(args: &[S], code: i32, needles: &[&str]) {
    let before = snapshot(inputs());
    let run = mudsc(args);
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let what = format!("mudsc {}\nstderr: {}", args.join(" "), run.stderr);
    assert_eq!(run.code, Some(code), "{what}");
    assert!(!run.stderr.contains("panicked"), "{what}");
    assert!(run.stderr.starts_with("error: "), "{what}");
    for needle in needles {
        assert!(run.stderr.contains(needle), "no '{needle}' in: {what}");
    }
    let left = snapshot(run.out.path());
    assert!(left.is_empty(), "{what}\nleft behind: {:?}", left.keys());
    assert!(snapshot(inputs()) == before, "{what}\nthe inputs changed");
}

/// Runs `args`, which must succeed, and returns the run and its report (`OUT/r.json`).
fn assert_merges(args: &[&str]) -> (Run, serde_json::Value) {
    let before = snapshot(inputs());
    let mut all = args.to_vec();
    all.extend(["-o", "OUT/m.onnx", "--report", "OUT/r.json"]);
    let run = mudsc(&all);
    assert_eq!(
        run.code,
        Some(0),
        "mudsc {}\nstderr: {}",
        all.join(" "),
        run.stderr
    );
    assert!(snapshot(inputs()) == before, "the inputs changed");
    let report = serde_json::from_slice(&std::fs::read(run.out("r.json")).unwrap()).unwrap();
    (run, report)
}

fn initializers(path: &Path) -> BTreeMap<String, TensorData> {
    let m = onnx::load(path).unwrap();
    m.graph()
        .initializer
        .iter()
        .map(|t| (t.name.clone().unwrap(), TensorData::from_proto(t).unwrap()))
        .collect()
}

fn assert_all_finite(path: &Path) {
    for (name, t) in initializers(path) {
        assert!(
            t.to_f32().iter().all(|v| v.is_finite()),
            "{}: '{name}' has non-finite values",
            path.display()
        );
    }
}

/// Model files that cannot be read, under every command that reads a model, in every position.
#[test]
fn unreadable_models_are_refused_by_every_command() {
    let no_weights = input("no_weights/ext_a.onnx");
    let missing = input("nope.onnx");
    let cases: [(&str, &[&str]); 6] = [
        (
            &input("garbage.onnx"),
            &["not a valid ONNX model", "truncated"],
        ),
        (&input("empty.onnx"), &["not a valid ONNX model", "empty"]),
        (
            &input("truncated.onnx"),
            &["not a valid ONNX model", "truncated"],
        ),
        (&no_weights, &["external data", "ext_a.weights", "missing"]),
        (&missing, &["No such file"]),
        (&input("directory.onnx"), &["is a directory"]),
    ];
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    for (bad, reasons) in cases {
        let file = Path::new(bad).file_name().unwrap().to_str().unwrap();
        let mut needles = reasons.to_vec();
        needles.push(file);
        let merge = |x: &str, y: &str| {
            vec![
                "merge",
                x,
                y,
                "-o",
                "OUT/m.onnx",
                "--calib",
                &calib,
                "--report",
                "OUT/r.json",
            ]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
        };
        let commands: Vec<Vec<String>> = vec![
            merge(bad, &b),
            merge(&a, bad),
            ["run", bad, "--input", &calib, "--output", "OUT/y.npz"]
                .map(String::from)
                .to_vec(),
            ["eval", &a, bad, "--data", &calib]
                .map(String::from)
                .to_vec(),
            ["inspect", bad].map(String::from).to_vec(),
            ["groups", bad].map(String::from).to_vec(),
            ["check", bad, "--data", &calib].map(String::from).to_vec(),
        ];
        for args in &commands {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_refused(&args, 2, &needles);
        }
    }
}

/// Graphs that are well-formed protobuf but not a valid network: refused by our own checks
/// before an inference engine sees them (tract panics or loops on the first two).
#[test]
fn malformed_graphs_are_refused_by_every_command() {
    let (a, calib) = (input("a.onnx"), input("calib.npz"));
    for (name, needles) in [
        (
            "dangling_output.onnx",
            &["graph output 'ghost' is produced by no node"][..],
        ),
        (
            "bad_perm.onnx",
            &[
                "node 'twist' (Transpose)",
                "perm [1, 1] is not a permutation",
            ][..],
        ),
        ("cycle.onnx", &["the graph has a cycle"][..]),
    ] {
        let bad = input(name);
        let mut needles = needles.to_vec();
        needles.push(name);
        for args in [
            vec!["merge", &bad, &a, "-o", "OUT/m.onnx", "--calib", &calib],
            vec!["run", &bad, "--input", &calib, "--output", "OUT/y.npz"],
            vec!["groups", &bad],
            vec!["inspect", &bad],
        ] {
            assert_refused(&args, 2, &needles);
        }
    }
}

/// Data files that cannot be read or do not fit the model, under merge, run and eval.
#[test]
fn data_that_does_not_fit_is_refused_by_every_command() {
    let cases: [(&str, &[&str]); 8] = [
        ("garbage.npz", &["not a readable .npz file"]),
        ("truncated.npz", &["not a readable .npz file"]),
        ("nope.npz", &["no such file"]),
        (
            "shape.npz",
            &["input 'x' must have shape [N, 8], the data has [64, 3]"],
        ),
        (
            "f64.npz",
            &["input 'x' must be float32, the data holds float64"],
        ),
        (
            "int.npz",
            &["input 'x' must be float32, the data holds int64"],
        ),
        ("empty.npz", &["input 'x' holds no samples"]),
        ("directory.onnx", &["no input_K.pb files"]),
    ];
    let (a, b) = (input("a.onnx"), input("b.onnx"));
    for (name, reasons) in cases {
        let data = input(name);
        let mut needles = reasons.to_vec();
        needles.push(name);
        for args in [
            vec!["merge", &a, &b, "-o", "OUT/m.onnx", "--calib", &data],
            vec!["run", &a, "--input", &data, "--output", "OUT/y.npz"],
            vec!["eval", &a, "--data", &data],
            vec!["check", &a, "--data", &data],
        ] {
            assert_refused(&args, 2, &needles);
        }
    }
    // Labels that do not match the samples.
    assert_refused(
        &["eval", &a, "--data", &input("few_labels.npz")],
        2,
        &["few_labels.npz", "10 labels under 'labels' for 64 samples"],
    );
    // Heads of different widths cannot be summed.
    assert_refused(
        &[
            "eval",
            &a,
            &input("classes5_b.onnx"),
            "--data",
            &input("calib.npz"),
            "--ensemble",
        ],
        2,
        &["--ensemble", "classes5_b.onnx gives 5"],
    );
    // More samples asked for than there are is fine; none is not.
    assert_refused(
        &[
            "merge",
            &a,
            &b,
            "-o",
            "OUT/m.onnx",
            "--calib",
            &input("calib.npz"),
            "--samples",
            "0",
        ],
        2,
        &["--samples"],
    );
}

/// Models that are not the same network: the first difference is named.
#[test]
fn models_of_different_architectures_or_opsets_are_refused() {
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    for (other, needles) in [
        (
            input("wide_b.onnx"),
            &[
                "wide_b.onnx",
                "differ in structure at node 'fc1'",
                "[16, 8]",
                "[12, 8]",
            ][..],
        ),
        (
            input("opset13_b.onnx"),
            &["opset13_b.onnx", "opset imports differ", "13"][..],
        ),
        (
            input("unknown_b.onnx"),
            &["unknown_b.onnx", "node 'relu2'", "op Relu vs Atan"][..],
        ),
    ] {
        assert_refused(
            &["merge", &a, &other, "-o", "OUT/m.onnx", "--calib", &calib],
            2,
            needles,
        );
        // As the third of three models too.
        assert_refused(
            &[
                "merge",
                &a,
                &b,
                &other,
                "-o",
                "OUT/m.onnx",
                "--calib",
                &calib,
            ],
            2,
            needles,
        );
    }
}

/// Outputs: never over an input, never a report over the model, nothing left on a refusal.
#[test]
fn outputs_never_overwrite_inputs_or_linger() {
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    let merge = |extra: &[&str]| {
        let mut args: Vec<String> = vec!["merge".into(), a.clone(), b.clone(), "--calib".into()];
        args.push(calib.clone());
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    for target in [&a, &b, &calib] {
        assert_refused(
            &merge(&["-o", target]),
            2,
            &["refusing to overwrite input file"],
        );
        // A report over an input is refused before any work, so no merged model is left.
        assert_refused(
            &merge(&["-o", "OUT/m.onnx", "--report", target]),
            2,
            &["refusing to overwrite input file"],
        );
    }
    assert_refused(
        &merge(&["-o", "OUT/m.onnx", "--report", "OUT/m.onnx"]),
        2,
        &["--report", "is the output model's path"],
    );
    // The external data file beside the output must not be an input either.
    let over = input("ext_x.onnx");
    assert_refused(
        &[
            "merge",
            &input("ext_x_a.onnx"),
            &b,
            "-o",
            &over,
            "--calib",
            &calib,
            "--external-data",
        ],
        2,
        &["refusing to overwrite input file", "ext_x.onnx.data"],
    );
    // An output directory that does not exist is the user's mistake.
    assert_refused(
        &merge(&["-o", "OUT/no/such/dir/m.onnx"]),
        2,
        &["no/such/dir/m.onnx"],
    );
    assert_refused(
        &["run", &a, "--input", &calib, "--output", &calib],
        2,
        &["refusing to overwrite input file"],
    );
    // Bad usage.
    assert_refused(
        &merge(&["-o", "OUT/m.onnx", "--alpha", "1.5"]),
        2,
        &["--alpha 1.5"],
    );
    assert_refused(
        &["merge", &a, "-o", "OUT/m.onnx", "--calib", &calib],
        2,
        &["required"],
    );
}

/// NaN and ±inf calibration samples are accepted, and the merged weights stay finite.
#[test]
fn nan_and_inf_calibration_data_merge_to_finite_weights() {
    for method in ["mudsc-zip", "mudsc-align", "zipit", "act-align"] {
        let (run, report) = assert_merges(&[
            "merge",
            &input("a.onnx"),
            &input("b.onnx"),
            "--calib",
            &input("nan.npz"),
            "--method",
            method,
        ]);
        assert_all_finite(&run.out("m.onnx"));
        assert_eq!(report["calibration_samples"], 64, "{method}");
        // The merged model still computes finite outputs on clean data.
        let y = mudsc(&[
            "run",
            run.out("m.onnx").to_str().unwrap(),
            "--input",
            &input("calib.npz"),
        ]);
        assert_eq!(y.code, Some(0), "{}", y.stderr);
        assert!(!y.stdout.contains("NaN/inf"), "{method}: {}", y.stdout);
    }
}

/// Units that are constant on every input (dead after Relu, or stuck) have no correlation to
/// match by: the merge goes through with finite weights.
#[test]
fn constant_units_merge_to_finite_weights() {
    for method in ["mudsc-zip", "mudsc-align", "zipit", "act-align", "rebasin"] {
        let (run, report) = assert_merges(&[
            "merge",
            &input("dead_a.onnx"),
            &input("dead_b.onnx"),
            "--calib",
            &input("calib.npz"),
            "--method",
            method,
        ]);
        assert_all_finite(&run.out("m.onnx"));
        assert_eq!(report["groups"].as_array().unwrap().len(), 2, "{method}");
        for g in report["groups"].as_array().unwrap() {
            let v = g["merge_value"].as_f64().unwrap();
            assert!(v.is_finite(), "{method}: {g}");
        }
    }
}

/// The average of a tensor over the two models, as the merge writes it when its axes stay put.
fn mean_of(a: &Path, b: &Path, name: &str) -> Vec<f32> {
    let (a, b) = (initializers(a), initializers(b));
    a[name]
        .to_f32()
        .iter()
        .zip(b[name].to_f32().iter())
        .map(|(x, y)| (x + y) / 2.0)
        .collect()
}

fn close(x: &[f32], y: &[f32]) -> bool {
    x.len() == y.len() && x.iter().zip(y).all(|(p, q)| (p - q).abs() <= 1e-6)
}

/// An op without a symmetry rule (an ONNX op, a custom-domain op, If and Loop with their
/// subgraphs) keeps every unit it touches in place: the layer feeding it is merged by plain
/// averaging, the rest of the network is still permuted, and the report lists the op.
#[test]
fn ops_without_a_rule_keep_their_units_in_place() {
    let cases = [
        ("unknown", "Atan", None),
        ("custom", "com.microsoft::FastGelu", None),
        ("if", "If", None),
        ("loop", "Loop", Some("ort")),
    ];
    // Control: with Relu there, the second layer's units are matched, hence permuted.
    let (a, b) = (inputs().join("a.onnx"), inputs().join("b.onnx"));
    let args = |a: &Path, b: &Path, backend: Option<&'static str>| {
        let mut v = vec![
            "merge".to_string(),
            a.display().to_string(),
            b.display().to_string(),
            "--calib".into(),
            input("calib.npz"),
            "--repair-samples".into(),
            "0".into(),
        ];
        if let Some(k) = backend {
            v.extend(["--backend".into(), k.into()]);
        }
        v
    };
    let run_merge = |v: Vec<String>| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        assert_merges(&v)
    };
    let (run, report) = run_merge(args(&a, &b, None));
    assert_eq!(report["groups"].as_array().unwrap().len(), 2);
    assert_eq!(report["unknown_ops"], serde_json::json!({}));
    let merged = initializers(&run.out("m.onnx"));
    assert!(
        !close(
            &merged["b2"].to_f32().iter().copied().collect::<Vec<_>>(),
            &mean_of(&a, &b, "b2")
        ),
        "control: the second layer was not permuted"
    );

    for (stem, op, backend) in cases {
        let (a, b) = (
            inputs().join(format!("{stem}_a.onnx")),
            inputs().join(format!("{stem}_b.onnx")),
        );
        let (run, report) = run_merge(args(&a, &b, backend));
        assert_eq!(
            report["unknown_ops"],
            serde_json::json!({ op: 1 }),
            "{stem}: {report}"
        );
        assert_eq!(report["groups"].as_array().unwrap().len(), 1, "{stem}");
        assert!(report["fixed_weight_axes"].as_u64().unwrap() > 0, "{stem}");
        let merged = initializers(&run.out("m.onnx"));
        for name in ["b2", "w3", "b3"] {
            let got = merged[name].to_f32().iter().copied().collect::<Vec<_>>();
            assert!(
                close(&got, &mean_of(&a, &b, name)),
                "{stem}: '{name}' is not the plain average"
            );
        }
        assert_all_finite(&run.out("m.onnx"));
    }
}

/// A model no backend can run is refused when calibration starts, naming the op (exit 1: the
/// model is valid ONNX, the engine cannot execute it).
#[test]
fn ops_no_backend_runs_are_refused_naming_the_op() {
    let calib = input("calib.npz");
    for (stem, backend, needles) in [
        ("mystery", "tract", &["mystery_a.onnx", "Mystery"][..]),
        ("mystery", "ort", &["mystery_a.onnx", "Mystery"][..]),
        ("loop", "tract", &["loop_a.onnx", "Loop"][..]),
    ] {
        let (a, b) = (
            input(&format!("{stem}_a.onnx")),
            input(&format!("{stem}_b.onnx")),
        );
        assert_refused(
            &[
                "merge",
                &a,
                &b,
                "-o",
                "OUT/m.onnx",
                "--calib",
                &calib,
                "--report",
                "OUT/r.json",
                "--backend",
                backend,
            ],
            1,
            needles,
        );
        assert_refused(
            &[
                "run",
                &a,
                "--input",
                &calib,
                "--output",
                "OUT/y.npz",
                "--backend",
                backend,
            ],
            1,
            needles,
        );
    }
}
