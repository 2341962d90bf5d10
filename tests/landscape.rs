//! `mudsc landscape` end to end on the MLP pair: the PNG decodes at the requested size; the
//! losses at the three marked points equal the cross-entropy this test computes itself from
//! the runtime outputs of A, B and the merged model; a bad merge (plain averaging, or the real
//! merge plus noise) sits at a higher loss than the real mudsc-zip merge; a merged model of
//! another architecture is refused by name.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mudsc::data;
use mudsc::merge::{merge, MergeOptions, Method};
use mudsc::onnx::{self, Model, SaveOptions, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};

/// Data rows used everywhere: enough for stable losses, few for a fast test.
const SAMPLES: usize = 200;

fn fixture(name: &str) -> PathBuf {
    common::root().join("fixtures/models").join(name)
}

fn test_npz() -> PathBuf {
    common::root().join("fixtures/data/test.npz")
}

/// A temporary directory for this test binary, with the merged models saved in it.
struct Setup {
    dir: tempfile::TempDir,
    zip: PathBuf,
    avg: PathBuf,
    noisy: PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let a = onnx::load(fixture("mlp_a.onnx")).unwrap();
        let b = onnx::load(fixture("mlp_b.onnx")).unwrap();
        let p = common::root().join("fixtures/data/calib.npz");
        let calib = common::head_rows(
            &data::bind_inputs(&data::read(&p).unwrap(), &a, &p).unwrap(),
            300,
        );
        let merged = |method| {
            let opts = MergeOptions {
                method,
                // Plain averaging is plain: no statistics repair or output refit either.
                repair_samples: if method == Method::Avg { 0 } else { 256 },
                output_fit_samples: if method == Method::Avg { 0 } else { 1000 },
                ..Default::default()
            };
            merge(&[a.clone(), b.clone()], &calib, &opts, &mut |_, _, _| {})
                .unwrap()
                .0
        };
        let save = |m: &Model, name: &str| {
            let path = dir.path().join(name);
            onnx::save(&m.proto, &path, &SaveOptions::default()).unwrap();
            path
        };
        let zip_model = merged(Method::MudscZip);
        let zip = save(&zip_model, "zip.onnx");
        let avg = save(&merged(Method::Avg), "avg.onnx");
        let noisy = save(&with_noise(&zip_model, 0.5), "noisy.onnx");
        Setup {
            dir,
            zip,
            avg,
            noisy,
        }
    })
}

/// `model` with every float initializer of two or more dimensions (the weight matrices)
/// perturbed by deterministic noise of `scale` times that tensor's own standard deviation.
fn with_noise(model: &Model, scale: f32) -> Model {
    let mut out = model.clone();
    let mut state = 0x1234_5678_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    };
    for t in &mut out.proto.graph.as_mut().unwrap().initializer {
        let Ok(TensorData::F32(mut a)) = TensorData::from_proto(t) else {
            continue;
        };
        if a.ndim() < 2 {
            continue;
        }
        let n = a.len() as f32;
        let mean = a.sum() / n;
        let sd = (a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
        a.mapv_inplace(|v| v + scale * sd * next());
        *t = TensorData::F32(a).to_proto(t.name.as_deref().unwrap());
    }
    out
}

struct Run {
    stdout: String,
    csv: Vec<HashMap<String, String>>,
    png: PathBuf,
}

/// Runs `mudsc landscape A B merged` on the first SAMPLES test rows.
fn landscape(merged: &Path, tag: &str, extra: &[&str]) -> Run {
    let dir = setup().dir.path();
    let png = dir.join(format!("{tag}.png"));
    let csv = dir.join(format!("{tag}.csv"));
    let samples = SAMPLES.to_string();
    let out = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args([
            "landscape",
            fixture("mlp_a.onnx").to_str().unwrap(),
            fixture("mlp_b.onnx").to_str().unwrap(),
            merged.to_str().unwrap(),
            "--data",
            test_npz().to_str().unwrap(),
            "--tasks",
            "0-4,5-9",
            "--samples",
            &samples,
            "-o",
            png.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "landscape failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect();
    let csv = lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect()
        })
        .collect();
    Run {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        csv,
        png,
    }
}

/// The CSV row of a marker ("A", "B", "merged"), as numbers by column.
fn marker(run: &Run, label: &str) -> HashMap<String, f64> {
    run.csv
        .iter()
        .find(|r| r["point"] == label)
        .unwrap_or_else(|| panic!("no '{label}' row in the CSV"))
        .iter()
        .filter(|(k, _)| k.as_str() != "point")
        .map(|(k, v)| (k.clone(), v.parse::<f64>().unwrap()))
        .collect()
}

