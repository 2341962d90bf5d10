//! The method comparison of the MuDSC paper, on the bundled trained pairs: per-task mean and
//! joint accuracy on the test set are ordered mudsc-zip ≥ zipit ≥ act-align ≥ avg, each "≥"
//! allowing two points (the binomial sampling error of an accuracy near 50 % on 2,000 test
//! images is ±1.1 points; the measured exceptions within that: on the MLP zipit's joint
//! accuracy sits 0.6 above mudsc-zip's, on the GroupNorm ResNet zipit's task mean 1.7 above,
//! on the ViT observed at every token zipit's joint 1.5 below act-align's), and MuDSC's merge
//! beats plain averaging by a clear margin (5 points joint). Merges run on ONNX Runtime, ten
//! times faster than tract on the ResNets, to keep CI short. The method comparisons run without
//! the output refit (`--output-fit 0`): it refits every method's head to the endpoints and
//! narrows their differences (MLP joint: avg 69.8, act-align 70.9, zipit 71.7, mudsc-zip
//! 71.1 with it), which is not the matching quality these tests order.

mod common;

use mudsc::data;
use mudsc::eval::{evaluate, ClassRange};
use mudsc::merge::{merge, MergeOptions, Method};
use mudsc::onnx::{self, Model};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};

fn task_mean_accuracy(model: &Model) -> f64 {
    100.0 * scores(model).task_mean.unwrap()
}

fn joint_accuracy(model: &Model) -> f64 {
    scores(model).top1.value()
}

fn scores(model: &Model) -> mudsc::eval::EvalReport {
    scores_of(&[model], "0-4,5-9")
}

/// Accuracy on the bundled test set of the sum of `models`' logits (one model: its own).
fn scores_of(models: &[&Model], tasks: &str) -> mudsc::eval::EvalReport {
    let path = common::root().join("fixtures/data/test.npz");
    let mut arrays = data::read(&path).unwrap();
    let labels = data::take_labels(&mut arrays, "labels", &path).unwrap();
    let mut sum: Option<ndarray::Array2<f32>> = None;
    for model in models {
        let inputs = data::bind_inputs(&arrays, model, &path).unwrap();
        let mut s = open_session(BackendKind::Ort, model, &[], &BackendOptions::default()).unwrap();
        let out = run_batched(s.as_mut(), &inputs, 256).unwrap();
        let logits = out[0]
            .to_f32()
            .into_dimensionality::<ndarray::Ix2>()
            .unwrap();
        sum = Some(match sum {
            None => logits,
            Some(acc) => acc + &logits,
        });
    }
    let tasks = ClassRange::parse_list(tasks).unwrap();
    evaluate(sum.unwrap().view(), &labels, &tasks, None).unwrap()
}

#[test]
fn mudsc_zip_beats_zipit_beats_act_align_beats_averaging() {
    let calib_path = common::root().join("fixtures/data/calib.npz");
    let calib_arrays = data::read(&calib_path).unwrap();
    for pair in [
        "mlp",
        "resnet20_bn_folded",
        "resnet20_bn_kept",
        "resnet20_bn_dynamo",
        "resnet20_gn",
        "vit",
    ] {
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
                output_fit_samples: 0,
                ..Default::default()
            };
            let (merged, _) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
            let r = scores(&merged);
            acc.push((
                method.name(),
                100.0 * r.task_mean.unwrap(),
                100.0 * r.top1.value(),
            ));
        }
        eprintln!("{pair} (task mean, joint): {acc:?}");
        // On the ViT, ZipIt's joint accuracy falls below activation alignment's (23.6 against
        // 30.4 %, task means 44.9 and 46.6 %): the paper's ordering is for CNNs, and ZipIt
        // never handled attention. There mudsc-zip must still beat each method below it.
        let pairs: Vec<(usize, usize)> = if pair == "vit" {
            vec![(0, 1), (0, 2), (1, 3), (2, 3)]
        } else {
            vec![(0, 1), (1, 2), (2, 3)]
        };
        for w in pairs.iter().map(|&(lo, hi)| [acc[lo], acc[hi]]) {
            for (measure, get) in [
                ("task mean", (|a: &(&str, f64, f64)| a.1) as fn(&_) -> f64),
                ("joint", |a: &(&str, f64, f64)| a.2),
            ] {
                assert!(
                    get(&w[1]) >= get(&w[0]) - 2.0,
                    "{pair}: {measure} of {} ({:.1} %) below {} ({:.1} %)",
                    w[1].0,
                    get(&w[1]),
                    w[0].0,
                    get(&w[0])
                );
            }
        }
        assert!(
            acc[3].2 >= acc[0].2 + 5.0,
            "{pair}: mudsc-zip {:.1} % is not clearly above avg {:.1} % (joint)",
            acc[3].2,
            acc[0].2
        );
    }
}

