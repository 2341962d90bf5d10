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
    mudsc_env(args, &[])
}

/// `mudsc` with extra environment variables.
fn mudsc_env<S: AsRef<str>>(args: &[S], env: &[(&str, &str)]) -> Run {
    let out = tempfile::tempdir().unwrap();
    mudsc_in(out, args, env)
}

/// `mudsc` with `OUT/` standing for `out` (which may already hold files).
fn mudsc_in<S: AsRef<str>>(out: tempfile::TempDir, args: &[S], env: &[(&str, &str)]) -> Run {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.as_ref()
                .replace("OUT/", &format!("{}/", out.path().display()))
        })
        .collect();
    let o = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args(&args)
        .envs(env.iter().copied())
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
    assert_refused_env(args, &[], code, needles)
}

/// [`assert_refused`] with extra environment variables.
fn assert_refused_env<S: AsRef<str>>(
    args: &[S],
    env: &[(&str, &str)],
    code: i32,
    needles: &[&str],
) {
    let before = snapshot(inputs());
    let run = mudsc_env(args, env);
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
        &["--report", "are the same file"],
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
            // The output refit would fit the last layer to the endpoints (`output_fit`).
            "--output-fit".into(),
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

// ---------------------------------------------------------------------------------------------
// Hardening, round 2. Each test fails on the behaviour before its fix.

/// Asserts a refusal of a run whose output directory may hold files made before it.
fn assert_run_refused(run: &Run, code: i32, needles: &[&str]) {
    let what = format!("stderr: {}", run.stderr);
    assert_eq!(run.code, Some(code), "{what}");
    assert!(!run.stderr.contains("panicked"), "{what}");
    assert!(run.stderr.starts_with("error: "), "{what}");
    for needle in needles {
        assert!(run.stderr.contains(needle), "no '{needle}' in: {what}");
    }
}

/// A directory holding the external-data model `ext_a.onnx` and, as `ext_a.weights`, what
/// `link` makes of the real weights (which are put beside the directory, outside it).
fn ext_model_with(link: impl Fn(&Path, &Path)) -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(inputs().join("ext_a.onnx"), dir.join("ext_a.onnx")).unwrap();
    let outside = root.path().join("secret.bin");
    std::fs::copy(inputs().join("ext_a.weights"), &outside).unwrap();
    link(&outside, &dir.join("ext_a.weights"));
    let model = dir.join("ext_a.onnx");
    (root, model)
}

