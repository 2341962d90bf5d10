//! Symmetry discovery, proved on the models themselves: every discovered group, permuted at
//! random, leaves the outputs unchanged (ONNX Runtime), and leaving out any one member of a
//! group changes them (the coupling is real). Counts are compared with the hand-written specs
//! of the reference implementation.

mod common;

use std::collections::HashMap;
use std::path::Path;

use mudsc::data;
use mudsc::graph::infer_shapes;
use mudsc::onnx::{self, Model, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use mudsc::symmetry::check::{check, permuted_model};
use mudsc::symmetry::permute::random_assignment;
use mudsc::symmetry::{discover, Discovery, GroupKind};

/// Discovery plus the inputs it was run with (given data, or random data of batch 2).
fn discover_with(
    model: &Model,
    data_path: Option<&Path>,
    rows: usize,
) -> (Discovery, Vec<TensorData>) {
    let inputs = match data_path {
        Some(p) => common::head_rows(
            &data::bind_inputs(&data::read(p).unwrap(), model, p).unwrap(),
            rows,
        ),
        None => {
            let shapes = data::input_shapes(model, None, &[], 2).unwrap();
            data::random_inputs(model, &shapes, 7).unwrap()
        }
    };
    let shapes = data::input_shapes(model, Some(&inputs), &[], 1).unwrap();
    let values = infer_shapes(model, &shapes).unwrap();
    (discover(model, &values).unwrap(), inputs)
}

fn outputs(model: &Model, inputs: &[TensorData]) -> Vec<TensorData> {
    let mut s = open_session(BackendKind::Ort, model, &[], &BackendOptions::default()).unwrap();
    run_batched(s.as_mut(), inputs, 64).unwrap()
}

fn max_diff(a: &[TensorData], b: &[TensorData]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            let (x, y) = (x.to_f32(), y.to_f32());
            x.iter()
                .zip(y.iter())
                .map(|(p, q)| (p - q).abs())
                .collect::<Vec<_>>()
        })
        .fold(0.0, f32::max)
}

fn assert_check_passes(model: &Model, d: &Discovery, inputs: &[TensorData], what: &str) {
    let trials = check(
        model,
        d,
        inputs,
        2,
        11,
        BackendKind::Ort,
        &BackendOptions::default(),
    )
    .unwrap();
    for t in &trials {
        assert!(
            t.passed,
            "{what}: seed {} differs by {}",
            t.seed, t.max_abs_diff
        );
    }
}

/// Permute everything, then put one member tensor back as it was: the model must change.
fn assert_every_member_is_needed(model: &Model, d: &Discovery, inputs: &[TensorData], what: &str) {
    let want = outputs(model, inputs);
    let assignment = random_assignment(&d.structure, &d.leaves(), 5);
    let permuted = permuted_model(model, d, &assignment).unwrap();
    let original: HashMap<String, onnx::proto::TensorProto> = model
        .graph()
        .initializer
        .iter()
        .map(|t| (t.name.clone().unwrap(), t.clone()))
        .collect();
    let mut seen = std::collections::HashSet::new();
    for g in &d.groups {
        for m in &g.members {
            if !seen.insert(m.tensor.clone()) {
                continue;
            }
            let mut wrong = permuted.clone();
            let t = wrong
                .proto
                .graph
                .as_mut()
                .unwrap()
                .initializer
                .iter_mut()
                .find(|t| t.name.as_deref() == Some(&m.tensor))
                .unwrap();
            let moved = TensorData::from_proto(t).unwrap();
            if moved == TensorData::from_proto(&original[&m.tensor]).unwrap() {
                continue; // uniform along the axis (an all-ones scale): no wrong version exists
            }
            *t = original[&m.tensor].clone();
            let diff = max_diff(&outputs(&wrong, inputs), &want);
            assert!(
                diff > 1e-3,
                "{what}: leaving '{}' unpermuted changed nothing ({diff})",
                m.tensor
            );
        }
    }
}

