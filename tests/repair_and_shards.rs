//! The bounded-pass paths of the merge against their references: statistics repair in one
//! pass against the sequential scheme (one pass per layer), merging from summed statistics
//! shards against merging from the whole calibration file, and repair on float16 / float64
//! graphs against `onnx.checker` and ONNX Runtime.

mod common;

use std::path::PathBuf;

use mudsc::data;
use mudsc::merge::{merge, statistics, MergeOptions, Method, RefitLayers, Stats};
use mudsc::onnx::{self, Model, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use prost::Message;

fn fixture(name: &str) -> Model {
    onnx::load(common::root().join("fixtures/models").join(name)).unwrap()
}

fn bound(model: &Model, file: &str, key: Option<&str>) -> Vec<TensorData> {
    let p = common::root().join("fixtures/data").join(file);
    let mut arrays = data::read(&p).unwrap();
    if let Some(k) = key {
        arrays = data::NamedArrays(vec![("input".into(), arrays.get(k).unwrap().clone())]);
    }
    data::bind_inputs(&arrays, model, &p).unwrap()
}

fn logits(model: &Model, x: &[TensorData]) -> ndarray::Array2<f32> {
    let mut s = open_session(BackendKind::Auto, model, &[], &BackendOptions::default()).unwrap();
    run_batched(s.as_mut(), x, 256).unwrap()[0]
        .to_f32()
        .into_dimensionality()
        .unwrap()
}

/// The one-pass repair's logits on `x` equal the sequential scheme's within 1e-3 of their scale.
fn assert_one_pass_matches(sequential: &Model, one_pass: &Model, x: &[TensorData], what: &str) {
    let (ls, le) = (logits(sequential, x), logits(one_pass, x));
    let scale = ls.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = (&ls - &le).iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        diff <= 1e-3 * scale,
        "{what}: one pass differs by {diff} (scale {scale})"
    );
}

fn task_mean(model: &Model) -> f64 {
    let test = common::root().join("fixtures/data/test.npz");
    let labels = data::read(&test)
        .unwrap()
        .get("labels")
        .unwrap()
        .to_labels()
        .unwrap();
    let x = bound(model, "test.npz", Some("input"));
    let tasks = mudsc::eval::ClassRange::parse_list("0-4,5-9").unwrap();
    mudsc::eval::evaluate(logits(model, &x).view(), &labels, &tasks, None)
        .unwrap()
        .task_mean
        .unwrap()
}

/// One pass with every layer normalised in the graph measures what the sequential scheme
/// measures: exactly when one batch holds all repair samples, and within half a point of test
/// accuracy when the statistics are pooled over batches. Kept BatchNorms (reset in training
/// mode) and folded ones alike.
#[test]
fn one_pass_repair_matches_the_sequential_scheme() {
    for pair in ["resnet20_bn_folded", "resnet20_bn_kept"] {
        let models = [
            fixture(&format!("{pair}_a.onnx")),
            fixture(&format!("{pair}_b.onnx")),
        ];
        let calib = common::head_rows(&bound(&models[0], "calib.npz", None), 500);
        let merged = |passes: usize, batch: usize| {
            let opts = MergeOptions {
                method: Method::MudscZip,
                max_sweeps: 3,
                repair_samples: 256,
                repair_passes: passes,
                repair_batch: batch,
                ..Default::default()
            };
            let (m, report) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
            assert!(
                report.repaired_layers + report.reset_batch_norms >= 19,
                "{pair}"
            );
            if passes > 0 {
                // `auto` (0) fits every sample of these small maps in one batch.
                let want = if batch == 0 { 256 } else { batch };
                assert_eq!(report.repair_batch, want, "{pair}: batch {batch}");
            }
            m
        };
        let sequential = merged(0, 256);
        let exact = merged(1, 256);
        // The default, `auto`, is the exact scheme here: the same merged model.
        assert_eq!(
            merged(1, 0).proto.encode_to_vec(),
            exact.proto.encode_to_vec(),
            "{pair}: auto batch"
        );
        let x = common::head_rows(&bound(&models[0], "test.npz", Some("input")), 200);
        assert_one_pass_matches(&sequential, &exact, &x, &format!("{pair}, one batch"));
        let pooled = merged(1, 64);
        let (a, b) = (task_mean(&sequential), task_mean(&pooled));
        assert!(
            (a - b).abs() <= 0.005,
            "{pair}: sequential {a}, pooled one pass {b}"
        );
    }
}