/// F1: external data may not leave the model's directory through a symbolic link (to a file
/// or through a linked directory), and must be a regular file; a link that stays inside is
/// fine.
#[test]
fn external_data_cannot_leave_the_model_directory_through_links() {
    let calib = input("calib.npz");
    let (_root, model) = ext_model_with(|outside, at| {
        std::os::unix::fs::symlink(outside, at).unwrap();
    });
    let m = model.to_str().unwrap().to_string();
    for args in [
        vec!["run", &m, "--input", &calib, "--output", "OUT/y.npz"],
        vec!["inspect", &m],
        vec!["run", &m, "--input", &calib, "--backend", "ort"],
    ] {
        assert_refused(
            &args,
            2,
            &[
                "ext_a.onnx",
                "outside the model's directory",
                "ext_a.weights",
            ],
        );
    }
    // A linked directory: the location names a file inside it.
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    let elsewhere = root.path().join("elsewhere");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::copy(
        inputs().join("ext_a.weights"),
        elsewhere.join("ext_a.weights"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("sub")).unwrap();
    let mut proto = onnx::load(input("ext_a.onnx")).unwrap().proto;
    // Loaded with its data resolved: write it back out with the data under sub/.
    onnx::save(
        &proto,
        &dir.join("tmp.onnx"),
        &onnx::SaveOptions {
            external_data: onnx::ExternalData::Always(Some("w.bin".into())),
            protect: vec![],
        },
    )
    .unwrap();
    std::fs::rename(dir.join("w.bin"), elsewhere.join("w.bin")).unwrap();
    proto = {
        use prost::Message;
        let bytes = std::fs::read(dir.join("tmp.onnx")).unwrap();
        onnx::proto::ModelProto::decode(bytes.as_slice()).unwrap()
    };
    for t in &mut proto.graph.as_mut().unwrap().initializer {
        for kv in &mut t.external_data {
            if kv.key.as_deref() == Some("location") {
                kv.value = Some("sub/w.bin".into());
            }
        }
    }
    {
        use prost::Message;
        std::fs::write(dir.join("linked_dir.onnx"), proto.encode_to_vec()).unwrap();
    }
    let m = dir.join("linked_dir.onnx").to_str().unwrap().to_string();
    assert_refused(&["inspect", &m], 2, &["outside the model's directory"]);
    // A FIFO as the data file: refused, not waited on.
    let (_root2, model) = ext_model_with(|_, at| {
        let c = std::ffi::CString::new(at.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    });
    assert_refused(
        &["inspect", model.to_str().unwrap()],
        2,
        &["not a regular file"],
    );
    // A link that stays inside the directory is fine.
    let (_root3, model) = ext_model_with(|outside, at| {
        let inside = at.with_file_name("real.weights");
        std::fs::copy(outside, &inside).unwrap();
        std::os::unix::fs::symlink("real.weights", at).unwrap();
    });
    let run = mudsc(&["inspect", model.to_str().unwrap()]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

/// F2: undoing a save removes only what that save wrote: a model saved inline next to an
/// existing `<name>.data` (here another model's weights) leaves that file alone.
#[test]
fn undoing_a_save_removes_only_what_it_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("m.onnx.data");
    std::fs::write(&weights, b"another model's weights").unwrap();
    let model = onnx::load(input("a.onnx")).unwrap();
    let saved = model
        .save(dir.path().join("m.onnx"), &onnx::SaveOptions::default())
        .unwrap();
    assert_eq!(saved.data, None);
    saved.remove();
    assert!(!dir.path().join("m.onnx").exists());
    assert_eq!(std::fs::read(&weights).unwrap(), b"another model's weights");
    // With external data, both files are the save's own.
    let saved = model
        .save(
            dir.path().join("x.onnx"),
            &onnx::SaveOptions {
                external_data: onnx::ExternalData::Always(None),
                protect: vec![],
            },
        )
        .unwrap();
    assert_eq!(saved.data, Some(dir.path().join("x.onnx.data")));
    saved.remove();
    assert!(!dir.path().join("x.onnx.data").exists());
    // Through the binary: the reproducer's report into a missing directory is refused before
    // any work, and the input's weights file `ext_x.onnx.data` (the output's data name) stays.
    let (b, calib) = (input("b.onnx"), input("calib.npz"));
    let out = inputs().join("ext_x.onnx");
    assert_refused(
        &[
            "merge",
            &input("ext_x_a.onnx"),
            &b,
            "-o",
            out.to_str().unwrap(),
            "--calib",
            &calib,
            "--report",
            "OUT/nodir/r.json",
        ],
        2,
        &["nodir/r.json"],
    );
}

/// F4: an output that is a FIFO, a symbolic link or a directory is refused, and stays what it
/// was; a regular file is replaced as before.
#[test]
fn special_files_are_never_replaced_by_outputs() {
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    let out = tempfile::tempdir().unwrap();
    let fifo = out.path().join("pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let target = out.path().join("target.txt");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, out.path().join("link")).unwrap();
    std::fs::create_dir(out.path().join("adir")).unwrap();
    use std::os::unix::fs::FileTypeExt;
    for name in ["pipe", "link", "adir"] {
        for args in [
            vec![
                "run",
                &a,
                "--input",
                &calib,
                "--output",
                &format!("OUT/{name}"),
            ],
            vec![
                "merge",
                &a,
                &b,
                "-o",
                "OUT/m.onnx",
                "--calib",
                &calib,
                "--report",
                &format!("OUT/{name}"),
            ],
            vec![
                "merge",
                &a,
                &b,
                "-o",
                &format!("OUT/{name}"),
                "--calib",
                &calib,
            ],
        ] {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let o = Command::new(env!("CARGO_BIN_EXE_mudsc"))
                .args(
                    args.iter()
                        .map(|a| a.replace("OUT/", &format!("{}/", out.path().display()))),
                )
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
            assert!(stderr.contains(name), "{stderr}");
        }
    }
    let meta = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(meta.file_type().is_fifo());
    let link = std::fs::symlink_metadata(out.path().join("link")).unwrap();
    assert!(link.file_type().is_symlink());
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(!out.path().join("m.onnx").exists());
}

/// F5: one output under two spellings is refused before any work: a report naming the model
/// through `..`, a report over the external data file, a CSV naming the picture absolutely.
#[test]
fn outputs_under_two_spellings_are_refused() {
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("sub")).unwrap();
    let run = mudsc_in(
        out,
        &[
            "merge",
            &a,
            &b,
            "-o",
            "OUT/m.onnx",
            "--calib",
            &calib,
            "--report",
            "OUT/sub/../m.onnx",
        ],
        &[],
    );
    assert_run_refused(&run, 2, &["--report", "-o", "same file"]);
    assert!(!run.out("m.onnx").exists());
    assert_refused(
        &[
            "merge",
            &a,
            &b,
            "-o",
            "OUT/x.onnx",
            "--calib",
            &calib,
            "--external-data",
            "--report",
            "OUT/x.onnx.data",
        ],
        2,
        &["--report", "external data file", "same file"],
    );
    let dir = tempfile::tempdir().unwrap();
    let abs = dir.path().join("l.png");
    let run = mudsc_in(
        dir,
        &[
            "landscape",
            &a,
            &b,
            &a,
            "--data",
            &calib,
            "-o",
            "OUT/l.png",
            "--csv",
            abs.to_str().unwrap(),
        ],
        &[],
    );
    assert_run_refused(&run, 2, &["--csv", "same file"]);
}

/// F6: check's random input is bounded: too many samples or too large a shape is refused
/// with the reason, not an allocation abort.
#[test]
fn check_refuses_random_input_too_large_to_allocate() {
    let a = input("a.onnx");
    assert_refused(
        &[
            "check",
            &a,
            "--backend",
            "tract",
            "--samples",
            "10000000000",
        ],
        2,
        &["random input 'x'", "--samples"],
    );
    assert_refused(
        &[
            "check",
            &a,
            "--backend",
            "tract",
            "--shape",
            "x=100000000,8",
        ],
        2,
        &["random input 'x'", "[100000000, 8]"],
    );
}

/// F7: a pair with one 50,000-unit layer is refused before the dense matrices are allocated,
/// naming the group, its width and the memory; `avg` is charged no statistics.
#[test]
fn merges_too_large_for_memory_are_refused_before_allocating() {
    let (a, b, calib) = (
        input("wide50k_a.onnx"),
        input("wide50k_b.onnx"),
        input("calib.npz"),
    );
    for method in ["mudsc-zip", "avg"] {
        assert_refused_env(
            &[
                "merge",
                &a,
                &b,
                "-o",
                "OUT/m.onnx",
                "--calib",
                &calib,
                "--method",
                method,
            ],
            &[("MUDSC_MEMORY_LIMIT", "4G")],
            1,
            &["group g0", "50000 units", "GiB", method],
        );
    }
}

/// F8: an `.npz` member whose header declares 4 bytes but that inflates to 64 MiB is refused
/// after the header, without inflating the rest.
#[test]
fn npz_members_inflate_no_further_than_their_header_says() {
    assert_refused(
        &["run", &input("a.onnx"), "--input", &input("bomb.npz")],
        2,
        &[
            "bomb.npz",
            "array 'x'",
            "needs 4 bytes of data, the member holds more",
        ],
    );
}

/// Two members of one name are ambiguous.
#[test]
fn npz_with_two_members_of_one_name_is_refused() {
    assert_refused(
        &["run", &input("a.onnx"), "--input", &input("dup_member.npz")],
        2,
        &["dup_member.npz", "array 'x'", "two members"],
    );
}

/// check: no trials prove nothing; integer inputs stay inside the embedding table they index
/// and masks are 0/1; the verdict prints its tolerance and a negative control.
#[test]
fn check_refuses_no_trials_and_fits_integer_inputs_to_tables() {
    assert_refused(
        &["check", &input("a.onnx"), "--trials", "0"],
        2,
        &["--trials"],
    );
    for backend in ["ort", "tract"] {
        let run = mudsc(&["check", &input("embed.onnx"), "--backend", backend]);
        assert_eq!(run.code, Some(0), "{backend}: {}", run.stderr);
        assert!(!run.stderr.contains("onnxruntime"), "{}", run.stderr);
    }
    let run = mudsc(&["check", &input("a.onnx")]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    for needle in [
        "tolerance",
        "noise floor",
        "negative control",
        "× tolerance",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no '{needle}' in {}",
            run.stdout
        );
    }
}

/// Option values that make no sense are refused; too few calibration samples warn.
#[test]
fn nonsense_option_values_are_refused_and_few_samples_warn() {
    let (a, b, calib) = (input("a.onnx"), input("b.onnx"), input("calib.npz"));
    for (flag, v) in [
        ("--zip-a", "-1"),
        ("--zip-a", "NaN"),
        ("--zip-b", "inf"),
        ("--zip-b", "-0.5"),
    ] {
        let arg = format!("{flag}={v}");
        assert_refused(
            &["merge", &a, &b, "-o", "OUT/m.onnx", "--calib", &calib, &arg],
            2,
            &[flag],
        );
    }
    let run = mudsc(&[
        "merge",
        &a,
        &b,
        "-o",
        "OUT/m.onnx",
        "--calib",
        &calib,
        "--samples",
        "2",
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("warning: 2 calibration sample"),
        "{}",
        run.stderr
    );
}

/// eval: no sample in the classes scored is an error, not `0.00 % (0/0)`; tasks that share
/// classes are refused.
#[test]
fn eval_refuses_empty_scores_and_overlapping_tasks() {
    let a = input("a.onnx");
    assert_refused(
        &["eval", &a, "--data", &input("labels_high.npz")],
        2,
        &["no sample has a label", "0-3", "100"],
    );
    assert_refused(
        &[
            "eval",
            &a,
            "--data",
            &input("calib.npz"),
            "--classes",
            "100-103",
        ],
        2,
        &["no sample has a label", "100-103"],
    );
    for tasks in ["0-1,1-3", "0-1,0-1"] {
        assert_refused(
            &["eval", &a, "--data", &input("calib.npz"), "--tasks", tasks],
            2,
            &["--tasks", "overlap"],
        );
    }
}

/// Two initializers of one name are refused at load, naming it.
#[test]
fn duplicate_initializer_names_are_refused() {
    let bad = input("dup_init.onnx");
    for args in [
        vec!["inspect", &bad],
        vec!["run", &bad, "--input", &input("calib.npz")],
    ] {
        assert_refused(
            &args,
            2,
            &["dup_init.onnx", "initializer 'b1' is defined twice"],
        );
    }
}

/// Partial zip of IR 3 models lists the new Gather indices among the graph inputs; a graph
/// output that is a remainder weight gets one copy per model.
#[test]
fn partial_zip_of_ir3_models_and_weight_outputs_is_valid() {
    let calib = input("calib.npz");
    let (run, _) = assert_merges(&[
        "merge",
        &input("ir3_a.onnx"),
        &input("ir3_b.onnx"),
        "--calib",
        &calib,
        "--zip-until",
        "1",
    ]);
    let m = onnx::load(run.out("m.onnx")).unwrap();
    let listed: Vec<&str> = m
        .graph()
        .input
        .iter()
        .filter_map(|v| v.name.as_deref())
        .collect();
    for t in &m.graph().initializer {
        let name = t.name.as_deref().unwrap();
        assert!(
            listed.contains(&name),
            "initializer '{name}' is not a graph input"
        );
    }
    let (run, _) = assert_merges(&[
        "merge",
        &input("init_out_a.onnx"),
        &input("init_out_b.onnx"),
        "--calib",
        &calib,
        "--zip-until",
        "2",
    ]);
    let m = onnx::load(run.out("m.onnx")).unwrap();
    let outputs: Vec<&str> = m
        .graph()
        .output
        .iter()
        .filter_map(|v| v.name.as_deref())
        .collect();
    assert_eq!(
        outputs.iter().filter(|o| o.starts_with("w3")).count(),
        2,
        "{outputs:?}"
    );
    let y = mudsc(&[
        "run",
        run.out("m.onnx").to_str().unwrap(),
        "--input",
        &calib,
    ]);
    assert_eq!(y.code, Some(0), "{}", y.stderr);
}

/// Outputs are checked before any work: a report into a missing directory is refused before
/// the calibration file is even read (here it is garbage, which would be reported first).
#[test]
fn output_directories_are_checked_first() {
    let (a, b) = (input("a.onnx"), input("b.onnx"));
    assert_refused(
        &[
            "merge",
            &a,
            &b,
            "-o",
            "OUT/m.onnx",
            "--calib",
            &input("garbage.npz"),
            "--report",
            "OUT/nodir/r.json",
        ],
        2,
        &["nodir/r.json"],
    );
    // The OS error is said once.
    let run = mudsc(&[
        "merge",
        &a,
        &b,
        "-o",
        "OUT/no/dir/m.onnx",
        "--calib",
        &input("calib.npz"),
    ]);
    assert_eq!(
        run.stderr.matches("No such file").count(),
        1,
        "{}",
        run.stderr
    );
}

/// Outputs are created 0666 less the umask (as other tools' are), not 0600; the merged model
/// records its inputs by file name and sha256, not by the user's paths.
#[test]
fn outputs_get_the_usual_mode_and_record_no_paths() {
    use std::os::unix::fs::PermissionsExt;
    let (run, _) = assert_merges(&[
        "merge",
        &input("a.onnx"),
        &input("b.onnx"),
        "--calib",
        &input("calib.npz"),
    ]);
    // SAFETY: reading the umask means setting it; it is put back at once.
    let mask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    for f in ["m.onnx", "r.json"] {
        let mode = std::fs::metadata(run.out(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !(mask as u32), "{f}: mode {mode:o}");
    }
    let m = onnx::load(run.out("m.onnx")).unwrap();
    let models = m
        .proto
        .metadata_props
        .iter()
        .find(|e| e.key.as_deref() == Some("mudsc.models"))
        .and_then(|e| e.value.clone())
        .unwrap();
    assert!(!models.contains('/'), "{models}");
    assert!(models.contains("a.onnx (sha256 "), "{models}");
}

/// Temporary files: a dead process's old `.mudsc-<pid>-*.tmp` is removed by the next write
/// into its directory; a live process's (ours) and a recent one are kept; SIGTERM during a
/// merge leaves none.
#[test]
fn temporary_files_do_not_linger() {
    let out = tempfile::tempdir().unwrap();
    let dead = out.path().join(".mudsc-999999999-abc.tmp");
    let recent = out.path().join(".mudsc-999999998-abc.tmp");
    let live = out
        .path()
        .join(format!(".mudsc-{}-abc.tmp", std::process::id()));
    for f in [&dead, &recent, &live] {
        std::fs::write(f, b"partial").unwrap();
    }
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
    for f in [&dead, &live] {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    let run = mudsc_in(
        out,
        &[
            "run",
            &input("a.onnx"),
            "--input",
            &input("calib.npz"),
            "--output",
            "OUT/y.npz",
        ],
        &[],
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(!dead.exists());
    assert!(recent.exists() && live.exists());

    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args([
            "merge",
            &input("a.onnx"),
            &input("b.onnx"),
            "--calib",
            &input("calib.npz"),
            "-o",
            out.path().join("m.onnx").to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(150));
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let left: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{status:?}: left {left:?}");
}

/// A model tract panics on or refuses as inconsistent is the input's fault (exit 2), and the
/// panic caught inside mudsc prints one `error:` line, no panic report or backtrace hint.
#[test]
fn tract_refusals_are_input_faults_and_panics_print_one_line() {
    let calib = input("calib.npz");
    for (name, needles) in [
        (
            "tract_panic.onnx",
            &["tract_panic.onnx", "internal error"][..],
        ),
        (
            "tract_refuses.onnx",
            &["tract_refuses.onnx", "cannot prepare"][..],
        ),
    ] {
        let model = input(name);
        let args = ["run", &model, "--input", &calib, "--backend", "tract"];
        assert_refused(&args, 2, needles);
        let run = mudsc(&args);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(!run.stderr.contains("RUST_BACKTRACE"), "{}", run.stderr);
    }
}

/// A deep model whose permuted outputs differ from the original by float32 rounding beyond
/// rtol 1e-4 of a small output (the old fixed tolerance: a false alarm) passes against the
/// tolerance scaled to its outputs, while the negative control is caught by orders of
/// magnitude.
#[test]
fn check_tolerance_scales_with_deep_models() {
    let run = mudsc(&["check", &input("deep.onnx"), "--samples", "64"]);
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let rel: Vec<f64> = run
        .stdout
        .lines()
        .filter_map(|l| l.split("max rel ").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(rel.len(), 3, "{}", run.stdout);
    assert!(
        rel.iter().any(|&r| r > 1e-4),
        "no trial beyond the old rtol: {}",
        run.stdout
    );
    let control: f64 = run
        .stdout
        .lines()
        .find(|l| l.contains("negative control"))
        .and_then(|l| l.split(" = ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(control >= 100.0, "{}", run.stdout);
}