#[test]
fn each_rule_finds_its_groups_and_only_sound_ones() {
    let dir = common::rule_models();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    for (name, exp) in expected.as_object().unwrap() {
        if name == "unknown_op" {
            continue; // not runnable: see unknown_ops_are_fixed_not_errors
        }
        let model = onnx::load(dir.join(format!("{name}.onnx"))).unwrap();
        let (d, inputs) = discover_with(&model, None, 0);
        let blocked = d
            .groups
            .iter()
            .filter(|g| matches!(g.kind, GroupKind::Blocked { .. }))
            .count();
        assert_eq!(
            d.groups.len() as u64,
            exp["groups"].as_u64().unwrap(),
            "{name}: group count"
        );
        assert_eq!(
            blocked as u64,
            exp["blocked"].as_u64().unwrap(),
            "{name}: blocked groups"
        );
        assert_check_passes(&model, &d, &inputs, name);
        assert_every_member_is_needed(&model, &d, &inputs, name);
    }
}

/// Blocked groups (GroupNorm groups) admit only block-respecting permutations: a random
/// permutation of the whole channel axis, applied by hand to every member, breaks the model;
/// a permutation of groups composed with one inside each group does not.
#[test]
fn group_norm_needs_block_respecting_permutations() {
    for name in ["groupnorm_op21", "groupnorm_instancenorm"] {
        let model = onnx::load(common::rule_models().join(format!("{name}.onnx"))).unwrap();
        let (d, inputs) = discover_with(&model, None, 0);
        let g = &d.groups[0];
        let GroupKind::Blocked {
            blocks, block_size, ..
        } = g.kind
        else {
            panic!("{name}: not blocked")
        };
        assert_eq!((blocks, block_size), (2, 4));
        let want = outputs(&model, &inputs);
        // Within blocks: swap groups and reverse inside each.
        let respecting: Vec<usize> = (0..8).map(|i| (1 - i / 4) * 4 + (3 - i % 4)).collect();
        // Across blocks: channels 3 and 4 trade places.
        let mut crossing: Vec<usize> = (0..8).collect();
        crossing.swap(3, 4);
        for (perm, should_match) in [(respecting, true), (crossing, false)] {
            let mut m = model.clone();
            for t in &mut m.proto.graph.as_mut().unwrap().initializer {
                let name_t = t.name.clone().unwrap();
                let Some(member) = g.members.iter().find(|x| x.tensor == name_t && x.size == 8)
                else {
                    continue;
                };
                let TensorData::F32(a) = TensorData::from_proto(t).unwrap() else {
                    panic!()
                };
                let mut b = a.clone();
                for (i, &p) in perm.iter().enumerate() {
                    b.index_axis_mut(ndarray::Axis(member.axis), p)
                        .assign(&a.index_axis(ndarray::Axis(member.axis), i));
                }
                *t = TensorData::F32(b).to_proto(&name_t);
            }
            let diff = max_diff(&outputs(&m, &inputs), &want);
            assert_eq!(diff < 1e-4, should_match, "{name}: diff {diff}");
        }
    }
}

#[test]
fn unknown_ops_are_fixed_not_errors() {
    let model = onnx::load(common::rule_models().join("unknown_op.onnx")).unwrap();
    let shapes = data::input_shapes(&model, None, &[], 2).unwrap();
    let d = discover(&model, &infer_shapes(&model, &shapes).unwrap()).unwrap();
    assert_eq!(d.unknown_ops.get("my.domain::Mystery"), Some(&1));
    let fixed_w2 = d
        .fixed
        .iter()
        .find(|f| f.tensor == "w2" && f.axis == 0)
        .expect("w2 output fixed");
    assert!(
        fixed_w2.reasons.iter().any(|r| r.contains("Mystery")),
        "{:?}",
        fixed_w2.reasons
    );
    // The conv before it keeps its freedom.
    assert_eq!(d.groups.len(), 1);
    assert!(d.groups[0]
        .members
        .iter()
        .any(|m| m.tensor == "w1" && m.axis == 0));
}

#[test]
fn every_fixture_and_zoo_model_passes_check() {
    let fixtures = common::fixture_models();
    assert!(fixtures.len() >= 20, "fixtures missing");
    for (path, input) in fixtures {
        let model = onnx::load(&path).unwrap();
        let (d, inputs) = discover_with(&model, Some(&input), 32);
        assert!(!d.groups.is_empty(), "{}: no groups", path.display());
        assert_check_passes(&model, &d, &inputs, &path.display().to_string());
    }
}