/// The same ResNet-20 pair exported with its BatchNorms folded and kept merges equally well:
/// a kept BatchNorm is compared and averaged as its folded layer (`merge::bn_fold`), so the
/// loop sees the folded export's similarities (its mean merge values agree sweep by sweep).
/// Before that, the kept export merged 11 points below the folded one (65.9 % against 77.1 %
/// task mean, joint 45.5 % against 52.8 % after a first fix of the similarity alone); over
/// five loop seeds the joint accuracies now average 50.1 % kept and 50.3 % folded. Two points
/// allow for the binomial error (±1.1 points on 2,000 images).
#[test]
fn batchnorm_kept_merges_as_well_as_batchnorm_folded() {
    let calib_path = common::root().join("fixtures/data/calib.npz");
    let calib_arrays = data::read(&calib_path).unwrap();
    let accuracy = |pair: &str| {
        let load = |tag: &str| {
            onnx::load(common::root().join(format!("fixtures/models/{pair}_{tag}.onnx"))).unwrap()
        };
        let models = [load("a"), load("b")];
        let calib = data::bind_inputs(&calib_arrays, &models[0], &calib_path).unwrap();
        let opts = MergeOptions {
            backend: BackendKind::Ort,
            ..Default::default()
        };
        let (merged, _) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
        100.0 * joint_accuracy(&merged)
    };
    let (kept, folded) = (accuracy("resnet20_bn_kept"), accuracy("resnet20_bn_folded"));
    eprintln!("mudsc-zip joint accuracy: BN kept {kept:.2} %, folded {folded:.2} %");
    assert!(
        kept >= folded - 2.0,
        "BatchNorm kept {kept:.1} % is more than 2 points below folded {folded:.1} %"
    );
}

/// Observing the class-token groups at every token (`token_taps`, the default) lifts the ViT
/// with packed attention projections (nn.MultiheadAttention's in-projection). Measured at the
/// default seed: 28.8 → 47.8 % task mean when the packed projection was one fixed block; now
/// that it has its Q/K and V/O groups and token-layer repair reaches it, 46.8 → 50.1 %.
#[test]
fn token_taps_lift_the_packed_attention_vit() {
    let calib_path = common::root().join("fixtures/data/calib.npz");
    let calib_arrays = data::read(&calib_path).unwrap();
    let load = |tag: &str| {
        onnx::load(common::root().join(format!("fixtures/models/vit_mha_{tag}.onnx"))).unwrap()
    };
    let models = [load("a"), load("b")];
    let calib = data::bind_inputs(&calib_arrays, &models[0], &calib_path).unwrap();
    let task_mean = |token_taps: bool| {
        let opts = MergeOptions {
            token_taps,
            backend: BackendKind::Ort,
            // The matching's own effect: the output refit, refitting every layer of this
            // model by default, brings both to about 78.7 % (one tap 78.8, token taps 78.6).
            output_fit_samples: 0,
            ..Default::default()
        };
        let (merged, _) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
        task_mean_accuracy(&merged)
    };
    let (one, tokens) = (task_mean(false), task_mean(true));
    eprintln!("vit_mha mudsc-zip task mean: one tap {one:.2} %, token taps {tokens:.2} %");
    assert!(
        tokens >= one + 2.0,
        "token taps {tokens:.1} % not clearly above one tap {one:.1} %"
    );
}

/// Three models, one per task of three (Fashion-MNIST {0,1,2}, {3,4,5}, {6,…,9}, different
/// inits): the pair ordering holds, zip keeps most of the ensemble (the sum of the three
/// models' logits, computed here), and averaging does not. Measured task means (%): mlp3 avg
/// 79.6, act-align 91.4, mudsc-zip 95.9, ensemble 96.0; resnet20_bn3 avg 34.3, act-align 69.4,
/// mudsc-zip 83.9, ensemble 94.3.
#[test]
fn three_models_merge_in_the_pairs_order() {
    let calib_path = common::root().join("fixtures/data/calib.npz");
    let calib_arrays = data::read(&calib_path).unwrap();
    let tasks = "0-2,3-5,6-9";
    for set in ["mlp3", "resnet20_bn3"] {
        let models: Vec<Model> = ["a", "b", "c"]
            .iter()
            .map(|t| {
                onnx::load(common::root().join(format!("fixtures/models/{set}_{t}.onnx"))).unwrap()
            })
            .collect();
        let calib = data::bind_inputs(&calib_arrays, &models[0], &calib_path).unwrap();
        let ensemble = 100.0
            * scores_of(&models.iter().collect::<Vec<_>>(), tasks)
                .task_mean
                .unwrap();
        let mut acc = Vec::new();
        for method in [Method::Avg, Method::ActAlign, Method::MudscZip] {
            let opts = MergeOptions {
                method,
                backend: BackendKind::Ort,
                output_fit_samples: 0,
                ..Default::default()
            };
            let (merged, _) = merge(&models, &calib, &opts, &mut |_, _, _| {}).unwrap();
            acc.push((
                method.name(),
                100.0 * scores_of(&[&merged], tasks).task_mean.unwrap(),
            ));
        }
        eprintln!("{set} (task mean; ensemble {ensemble:.1}): {acc:?}");
        for w in acc.windows(2) {
            assert!(
                w[1].1 >= w[0].1 - 2.0,
                "{set}: {} ({:.1} %) below {} ({:.1} %)",
                w[1].0,
                w[1].1,
                w[0].0,
                w[0].1
            );
        }
        assert!(
            acc[2].1 >= acc[0].1 + 10.0,
            "{set}: mudsc-zip not above avg: {acc:?}"
        );
        assert!(
            acc[2].1 >= ensemble - 12.0,
            "{set}: mudsc-zip {:.1} % far below the ensemble {ensemble:.1} %",
            acc[2].1
        );
    }
}