/// Mean cross-entropy of `model` on the first SAMPLES test rows: per task (softmax over the
/// task's classes, on its samples) and joint, computed here from the runtime's logits.
fn direct_losses(model: &Path) -> HashMap<String, f64> {
    let model = onnx::load(model).unwrap();
    let labels = data::read(&test_npz())
        .unwrap()
        .take("labels")
        .unwrap()
        .to_labels()
        .unwrap();
    let logits = logits(&model, &test_rows(&model, SAMPLES)).to_f32();
    let logits = logits.into_dimensionality::<ndarray::Ix2>().unwrap();
    let ce = |row: &[f32], cols: std::ops::Range<usize>, target: usize| -> f64 {
        let max = cols.clone().map(|c| row[c] as f64).fold(f64::MIN, f64::max);
        let z: f64 = cols.map(|c| (row[c] as f64 - max).exp()).sum();
        z.ln() + max - row[target] as f64
    };
    let mut sums: HashMap<String, (f64, usize)> = HashMap::new();
    for (row, &label) in logits.rows().into_iter().zip(&labels[..SAMPLES]) {
        let row = row.to_vec();
        let label = label as usize;
        let (task, cols) = if label < 5 {
            ("loss task 0-4", 0..5)
        } else {
            ("loss task 5-9", 5..10)
        };
        let e = sums.entry(task.into()).or_default();
        e.0 += ce(&row, cols, label);
        e.1 += 1;
        let e = sums.entry("loss joint".into()).or_default();
        e.0 += ce(&row, 0..10, label);
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

fn task_mean(losses: &HashMap<String, f64>) -> f64 {
    0.5 * (losses["loss task 0-4"] + losses["loss task 5-9"])
}

#[test]
fn png_decodes_at_the_requested_size_and_csv_has_every_point() {
    let run = landscape(&setup().zip, "size", &["--grid", "4", "--size", "1000x420"]);
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&run.png).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1000, 420));
    // A picture, not a blank canvas: the filled levels give many distinct colours.
    let pixels = &buf[..info.buffer_size()];
    let colours: std::collections::HashSet<&[u8]> = pixels.chunks(3).collect();
    assert!(colours.len() > 30, "only {} colours", colours.len());
    // 4x4 grid points plus the three models, each with two task losses and the joint.
    assert_eq!(run.csv.len(), 16 + 3);
    assert_eq!(run.csv.iter().filter(|r| r["point"] == "grid").count(), 16);
    for r in &run.csv {
        assert_eq!(r.len(), 6, "{r:?}");
    }
    assert!(run.stdout.contains("merged"), "{}", run.stdout);
}