/// Token layers (a transformer's MatMul + bias Add, units on the last axis): the one-pass
/// repair, which normalises them in the graph as [N·L, D, 1], measures what the sequential
/// scheme measures along the last axis, and the option adds them to the corrected layers. On
/// `vit_mha` (nn.MultiheadAttention, sequence-first [L, N, D] values) the packed QKV
/// projection is one of them: its Q, K and V ranges are corrected segment by segment.
#[test]
fn token_layer_repair_in_one_pass_matches_the_sequential_scheme() {
    // vit: 4 blocks × (Q, K, V, out, fc1, fc2); vit_mha: 4 × (packed QKV, fc1, fc2), its
    // attention output is a Gemm, corrected either way.
    for (pair, token_layers) in [("vit", 24), ("vit_mha", 12)] {
        let models = [
            fixture(&format!("{pair}_a.onnx")),
            fixture(&format!("{pair}_b.onnx")),
        ];
        let calib = common::head_rows(&bound(&models[0], "calib.npz", None), 300);
        let merged = |passes: usize, tokens: bool| {
            let opts = MergeOptions {
                method: Method::MudscZip,
                max_sweeps: 2,
                repair_samples: 128,
                repair_passes: passes,
                repair_batch: 128,
                repair_token_layers: tokens,
                // Repair itself, also where the refit fits the layers after it.
                repair_refitted: true,
                ..Default::default()
            };
            merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap()
        };
        let (_, without) = merged(1, false);
        let (sequential, with) = merged(0, true);
        let (exact, _) = merged(1, true);
        assert!(
            with.repaired_layers >= without.repaired_layers + token_layers,
            "{pair}: {} repaired with token layers, {} without",
            with.repaired_layers,
            without.repaired_layers
        );
        let x = common::head_rows(&bound(&models[0], "test.npz", Some("input")), 200);
        assert_one_pass_matches(&sequential, &exact, &x, &format!("{pair} token layers"));
    }
}