fn fixture_discovery(name: &str) -> Discovery {
    let path = common::root().join("fixtures/models").join(name);
    let model = onnx::load(&path).unwrap();
    discover_with(
        &model,
        Some(&common::root().join("fixtures/data/calib.npz")),
        2,
    )
    .0
}

/// The reference's hand spec for ResNet-20 with projection shortcuts: 3 stage streams and 9
/// inner groups, plus (ours) the embedding projection before the fixed class embedding.
#[test]
fn resnet20_matches_the_hand_spec() {
    for name in [
        "resnet20_bn_folded_a.onnx",
        "resnet20_bn_kept_a.onnx",
        "resnet20_bn_dynamo_a.onnx",
        "resnet20_gn_a.onnx",
    ] {
        let d = fixture_discovery(name);
        assert_eq!(d.groups.len(), 13, "{name}");
        // A stage stream reaches every block of its stage: far more members than an inner
        // group (conv, bias or norm parameters, next conv) or the embedding projection.
        let streams = d.groups.iter().filter(|g| g.members.len() > 6).count();
        assert_eq!(streams, 3, "{name}: stage streams");
        let widths: Vec<usize> = d.groups.iter().map(|g| g.width).collect();
        assert_eq!(
            widths.iter().filter(|&&w| w == 16).count(),
            4,
            "{name}: {widths:?}"
        );
        assert_eq!(
            widths.iter().filter(|&&w| w == 32).count(),
            4,
            "{name}: {widths:?}"
        );
        if name.contains("gn") {
            let blocked = d
                .groups
                .iter()
                .filter(|g| matches!(g.kind, GroupKind::Blocked { blocks: 4, .. }))
                .count();
            assert_eq!(blocked, 12, "{name}: every conv group is GroupNorm-blocked");
        }
    }
}

/// ViT: one residual stream, and per block a Q/K group, a V/O group (both head-blocked, sharing
/// the head order) and an MLP group; plus the head's projection. The same with separate
/// projections (vit) and with nn.MultiheadAttention's packed in-projection (vit_mha).
#[test]
fn vit_matches_the_hand_spec() {
    for name in ["vit_a.onnx", "vit_mha_a.onnx"] {
        let d = fixture_discovery(name);
        let blocked: Vec<_> = d
            .groups
            .iter()
            .filter_map(|g| match &g.kind {
                GroupKind::Blocked {
                    blocks,
                    block_perm_shared_with,
                    ..
                } => Some((*blocks, block_perm_shared_with.len())),
                _ => None,
            })
            .collect();
        let mlp = d
            .groups
            .iter()
            .filter(|g| g.width == 128 && matches!(g.kind, GroupKind::Plain))
            .count();
        let residual = d.groups.iter().max_by_key(|g| g.members.len()).unwrap();
        assert_eq!(residual.width, 64, "{name}");
        assert!(
            residual.members.len() > 20,
            "{name}: residual stream spans the depth"
        );
        // vit_mha packs Q, K and V into one in-projection, stacked on a [3, …] axis and taken
        // apart by Gather: it must get the same two groups per block as separate projections.
        assert_eq!(d.groups.len(), 1 + 4 * 3 + 1, "{name}");
        assert_eq!(
            blocked,
            vec![(4, 1); 8],
            "{name}: Q/K and V/O per block, sharing heads"
        );
        assert_eq!(mlp, 4, "{name}");
    }
}

#[test]
fn groups_json_feeds_back_as_an_override() {
    let bin = env!("CARGO_BIN_EXE_mudsc");
    let model = common::rule_models().join("concat_split.onnx");
    let out = std::process::Command::new(bin)
        .args(["groups", "--json", model.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spec["format"], "mudsc-groups/1");
    assert_eq!(spec["groups"].as_array().unwrap().len(), 4);
    spec["groups"][0]["fixed"] = serde_json::Value::Bool(true);
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "groups",
            "--json",
            model.to_str().unwrap(),
            "--groups",
            spec_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after["groups"].as_array().unwrap().len(), 3);
    // A document of another format is refused with the file named.
    std::fs::write(&spec_path, br#"{"format": "other", "groups": []}"#).unwrap();
    let out = std::process::Command::new(bin)
        .args([
            "groups",
            model.to_str().unwrap(),
            "--groups",
            spec_path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.json"));
}
