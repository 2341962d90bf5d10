//! The output refit (`merge::output_fit`): the merged model's output layer is refitted to the
//! endpoints' average output there. Checked against the endpoints themselves, run by ONNX
//! Runtime on images the refit never saw.

mod common;

use mudsc::data;
use mudsc::merge::{merge, MergeOptions, MergeReport, RefitLayers};
use mudsc::onnx::{self, Model, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use ndarray::{Array2, Axis};

const HEAD: &str = "/head/proj/Gemm_output_0";

fn inputs(model: &Model, file: &str, rows: usize) -> Vec<TensorData> {
    let path = common::root().join("fixtures/data").join(file);
    let mut arrays = data::read(&path).unwrap();
    arrays.0.retain(|(name, _)| name != "labels");
    let all = data::bind_inputs(&arrays, model, &path).unwrap();
    common::head_rows(&all, rows)
}

/// `model`'s head projection on `x`, each row scaled to unit length (the cosine head's view).
fn directions(model: &Model, x: &[TensorData]) -> Array2<f64> {
    let mut s = open_session(
        BackendKind::Ort,
        model,
        &[HEAD.to_string()],
        &BackendOptions::default(),
    )
    .unwrap();
    let at = s.output_names().iter().position(|n| n == HEAD).unwrap();
    let out = run_batched(s.as_mut(), x, 256).unwrap();
    let mut z = out[at]
        .to_f32()
        .mapv(f64::from)
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    for mut row in z.axis_iter_mut(Axis(0)) {
        let n = row.dot(&row).sqrt();
        row /= n;
    }
    z
}

/// A bundled pair, 1,000 calibration images and 500 test images bound to its input.
fn pair(name: &str) -> ([Model; 2], Vec<TensorData>, Vec<TensorData>) {
    let load = |tag: &str| onnx::load(common::fixture(&format!("{name}_{tag}.onnx"))).unwrap();
    let models = [load("a"), load("b")];
    let calib = inputs(&models[0], "calib.npz", 1000);
    let test = inputs(&models[0], "test.npz", 500);
    (models, calib, test)
}

/// How many of the `refitted` weights are Conv weights of `model`.
fn refitted_convs(model: &Model, refitted: &[String]) -> usize {
    refitted
        .iter()
        .filter(|w| {
            model
                .graph()
                .node
                .iter()
                .any(|n| n.op_type.as_deref() == Some("Conv") && n.input.get(1) == Some(*w))
        })
        .count()
}

/// mudsc-zip on ONNX Runtime with the refit of `layers` on `samples` samples.
fn merged(
    models: &[Model],
    calib: &[TensorData],
    samples: usize,
    layers: RefitLayers,
) -> (Model, MergeReport) {
    let opts = MergeOptions {
        backend: BackendKind::Ort,
        output_fit_samples: samples,
        refit_layers: layers,
        ..Default::default()
    };
    merge(models, calib, &opts, &mut |_, _, _| {}).unwrap()
}

/// `a` and `b` hold the same initializers, in order, within 1e-4 (relative) / 1e-5.
fn assert_same_initializers(a: &Model, b: &Model) {
    for (x, y) in a.graph().initializer.iter().zip(&b.graph().initializer) {
        let (x, y) = (
            TensorData::from_proto(x).unwrap(),
            TensorData::from_proto(y).unwrap(),
        );
        common::assert_within(&x, &y, 1e-4, 1e-5, "initializer");
    }
}

/// The endpoints' mean head direction on `test`.
fn mean_direction(models: &[Model; 2], test: &[TensorData]) -> Array2<f64> {
    (directions(&models[0], test) + directions(&models[1], test)) / 2.0
}

/// Mean squared distance of `m`'s head directions on `test` to `goal`.
fn distance(goal: &Array2<f64>, test: &[TensorData], m: &Model) -> f64 {
    let d = directions(m, test) - goal;
    (&d * &d).sum() / d.nrows() as f64
}

/// On a ViT pair, the refit moves the merged cosine head toward the endpoints' mean direction
/// on held-out test images, and only the head's projection is refitted (the class embedding
/// after it is the same in both models, so there is nothing to merge there).
#[test]
fn the_refit_head_follows_the_endpoints_on_held_out_images() {
    let (models, calib, test) = pair("vit");
    let (plain, plain_report) = merged(&models, &calib, 0, RefitLayers::Output);
    let (refit, report) = merged(&models, &calib, 1000, RefitLayers::Output);
    let (deep, deep_report) = merged(&models, &calib, 1000, RefitLayers::All);
    assert!(plain_report.refitted_layers.is_empty());
    assert_eq!(report.refitted_layers, ["head.proj.weight"]);
    let goal = mean_direction(&models, &test);
    let error = |m: &Model| distance(&goal, &test, m);
    let (before, after, all) = (error(&plain), error(&refit), error(&deep));
    eprintln!(
        "squared distance to the endpoints' mean direction: {before:.4} → {after:.4}, every \
         layer refitted {all:.4}"
    );
    assert!(
        after < 0.7 * before,
        "refit head {after:.4} not clearly closer than the merged one {before:.4}"
    );
    // Refitting every linear layer whose units are a plain group (the attention outputs and
    // MLP layers writing the stream, the MLP hidden layers) before the head gives the head
    // features it can map closer still.
    assert!(deep_report.refitted_layers.len() > 1);
    assert_eq!(
        deep_report.refitted_layers.last(),
        report.refitted_layers.last()
    );
    assert!(
        all < after,
        "every layer refitted {all:.4} not closer than the head alone {after:.4}"
    );
}

/// Merging a model with a permuted copy of itself: the endpoints' average output is the
/// model's own, which the merged head already computes, so the refit (a ridge toward the
/// merged weights) must leave the model's function as it was.
#[test]
fn the_refit_keeps_a_permuted_copy_exact() {
    for name in [
        "mlp_a.onnx",
        "dwcnn_a.onnx",
        "vit_a.onnx",
        "vit_mha_a.onnx",
        // 3×3 convolutions over patches. (Not the BN-kept export: repair resets its
        // BatchNorms to the calibration data's statistics, which changes its function.)
        "resnet20_bn_folded_a.onnx",
    ] {
        let a = onnx::load(common::fixture(name)).unwrap();
        // 1,000 images: enough rows for the MLP's hidden layers (`ROWS_PER_UNKNOWN`).
        let x = inputs(&a, "calib.npz", 1000);
        let b = common::permuted_copy(&a, &x);
        let run = |m: &Model| {
            let mut s = open_session(BackendKind::Ort, m, &[], &BackendOptions::default()).unwrap();
            run_batched(s.as_mut(), &x, 250).unwrap().remove(0)
        };
        for layers in [RefitLayers::Output, RefitLayers::All] {
            let opts = MergeOptions {
                backend: BackendKind::Ort,
                refit_layers: layers,
                ..Default::default()
            };
            let (merged, report) =
                merge(&[a.clone(), b.clone()], &x, &opts, &mut |_, _, _| {}).unwrap();
            // The copy permutes the class embedding with the projection's units, so the last
            // weight that differs between the two is the embedding's MatMul: that one is the
            // output layer. Every layer: the projection too, the MLP's hidden layers, the ViTs'
            // Q/K/V by heads (the packed in-projection range by range).
            if layers == RefitLayers::All {
                assert!(report.refitted_layers.len() > 1, "{name}");
            } else {
                assert_eq!(report.refitted_layers.len(), 1, "{name}");
            }
            common::assert_within(&run(&merged), &run(&a), 1e-3, 1e-3, name);
        }
    }
}

/// The endpoints' outputs the refit needs are kept by calibration (no endpoint passes of its
/// own); with statistics from a shard nothing was calibrated and the refit runs the endpoints
/// itself. Both must fit the same layers: the merges agree initializer for initializer. By
/// default (`RefitLayers::Auto`) the bundled ViT's outputs of every layer fit in what
/// calibration keeps, so every layer is refitted from kept outputs.
#[test]
fn kept_and_streamed_endpoint_outputs_refit_alike() {
    let load = |tag: &str| onnx::load(common::fixture(&format!("vit_{tag}.onnx"))).unwrap();
    let models = [load("a"), load("b")];
    let calib = inputs(&models[0], "calib.npz", 500);
    let opts = MergeOptions {
        backend: BackendKind::Ort,
        ..Default::default()
    };
    let (kept, kept_report) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
    let shard = mudsc::merge::statistics(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
    let from_shard = MergeOptions {
        stats: Some(std::sync::Arc::new(shard)),
        ..opts.clone()
    };
    let (streamed, report) = merge(&models, &calib, &from_shard, &mut |_, _, _| {}).unwrap();
    assert!(kept_report.refitted_layers.len() > 1);
    assert_eq!(
        kept_report.refitted_layers.last().map(String::as_str),
        Some("head.proj.weight")
    );
    assert_eq!(report.refitted_layers, kept_report.refitted_layers);
    assert_same_initializers(&kept, &streamed);
}

/// `--refit-layers all` refits a depthwise-separable CNN's pointwise (1×1) convolutions as
/// linear layers over channels, every pixel a row: the merged model then agrees better with
/// the endpoints' mean direction on held-out images than with the head alone.
#[test]
fn pointwise_convolutions_are_refitted_as_linear_layers() {
    let (models, calib, test) = pair("dwcnn");
    let ((head, _), (deep, report)) = (
        merged(&models, &calib, 1000, RefitLayers::Output),
        merged(&models, &calib, 1000, RefitLayers::All),
    );
    let convs = refitted_convs(&models[0], &report.refitted_layers);
    assert!(convs >= 2, "{:?}", report.refitted_layers);
    let goal = mean_direction(&models, &test);
    let (alone, all) = (distance(&goal, &test, &head), distance(&goal, &test, &deep));
    eprintln!("dwcnn: squared distance, head alone {alone:.4}, pointwise convs too {all:.4}");
    assert!(
        all < alone,
        "pointwise refit {all:.4} not closer than the head alone {alone:.4}"
    );
    // The default refits every layer here too: their endpoint outputs over 1,000 images (2 ×
    // 225 KB each) fit in what calibration keeps, and kept outputs fit what streamed ones do.
    let (auto, auto_report) = merged(&models, &calib, 1000, RefitLayers::Auto);
    assert_eq!(auto_report.refitted_layers, report.refitted_layers);
    assert_same_initializers(&auto, &deep);
}

/// k×k convolutions are refitted over their input patches, and a convolution that a
/// BatchNormalization alone reads as the two together: on the BN-folded and the BN-kept
/// exports of the same ResNet-20 pair every convolution is refitted, the merged model agrees
/// better with the endpoints' mean direction on held-out images than with the head alone, and
/// the two exports end about as close (squared distances within 25 % of each other).
#[test]
fn convolutions_are_refitted_over_their_patches() {
    let mut distances = Vec::new();
    for name in ["resnet20_bn_folded", "resnet20_bn_kept"] {
        let (models, calib, test) = pair(name);
        let ((head, _), (deep, report)) = (
            merged(&models, &calib, 1000, RefitLayers::Output),
            merged(&models, &calib, 1000, RefitLayers::Auto),
        );
        let convs = models[0]
            .graph()
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some("Conv"))
            .count();
        let refitted = refitted_convs(&models[0], &report.refitted_layers);
        assert_eq!(refitted, convs, "{name}: {:?}", report.refitted_layers);
        let goal = mean_direction(&models, &test);
        let (alone, all) = (distance(&goal, &test, &head), distance(&goal, &test, &deep));
        eprintln!("{name}: squared distance, head alone {alone:.4}, every conv too {all:.4}");
        assert!(
            all < 0.9 * alone,
            "{name}: conv refit {all:.4} not clearly closer than the head alone {alone:.4}"
        );
        distances.push(all);
    }
    let (folded, kept) = (distances[0], distances[1]);
    assert!(
        (folded - kept).abs() < 0.25 * folded.max(kept),
        "folded {folded:.4} and kept {kept:.4} exports refit differently"
    );
}

/// mudsc-zip on ONNX Runtime, the layers the refit fits left to it (the default) or repaired
/// before it too.
fn merged_repairing(
    models: &[Model],
    calib: &[TensorData],
    refitted: bool,
) -> (Model, MergeReport) {
    let opts = MergeOptions {
        backend: BackendKind::Ort,
        repair_refitted: refitted,
        ..Default::default()
    };
    merge(models, calib, &opts, &mut |_, _, _| {}).unwrap()
}

/// Statistics repair leaves the layers the refit fits afterwards to it: on pairs where every
/// repaired layer is refitted (the ViT's token layers, the GroupNorm ResNet-20's
/// convolutions) nothing is repaired, and the merged model ends as close to the endpoints'
/// mean direction on held-out images as when each was repaired first (the refit replaces
/// what repair set: squared distances within 2 % of each other), and the bias-free layers to
/// which repair gave a bias get one from the refit.
#[test]
fn layers_the_refit_fits_are_not_repaired_first() {
    for name in ["vit", "resnet20_gn"] {
        let (models, calib, test) = pair(name);
        let ((left, report), (repaired, reference)) = (
            merged_repairing(&models, &calib, false),
            merged_repairing(&models, &calib, true),
        );
        assert!(report.refitted_layers.len() > 1, "{name}");
        assert_eq!(report.refitted_layers, reference.refitted_layers, "{name}");
        assert_eq!(report.repaired_layers, 0, "{name}");
        assert!(reference.repaired_layers > 1, "{name}");
        // The bias-free layers repair gave a bias have one from the refit.
        let names = |m: &Model| -> Vec<String> {
            let mut n: Vec<String> = m
                .graph()
                .initializer
                .iter()
                .filter_map(|t| t.name.clone())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&left), names(&repaired), "{name}");
        let goal = mean_direction(&models, &test);
        let (d_left, d_repaired) = (
            distance(&goal, &test, &left),
            distance(&goal, &test, &repaired),
        );
        eprintln!(
            "{name}: squared distance {d_left:.5} left to the refit, {d_repaired:.5} repaired first"
        );
        assert!(
            (d_left - d_repaired).abs() < 0.02 * d_left.max(d_repaired),
            "{name}: {d_left:.5} left to the refit against {d_repaired:.5} repaired first"
        );
    }
}

/// Where repair's pass runs anyway (on the BN-kept ResNet-20, BatchNorms whose shift is shared
/// with another are not fitted with their convolution), every layer is repaired in it as
/// before: the merge is the one that repairs the refitted layers too.
#[test]
fn a_repair_pass_that_runs_anyway_corrects_every_layer() {
    let (models, calib, _) = pair("resnet20_bn_kept");
    let ((left, report), (repaired, reference)) = (
        merged_repairing(&models, &calib, false),
        merged_repairing(&models, &calib, true),
    );
    assert!(report.reset_batch_norms > 0);
    assert_eq!(
        (report.repaired_layers, report.reset_batch_norms),
        (reference.repaired_layers, reference.reset_batch_norms)
    );
    assert_eq!(report.refitted_layers, reference.refitted_layers);
    assert_same_initializers(&left, &repaired);
}