/// A ViT's class-token groups are observed at every token tensor a layer reads (`--taps
/// tokens`, the default): statistics files record the observation points, and shards taken
/// at one tap per group (`--taps one`) are refused by a default merge, naming the group.
#[test]
fn statistics_record_where_groups_were_observed() {
    let models = [fixture("vit_a.onnx"), fixture("vit_b.onnx")];
    let calib = common::head_rows(&bound(&models[0], "calib.npz", None), 64);
    let stats = |token_taps: bool| {
        let opts = MergeOptions {
            token_taps,
            ..Default::default()
        };
        statistics(&models, &calib, &opts, &mut |_, _, _| {}).unwrap()
    };
    let (tokens, one) = (stats(true), stats(false));
    let points = |s: &Stats| -> Vec<usize> {
        s.groups
            .iter()
            .map(|g| g.tap.split(" + ").count())
            .collect()
    };
    // The residual stream (read by every block's two LayerNorm'd layers) gains a point per
    // reading; groups already observed at every token keep their one tap.
    assert!(points(&one).iter().all(|&n| n == 1));
    let widened = points(&tokens).into_iter().filter(|&n| n > 1).count();
    assert!(widened >= 1, "no group observed at more than one point");
    assert!(
        tokens
            .groups
            .iter()
            .zip(&one.groups)
            .any(|(t, o)| { t.tap.split(" + ").count() >= 8 && t.tap.starts_with(&o.tap) }),
        "the stream is observed at its {} class-token tap only",
        one.groups.len()
    );
    let merged = merge(
        &models,
        &calib,
        &MergeOptions {
            stats: Some(std::sync::Arc::new(one)),
            repair_samples: 0,
            ..Default::default()
        },
        &mut |_, _, _| {},
    );
    let err = match merged {
        Ok(_) => panic!("shards of other taps were accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("statistics of other groups: group"), "{err}");
}

/// Activation moments add up: statistics of two halves of the calibration data, saved, read
/// back and summed, give the merge of the whole file (same matchings, weights within 1e-6);
/// shards of other models are refused by name.
#[test]
fn merging_from_two_half_shards_equals_merging_from_the_whole() {
    let models = [fixture("mlp_a.onnx"), fixture("mlp_b.onnx")];
    let calib = common::head_rows(&bound(&models[0], "calib.npz", None), 400);
    let half = |from: usize, to: usize| -> Vec<TensorData> {
        calib.iter().map(|t| t.slice_rows(from, to)).collect()
    };
    let opts = MergeOptions {
        method: Method::MudscZip,
        repair_samples: 0,
        // The output layer alone: refitting every layer in turn compounds the two sums'
        // rounding past the 1e-6 asserted here (1.3e-6 on the head).
        refit_layers: RefitLayers::Output,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let mut shards = Vec::new();
    for (k, (from, to)) in [(0, 150), (150, 400)].into_iter().enumerate() {
        let s = statistics(&models, &half(from, to), &opts, &mut |_, _, _| {}).unwrap();
        let path: PathBuf = dir.path().join(format!("s{k}.stats"));
        s.save(&path, &[]).unwrap();
        shards.push((path.clone(), Stats::load(&path).unwrap()));
    }
    let summed = Stats::sum(shards.clone()).unwrap();
    assert_eq!(summed.samples, 400);
    let (whole, rw) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
    let from_shards = MergeOptions {
        stats: Some(std::sync::Arc::new(summed)),
        ..opts.clone()
    };
    let (sharded, rs) = merge(&models, &calib, &from_shards, &mut |_, _, _| {}).unwrap();
    assert_eq!(rw.sweeps, rs.sweeps);
    // Calibration multiplies centred f32 samples: the two sums round differently, by about
    // f32's resolution of a correlation.
    for (g, h) in rw.groups.iter().zip(&rs.groups) {
        assert!(
            (g.merge_value - h.merge_value).abs() < 1e-6 || g.merge_value.is_nan(),
            "group {}: {} against {}",
            g.id,
            g.merge_value,
            h.merge_value
        );
    }
    let mut compared = 0;
    for (t, u) in whole
        .graph()
        .initializer
        .iter()
        .zip(&sharded.graph().initializer)
    {
        let (a, b) = (
            TensorData::from_proto(t).unwrap().to_f32(),
            TensorData::from_proto(u).unwrap().to_f32(),
        );
        let d = (&a - &b).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(d <= 1e-6, "{:?} differs by {d}", t.name);
        compared += 1;
    }
    assert!(compared >= 4);

    // Shards of another pair are refused, naming the shard.
    let other = [fixture("mlp_b.onnx"), fixture("mlp_a.onnx")];
    let err = merge(&other, &calib, &from_shards, &mut |_, _, _| {}).unwrap_err();
    assert!(err.to_string().contains("another model"), "{err}");
    let mut wrong = shards[1].1.clone();
    wrong.models[0] = "0".repeat(64);
    let err = Stats::sum(vec![shards[0].clone(), (PathBuf::from("w.stats"), wrong)]).unwrap_err();
    assert!(err.to_string().contains("w.stats"), "{err}");
}

/// Repair rewrites weights and adds biases in the graph's own float type: the merged float16
/// and float64 models (with and without biases) pass `onnx.checker`'s full check and run in
/// ONNX Runtime's Python package.
#[test]
fn repair_keeps_float16_and_float64_graphs_valid() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    common::python(&[
        common::root()
            .join("tests/py/make_dtype_pairs.py")
            .to_str()
            .unwrap(),
        d,
    ]);
    let calib_path = dir.path().join("calib.npz");
    for name in ["f16_bias", "f16_nobias", "f64_bias", "f64_nobias"] {
        let models = [
            onnx::load(dir.path().join(format!("{name}_a.onnx"))).unwrap(),
            onnx::load(dir.path().join(format!("{name}_b.onnx"))).unwrap(),
        ];
        let calib =
            data::bind_inputs(&data::read(&calib_path).unwrap(), &models[0], &calib_path).unwrap();
        // Repaired, and left to the refit (which gives a bias-free fc1 its bias then).
        for repair_refitted in [true, false] {
            let opts = MergeOptions {
                repair_samples: 64,
                repair_refitted,
                ..Default::default()
            };
            let (m, report) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
            // fc1 (fc2 writes the graph output, whose units stay).
            assert_eq!(
                report.repaired_layers,
                usize::from(repair_refitted),
                "{name}"
            );
            assert!(
                report.refitted_layers.contains(&"w1".to_string()),
                "{name}: {:?}",
                report.refitted_layers
            );
            let out = dir.path().join(format!("{name}_{repair_refitted}_m.onnx"));
            onnx::save(&m.proto, &out, &Default::default()).unwrap();
            common::python(&[
                "-c",
                "import sys, onnx; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)",
                out.to_str().unwrap(),
            ]);
            let ort = common::ort_python_outputs(&out, &calib_path);
            let y = ort.get("y").unwrap().to_f32();
            assert!(y.iter().all(|v| v.is_finite()), "{name}");
        }
    }
}

/// Statistics over the memory budget are calibrated in several passes over the data: every
/// group sees the same samples, so the merge (repair included, whose endpoint statistics ride
/// on the first pass) is the one-pass merge exactly; correlations spilled to a file and read
/// back group by group in every sweep are the ones held.
#[test]
fn calibrating_in_several_passes_gives_the_one_pass_merge() {
    let models = [
        fixture("resnet20_bn_folded_a.onnx"),
        fixture("resnet20_bn_folded_b.onnx"),
    ];
    let calib = common::head_rows(&bound(&models[0], "calib.npz", None), 128);
    let opts = MergeOptions {
        repair_samples: 64,
        max_sweeps: 3,
        // Batches of two in both merges: a budget also cuts the batches (to what it leaves
        // the engines), and sums over other batches would differ in their last bits.
        batch: 2,
        ..Default::default()
    };
    let (one, r1) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
    let tight = MergeOptions {
        // Smaller than any group's statistics: a pass per group.
        max_memory: Some(1),
        ..opts.clone()
    };
    let (many, rm) = merge(&models, &calib, &tight, &mut |_, _, _| {}).unwrap();
    assert_eq!(r1.calibration_passes, 1);
    // Nor does the budget hold the correlations: they went through a temporary file.
    assert!(!r1.correlations_spilled && rm.correlations_spilled);
    assert!(
        rm.calibration_passes > 3,
        "{} passes",
        rm.calibration_passes
    );
    assert_eq!(r1.sweeps, rm.sweeps);
    let mut compared = 0;
    for (t, u) in one
        .graph()
        .initializer
        .iter()
        .zip(&many.graph().initializer)
    {
        assert_eq!(t.name, u.name);
        assert_eq!(
            TensorData::from_proto(t).unwrap().to_f32(),
            TensorData::from_proto(u).unwrap().to_f32(),
            "{:?}",
            t.name
        );
        compared += 1;
    }
    assert!(compared > 20, "{compared} tensors");
}
