//! The merge, end to end: merging a model with a randomly permuted copy of itself must give
//! the model back (alignment and zip both find the permutation, and the rewrite undoes it);
//! the output is valid ONNX that ONNX Runtime runs like tract; every method runs; same seed,
//! same bytes; bad input is refused.

mod common;

use std::path::{Path, PathBuf};

use mudsc::data;
use mudsc::graph::infer_shapes;
use mudsc::merge::{merge, MergeOptions, Method};
use mudsc::onnx::{self, Model, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use mudsc::symmetry::check::permuted_model;
use mudsc::symmetry::discover;
use mudsc::symmetry::permute::random_assignment;

fn fixture(name: &str) -> PathBuf {
    common::root().join("fixtures/models").join(name)
}

fn calib(model: &Model, rows: usize) -> Vec<TensorData> {
    let p = common::root().join("fixtures/data/calib.npz");
    common::head_rows(
        &data::bind_inputs(&data::read(&p).unwrap(), model, &p).unwrap(),
        rows,
    )
}

fn outputs(model: &Model, inputs: &[TensorData]) -> Vec<TensorData> {
    let mut s = open_session(BackendKind::Tract, model, &[], &BackendOptions::default()).unwrap();
    run_batched(s.as_mut(), inputs, 64).unwrap()
}

fn max_diff(a: &[TensorData], b: &[TensorData]) -> f32 {
    let (a, b) = (a[0].to_f32(), b[0].to_f32());
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Share of samples whose top-1 class is the same in both outputs.
fn argmax_agreement(a: &[TensorData], b: &[TensorData]) -> f64 {
    let (a, b) = (a[0].to_f32(), b[0].to_f32());
    let (a, b) = (
        a.view().into_dimensionality::<ndarray::Ix2>().unwrap(),
        b.view().into_dimensionality::<ndarray::Ix2>().unwrap(),
    );
    let top = |r: ndarray::ArrayView1<f32>| {
        r.iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0
    };
    let same = a
        .rows()
        .into_iter()
        .zip(b.rows())
        .filter(|(x, y)| top(*x) == top(*y))
        .count();
    same as f64 / a.nrows() as f64
}

/// A copy of `model` with every discovered group randomly permuted.
fn permuted_copy(model: &Model, inputs: &[TensorData]) -> Model {
    let shapes = data::input_shapes(model, Some(inputs), &[], 1).unwrap();
    let d = discover(model, &infer_shapes(model, &shapes).unwrap()).unwrap();
    let a = random_assignment(&d.structure, &d.leaves(), 99);
    permuted_model(model, &d, &a).unwrap()
}

#[test]
fn merging_with_a_permuted_copy_gives_the_model_back() {
    for name in [
        "vit_a.onnx",
        "dwcnn_a.onnx",
        "mlp_a.onnx",
        "resnet20_bn_folded_a.onnx",
        "resnet20_gn_a.onnx",
    ] {
        let a = onnx::load(fixture(name)).unwrap();
        let inputs = calib(&a, 256);
        let b = permuted_copy(&a, &inputs);
        let want = outputs(&a, &inputs);
        // The permuted copy is the same function but different weights.
        assert!(
            max_diff(&outputs(&b, &inputs), &want) < 1e-3,
            "{name}: permuted copy differs"
        );
        let (avg, _) = merge(
            &[a.clone(), b.clone()],
            &inputs,
            &MergeOptions {
                method: Method::Avg,
                ..Default::default()
            },
            &mut |_, _, _| {},
        )
        .unwrap();
        assert!(
            max_diff(&outputs(&avg, &inputs), &want) > 1e-2,
            "{name}: plain averaging should not recover the model"
        );
        for method in [
            Method::ActAlign,
            Method::Zipit,
            Method::MudscAlign,
            Method::MudscZip,
            Method::Rebasin,
        ] {
            // Weight matching alone is a local search from unaligned neighbours; on the ViT it
            // stalls far from the permutation (as Git Re-Basin does on transformers), which is
            // why MuDSC starts from activations.
            if method == Method::Rebasin && name.starts_with("vit") {
                continue;
            }
            let opts = MergeOptions {
                method,
                max_sweeps: 30,
                ..Default::default()
            };
            let (merged, report) =
                merge(&[a.clone(), b.clone()], &inputs, &opts, &mut |_, _, _| {}).unwrap();
            let got = outputs(&merged, &inputs);
            if matches!(method, Method::Zipit | Method::MudscZip) {
                // Zip may also fuse two units of one model whose activations are perfectly
                // correlated on the calibration data (units active on one sample only), which
                // is lossy by design: the predictions must still agree.
                let agree = argmax_agreement(&got, &want);
                assert!(
                    agree >= 0.98,
                    "{name} {}: predictions agree on {agree}",
                    method.name()
                );
            } else {
                let diff = max_diff(&got, &want);
                assert!(
                    diff < 1e-3,
                    "{name} {}: merged differs from the model by {diff}: {:?}",
                    method.name(),
                    report
                        .groups
                        .iter()
                        .map(|g| (g.id, g.merge_value, g.similarity.clone()))
                        .collect::<Vec<_>>()
                );
            }
            // Units dead on the calibration data correlate 0 with everything, so a group's
            // mean similarity can be below 1 even when the merge is exact.
            for g in &report.groups {
                assert!(
                    g.merge_value > 0.5,
                    "{name} {}: group {} matched at {}",
                    method.name(),
                    g.id,
                    g.merge_value
                );
            }
        }
    }
}