#[test]
fn losses_at_the_three_models_equal_their_own_losses() {
    let run = landscape(&setup().zip, "points", &["--grid", "3"]);
    for (label, path) in [
        ("A", fixture("mlp_a.onnx")),
        ("B", fixture("mlp_b.onnx")),
        ("merged", setup().zip.clone()),
    ] {
        let got = marker(&run, label);
        let want = direct_losses(&path);
        for (k, w) in &want {
            let g = got[k];
            assert!(
                (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                "{label} {k}: landscape {g} vs direct {w}"
            );
        }
    }
    // A sits at the origin and B on the x axis.
    let (a, b) = (marker(&run, "A"), marker(&run, "B"));
    assert_eq!((a["x"], a["y"]), (0.0, 0.0));
    assert!(b["x"] > 0.0 && b["y"].abs() < 1e-9 * b["x"]);
}

#[test]
fn a_bad_merge_lands_at_higher_loss_than_mudsc_zip() {
    let zip = marker(&landscape(&setup().zip, "zip", &["--grid", "2"]), "merged");
    let avg_run = landscape(&setup().avg, "avg", &["--grid", "2"]);
    let avg = marker(&avg_run, "merged");
    let noisy = marker(
        &landscape(&setup().noisy, "noisy", &["--grid", "2"]),
        "merged",
    );
    let (z, a, n) = (task_mean(&zip), task_mean(&avg), task_mean(&noisy));
    assert!(a > z * 1.1, "avg merge task-mean loss {a} vs mudsc-zip {z}");
    assert!(
        n > z * 1.1,
        "noisy merge task-mean loss {n} vs mudsc-zip {z}"
    );
    assert!(avg["loss joint"] > zip["loss joint"]);
    // Plain averaging without alignment puts the merged model on the A–B segment.
    let (b, m) = (marker(&avg_run, "B"), marker(&avg_run, "merged"));
    assert!((m["x"] - 0.5 * b["x"]).abs() < 1e-6 * b["x"] && m["y"].abs() < 1e-6 * b["x"]);
}

#[test]
fn a_merged_model_of_another_architecture_is_refused_by_name() {
    let out_png = setup().dir.path().join("refused.png");
    let out = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args([
            "landscape",
            fixture("mlp_a.onnx").to_str().unwrap(),
            fixture("mlp_b.onnx").to_str().unwrap(),
            fixture("dwcnn_a.onnx").to_str().unwrap(),
            "--data",
            test_npz().to_str().unwrap(),
            "-o",
            out_png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("dwcnn_a.onnx") && err.contains("initializer"),
        "{err}"
    );
    assert!(!out_png.exists());
}

#[test]
fn a_partial_zip_is_refused_with_the_reason() {
    let a = onnx::load(fixture("mlp_a.onnx")).unwrap();
    let b = onnx::load(fixture("mlp_b.onnx")).unwrap();
    let opts = MergeOptions {
        zip_until: Some("1".parse().unwrap()),
        repair_samples: 0,
        ..Default::default()
    };
    let (partial, _) = merge(
        &[a.clone(), b],
        &test_rows(&a, 100),
        &opts,
        &mut |_, _, _| {},
    )
    .unwrap();
    let path = setup().dir.path().join("partial.onnx");
    onnx::save(&partial.proto, &path, &SaveOptions::default()).unwrap();
    let out_png = setup().dir.path().join("partial.png");
    let out = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args([
            "landscape",
            fixture("mlp_a.onnx").to_str().unwrap(),
            fixture("mlp_b.onnx").to_str().unwrap(),
            path.to_str().unwrap(),
            "--data",
            test_npz().to_str().unwrap(),
            "-o",
            out_png.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("partial zip") && err.contains("partial.onnx"),
        "{err}"
    );
    assert!(!out_png.exists());
}

#[test]
fn an_output_over_an_input_is_refused() {
    let merged = &setup().zip;
    let before = std::fs::read(merged).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mudsc"))
        .args([
            "landscape",
            fixture("mlp_a.onnx").to_str().unwrap(),
            fixture("mlp_b.onnx").to_str().unwrap(),
            merged.to_str().unwrap(),
            "--data",
            test_npz().to_str().unwrap(),
            "-o",
            merged.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(merged).unwrap(), before);
}

/// First rows of the test set bound to `model`'s inputs.
fn test_rows(model: &Model, rows: usize) -> Vec<TensorData> {
    common::head_rows(
        &data::bind_inputs(&data::read(&test_npz()).unwrap(), model, &test_npz()).unwrap(),
        rows,
    )
}

fn logits(model: &Model, inputs: &[TensorData]) -> TensorData {
    let mut s = open_session(BackendKind::Tract, model, &[], &BackendOptions::default()).unwrap();
    run_batched(s.as_mut(), inputs, 64).unwrap().remove(0)
}

#[test]
fn a_bias_added_by_repair_is_a_zero_bias_of_the_models_without_one() {
    use mudsc::landscape::ParamSpace;
    // "merged" has fc2's bias; "a" is the same graph with that Gemm's bias input removed, as
    // a layer looks before statistics repair gives it one.
    let merged = onnx::load(fixture("mlp_a.onnx")).unwrap();
    let mut a = merged.clone();
    let g = a.proto.graph.as_mut().unwrap();
    g.initializer
        .retain(|t| t.name.as_deref() != Some("fc2.bias"));
    for n in &mut g.node {
        if n.input.iter().any(|i| i == "fc2.bias") {
            n.input.truncate(2);
        }
    }
    let inputs = test_rows(&merged, 50);
    let space = ParamSpace::new(&a, &merged).unwrap();
    let rebuilt_a = space.model_at(&space.flatten(&a).unwrap()).unwrap();
    let rebuilt_m = space.model_at(&space.flatten(&merged).unwrap()).unwrap();
    assert!(space.names().any(|n| n == "fc2.bias"));
    common::assert_within(
        &logits(&rebuilt_a, &inputs),
        &logits(&a, &inputs),
        0.0,
        1e-6,
        "A with a zero bias",
    );
    common::assert_within(
        &logits(&rebuilt_m, &inputs),
        &logits(&merged, &inputs),
        0.0,
        1e-6,
        "merged rebuilt from θ",
    );
    // The same bias seen the other way round is an initializer the merged model lacks.
    let err = ParamSpace::new(&merged, &a).unwrap_err().to_string();
    assert!(err.contains("fc2.bias"), "{err}");
    // An extra initializer that is no bias, and a changed shape, are refused by name.
    let mut extra = merged.clone();
    extra
        .proto
        .graph
        .as_mut()
        .unwrap()
        .initializer
        .push(TensorData::F32(ndarray::ArrayD::zeros(vec![3])).to_proto("stray"));
    let err = ParamSpace::new(&merged, &extra).unwrap_err().to_string();
    assert!(err.contains("stray"), "{err}");
    let mut reshaped = merged.clone();
    for t in &mut reshaped.proto.graph.as_mut().unwrap().initializer {
        if t.name.as_deref() == Some("fc1.bias") {
            *t = TensorData::F32(ndarray::ArrayD::zeros(vec![255])).to_proto("fc1.bias");
        }
    }
    let err = ParamSpace::new(&merged, &reshaped).unwrap_err().to_string();
    assert!(err.contains("fc1.bias") && err.contains("255"), "{err}");
}
