//! Inference: tract and ONNX Runtime agree with each other and with ONNX Runtime's Python
//! package, on the reference models and on every fixture; intermediate taps work on both.

mod common;

use std::path::Path;

use common::{assert_close, assert_within, model, ort_python_outputs};
use mudsc::data;
use mudsc::onnx::{self, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};

fn run(
    kind: BackendKind,
    m: &Path,
    input: &Path,
    extra: &[String],
) -> (Vec<String>, Vec<TensorData>) {
    let model = onnx::load(m).unwrap();
    let mut s = open_session(kind, &model, extra, &BackendOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", m.display()));
    let arrays = data::read(input).unwrap();
    let inputs = data::bind_inputs(&arrays, &model, input).unwrap();
    // Batches of 3 exercise several plans (full and last batch) and the concatenation.
    let out = run_batched(s.as_mut(), &inputs, 3).unwrap();
    (s.output_names().to_vec(), out)
}

/// tract's absolute tolerance. Its float32 normalisation kernels sum in another order than
/// ONNX Runtime's: on the GroupNorm ResNet-20 fixture (logits up to 10) tract differs from ORT by
/// 1.0e-4 at most and 2.6e-6 on average, the same with or without tract's optimiser, while ORT
/// from Rust and from Python agree within 5e-6. Every other fixture meets atol 1e-5 under tract.
const TRACT_ATOL: f32 = 2e-4;

fn compare_all(m: &Path, input: &Path) {
    let (names, tract) = run(BackendKind::Tract, m, input, &[]);
    let (_, ort) = run(BackendKind::Ort, m, input, &[]);
    let reference = ort_python_outputs(m, input);
    for ((name, t), o) in names.iter().zip(&tract).zip(&ort) {
        let want = reference.get(name).expect("reference output");
        let what = format!("{} {name}", m.display());
        assert_within(
            t,
            want,
            1e-4,
            TRACT_ATOL,
            &format!("{what}: tract vs onnxruntime"),
        );
        assert_within(t, o, 1e-4, TRACT_ATOL, &format!("{what}: tract vs ort"));
        assert_close(o, want, &format!("{what}: ort vs onnxruntime (python)"));
    }
}

#[test]
fn reference_models_agree_across_backends() {
    for (m, input) in [
        ("mlp.onnx", "mlp_input.npz"),
        ("mlp_ext.onnx", "mlp_input.npz"),
        ("convnet.onnx", "convnet_input.npz"),
        ("two_inputs.onnx", "two_inputs_input.npz"),
    ] {
        compare_all(&model(m), &model(input));
    }
}

#[test]
fn every_fixture_agrees_across_backends() {
    let fixtures = common::fixture_models();
    for (m, input) in &fixtures {
        compare_all(m, input);
    }
}

#[test]
fn intermediate_taps_on_both_backends() {
    let taps = vec!["feat".to_string(), "c".to_string()];
    let (names, tract) = run(
        BackendKind::Tract,
        &model("convnet.onnx"),
        &model("convnet_input.npz"),
        &taps,
    );
    let (names_ort, ort) = run(
        BackendKind::Ort,
        &model("convnet.onnx"),
        &model("convnet_input.npz"),
        &taps,
    );
    assert_eq!(names, vec!["logits", "feat", "c"]);
    assert_eq!(names, names_ort);
    assert_eq!(tract[1].shape(), &[7, 16, 8, 8]);
    for i in 0..3 {
        assert_close(&tract[i], &ort[i], &names[i]);
    }
    // feat = relu(...) is non-negative and not all zero: it really is the tapped tensor.
    let feat = tract[1].to_f32();
    assert!(feat.iter().all(|&v| v >= 0.0));
    assert!(feat.iter().any(|&v| v > 0.0));
    // An unknown tap is a clear error naming it.
    let m = onnx::load(model("convnet.onnx")).unwrap();
    let e = open_session(
        BackendKind::Tract,
        &m,
        &["no_such_value".into()],
        &BackendOptions::default(),
    )
    .err()
    .expect("unknown tap must fail");
    assert!(e.to_string().contains("no_such_value"), "{e}");
}

/// The convnet fixture, its graph input's name and the data bound to it.
fn convnet_and_its_input() -> (onnx::Model, String, Vec<TensorData>) {
    let m = onnx::load(model("convnet.onnx")).unwrap();
    let input = m.graph().input[0].name.clone().unwrap();
    let arrays = data::read(&model("convnet_input.npz")).unwrap();
    let fed = data::bind_inputs(&arrays, &m, &model("convnet_input.npz")).unwrap();
    (m, input, fed)
}

/// A graph input asked for as an output (the output refit reads a first layer's input, which
/// is the model's) comes back as the fed data on both engines. ONNX Runtime returns it as a
/// view of the fed buffer, gone after the run: read from there it was a use after free.
#[test]
fn a_graph_input_asked_for_as_an_output_is_the_fed_data() {
    let (_, input, fed) = convnet_and_its_input();
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let (names, out) = run(
            kind,
            &model("convnet.onnx"),
            &model("convnet_input.npz"),
            std::slice::from_ref(&input),
        );
        assert_eq!(names, vec!["logits".to_string(), input.clone()], "{kind:?}");
        assert_eq!(out[1].shape(), fed[0].shape(), "{kind:?}");
        assert_within(&out[1], &fed[0], 0.0, 0.0, &format!("{kind:?} input"));
    }
}

