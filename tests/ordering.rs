//! The method comparison of the MuDSC paper, on the bundled trained pairs: joint accuracy on
//! the test set is ordered mudsc-zip ≥ zipit ≥ act-align ≥ avg, and MuDSC's merge beats plain
//! averaging by a clear margin. Each "≥" allows one point: the binomial sampling error of an
//! accuracy near 50 % on 2,000 test images is ±1.1 points, and on the MLP zipit's joint
//! accuracy sits 0.6 points above mudsc-zip's (their per-task means are in order). Merges run
//! on ONNX Runtime, ten times faster than tract on the ResNets, to keep CI short.

mod common;

use mudsc::data;
use mudsc::eval::{evaluate, ClassRange};
use mudsc::merge::{merge, MergeOptions, Method};
use mudsc::onnx::{self, Model};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};

fn joint_accuracy(model: &Model) -> f64 {
    let path = common::root().join("fixtures/data/test.npz");
    let mut arrays = data::read(&path).unwrap();
    let labels = data::take_labels(&mut arrays, "labels", &path).unwrap();
    let inputs = data::bind_inputs(&arrays, model, &path).unwrap();
    let mut s = open_session(BackendKind::Ort, model, &[], &BackendOptions::default()).unwrap();
    let out = run_batched(s.as_mut(), &inputs, 256).unwrap();
    let logits = out[0]
        .to_f32()
        .into_dimensionality::<ndarray::Ix2>()
        .unwrap();
    let tasks = ClassRange::parse_list("0-4,5-9").unwrap();
    evaluate(logits.view(), &labels, &tasks, None)
        .unwrap()
        .top1
        .value()
}

#[test]
fn mudsc_zip_beats_zipit_beats_act_align_beats_averaging() {
    let calib_path = common::root().join("fixtures/data/calib.npz");
    let calib_arrays = data::read(&calib_path).unwrap();
    for pair in ["mlp", "resnet20_bn_folded", "resnet20_gn", "vit"] {
        let load = |tag: &str| {
            onnx::load(common::root().join(format!("fixtures/models/{pair}_{tag}.onnx"))).unwrap()
        };
        let models = [load("a"), load("b")];
        let calib = data::bind_inputs(&calib_arrays, &models[0], &calib_path).unwrap();
        let mut acc = Vec::new();
        for method in [
            Method::Avg,
            Method::ActAlign,
            Method::Zipit,
            Method::MudscZip,
        ] {
            let opts = MergeOptions {
                method,
                backend: BackendKind::Ort,
                ..Default::default()
            };
            let (merged, _) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
            acc.push((method.name(), 100.0 * joint_accuracy(&merged)));
        }
        eprintln!("{pair}: {acc:?}");
        for w in acc.windows(2) {
            assert!(
                w[1].1 >= w[0].1 - 1.0,
                "{pair}: {} ({:.1} %) below {} ({:.1} %)",
                w[1].0,
                w[1].1,
                w[0].0,
                w[0].1
            );
        }
        assert!(
            acc[3].1 >= acc[0].1 + 5.0,
            "{pair}: mudsc-zip {:.1} % is not clearly above avg {:.1} %",
            acc[3].1,
            acc[0].1
        );
    }
}