/// Outputs read where the engine left them (`run_lent`: ONNX Runtime lends its f32 values)
/// equal the copied ones, and stay valid after the next run, a graph input asked for as an
/// output included (ONNX Runtime's is a view of the fed buffer).
#[test]
fn outputs_read_in_place_equal_copies_and_outlive_the_next_run() {
    let (m, input, fed) = convnet_and_its_input();
    let zeros: Vec<TensorData> = fed
        .iter()
        .map(|t| TensorData::F32(ndarray::ArrayD::zeros(t.shape())))
        .collect();
    let extra = ["feat".to_string(), "c".to_string(), input];
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let mut s = open_session(kind, &m, &extra, &BackendOptions::default()).unwrap();
        let copied = s.run(&fed).unwrap();
        let lent = s.run_lent(&fed).unwrap();
        // Another batch runs (other data through the same buffers) before they are read.
        s.run_lent(&zeros).unwrap();
        assert_eq!(copied.len(), lent.len(), "{kind:?}");
        for (k, (c, l)) in copied.iter().zip(&lent).enumerate() {
            let l = l.to_tensor();
            assert_eq!(c.shape(), l.shape(), "{kind:?} output {k}");
            assert_within(c, &l, 0.0, 0.0, &format!("{kind:?} output {k}"));
            assert!(
                c.to_f32().iter().any(|&v| v != 0.0),
                "{kind:?} output {k} is zeros"
            );
        }
        #[cfg(feature = "ort")]
        if kind == BackendKind::Ort {
            let in_place = lent
                .iter()
                .filter(|o| matches!(o, mudsc::runtime::Output::Lent(_)))
                .count();
            assert_eq!(in_place, 3, "ONNX Runtime lends its computed f32 outputs");
        }
    }
}

/// A session asked only for a value early in the graph (the output refit's passes) runs only
/// the nodes that value needs on both engines: ONNX Runtime itself runs every node of its
/// graph, so mudsc hands it the pruned graph. Past the tapped value the model gets a node
/// no engine implements: a session that kept it would fail.
#[test]
fn a_session_for_an_early_value_runs_only_the_nodes_it_needs() {
    use mudsc::onnx::proto::{NodeProto, OperatorSetIdProto, ValueInfoProto};
    let (full, _, fed) = convnet_and_its_input();
    let mut poisoned = full.clone();
    poisoned.proto.opset_import.push(OperatorSetIdProto {
        domain: Some("mudsc.test".into()),
        version: Some(1),
    });
    let graph = poisoned.proto.graph.as_mut().unwrap();
    graph.node.push(NodeProto {
        op_type: Some("NoSuchOp".into()),
        domain: Some("mudsc.test".into()),
        input: vec!["logits".into()],
        output: vec!["poisoned".into()],
        name: Some("poison".into()),
        ..Default::default()
    });
    let only = |name: &str| {
        vec![ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }]
    };
    let options = BackendOptions::default();
    for kind in [BackendKind::Tract, BackendKind::Ort] {
        let mut whole = poisoned.clone();
        whole.proto.graph.as_mut().unwrap().output = only("poisoned");
        let ran = open_session(kind, &whole, &[], &options).and_then(|mut s| s.run(&fed));
        assert!(
            ran.is_err(),
            "{kind:?}: the poison node fails where it is run"
        );
        let mut early = poisoned.clone();
        early.proto.graph.as_mut().unwrap().output = only("feat");
        let mut s = open_session(kind, &early, &["c".into()], &options)
            .unwrap_or_else(|e| panic!("{kind:?}: the pruned graph opens: {e}"));
        assert_eq!(s.output_names(), ["feat", "c"], "{kind:?}");
        let got = s.run(&fed).unwrap();
        let mut reference =
            open_session(kind, &full, &["feat".into(), "c".into()], &options).unwrap();
        let want = reference.run(&fed).unwrap();
        assert_within(&got[0], &want[1], 0.0, 0.0, &format!("{kind:?} feat"));
        assert_within(&got[1], &want[2], 0.0, 0.0, &format!("{kind:?} c"));
    }
}

#[test]
fn test_data_set_directory_input() {
    let (_, from_dir) = run(
        BackendKind::Tract,
        &model("convnet.onnx"),
        &model("convnet_test_data_set_0"),
        &[],
    );
    let (_, from_npz) = run(
        BackendKind::Tract,
        &model("convnet.onnx"),
        &model("convnet_input.npz"),
        &[],
    );
    assert_eq!(from_dir, from_npz);
}

#[test]
fn wrong_input_shape_is_an_error() {
    let m = onnx::load(model("convnet.onnx")).unwrap();
    let mut s = open_session(BackendKind::Tract, &m, &[], &BackendOptions::default()).unwrap();
    let bad = TensorData::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[2, 5, 8, 8])));
    assert!(s.run(&[bad]).is_err());
}
