//! `merge --width`: zip to more merged units than one model has. At the number of models no
//! unit is merged (every unit keeps its own weights: checked against the inputs' rows); in
//! between, the merged model is valid ONNX that ONNX Runtime runs, its widenable groups have the
//! asked width and the others one model's (with the reason in the report), and accuracy grows
//! with the width on the BN ResNet. A ViT's residual stream widens through the reshapes that
//! read its width (a permuted copy merged at width 2 keeps the model's stream exactly). Bad
//! widths are refused.

mod common;

use common::{calib_set, eval_tasks, fixture, merge_cli, task_mean};

use mudsc::data;
use mudsc::merge::{merge, MergeOptions, MergeReport, Method};
use mudsc::onnx::{self, Model, TensorData};
use mudsc::runtime::{open_session, run_batched, BackendKind, BackendOptions};

/// Merges a pair at `width`; returns the merged model, its report and its task mean (%).
fn merged(pair: &str, width: &str, extra: &[&str]) -> (Model, serde_json::Value, f64) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let report = dir.path().join("r.json");
    let calib = calib_set();
    let (a, b) = (
        fixture(&format!("{pair}_a.onnx")),
        fixture(&format!("{pair}_b.onnx")),
    );
    let mut args = vec![
        "--calib",
        calib.to_str().unwrap(),
        "--width",
        width,
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend(extra);
    let r = merge_cli(&a, &b, &out, &args);
    assert!(
        r.status.success(),
        "{pair} {width}: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    (onnx::load(&out).unwrap(), r, task_mean(&out))
}

fn rows(m: &Model, name: &str) -> Vec<Vec<f32>> {
    let t = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap();
    let a = TensorData::from_proto(t).unwrap().to_f32();
    a.outer_iter()
        .map(|r| r.iter().copied().collect())
        .collect()
}

#[test]
fn at_the_number_of_models_every_unit_keeps_its_own_weights() {
    let (m, report, _) = merged("mlp", "2", &["--repair-samples", "0"]);
    let (a, b) = (
        onnx::load(fixture("mlp_a.onnx")).unwrap(),
        onnx::load(fixture("mlp_b.onnx")).unwrap(),
    );
    let merged_rows = rows(&m, "fc1.weight");
    let mut inputs = rows(&a, "fc1.weight");
    inputs.extend(rows(&b, "fc1.weight"));
    assert_eq!(merged_rows.len(), inputs.len());
    // Every input row appears among the merged rows (scaled by N / (1 + 1e-5), the merge
    // matrix's convention, then averaged over N).
    for row in &inputs {
        let found = merged_rows.iter().any(|r| {
            r.iter()
                .zip(row)
                .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
        });
        assert!(found, "an input row of fc1 is not in the merged model");
    }
    assert!(report["merged_parameters"].as_u64() > report["model_parameters"].as_u64());
}

#[test]
fn wider_merges_run_and_buy_accuracy_with_parameters() {
    // Without the output refit: refitting every convolution brings even one model's width
    // within 2 points of the ensemble (87.1 → 88.1 → 88.3), which leaves width little to buy.
    let no_refit = ["--output-fit", "0"];
    let (_, r1, one) = merged("resnet20_bn_folded", "1", &no_refit);
    let (m, r15, wide) = merged("resnet20_bn_folded", "1.5", &no_refit);
    let (_, _, wider) = merged("resnet20_bn_folded", "2", &no_refit);
    let params = |r: &serde_json::Value| r["merged_parameters"].as_f64().unwrap();
    assert_eq!(params(&r1), r1["model_parameters"].as_f64().unwrap());
    assert!(
        params(&r15) > 1.5 * params(&r1),
        "{} vs {}",
        params(&r15),
        params(&r1)
    );
    // The first conv's output channels: 16 per model, 24 merged at 1.5.
    let first = m
        .graph()
        .initializer
        .iter()
        .find(|t| t.dims.len() == 4)
        .unwrap();
    assert_eq!(first.dims[0], 24, "{:?}", first.dims);
    // Measured 77.0 → 87.1 → 92.0 % task mean (the ensemble: 88.7).
    assert!(
        wide > one + 3.0 && wider > wide + 2.0,
        "{one:.1} {wide:.1} {wider:.1}"
    );
}

/// Depthwise convolutions widen with their channels: at the number of models every depthwise
/// filter of both inputs is in the merged model, whose `group` attributes follow the new
/// channel counts (ONNX Runtime runs it to score it), and accuracy climbs with the width.
/// Measured on dwcnn: 46.9 → 64.5 → 79.8 % task mean at widths 1, 1.5, 2 (ensemble 84.5);
/// before depthwise groups widened, width 2 reached 52.2.
#[test]
fn depthwise_convolutions_widen_with_their_group() {
    let (a, b) = (
        onnx::load(fixture("dwcnn_a.onnx")).unwrap(),
        onnx::load(fixture("dwcnn_b.onnx")).unwrap(),
    );
    let depthwise: Vec<(String, i64)> = a
        .graph()
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Conv"))
        .filter_map(|n| {
            let group = n
                .attribute
                .iter()
                .find(|x| x.name.as_deref() == Some("group"))?
                .i?;
            (group > 1).then(|| (n.input[1].clone(), group))
        })
        .collect();
    assert_eq!(depthwise.len(), 4, "dwcnn has four depthwise convolutions");
    let (m, _, wider) = merged(
        "dwcnn",
        "2",
        &["--repair-samples", "0", "--output-fit", "0"],
    );
    for (weight, group) in &depthwise {
        let node = m
            .graph()
            .node
            .iter()
            .find(|n| n.input.get(1) == Some(weight))
            .unwrap();
        let now = node
            .attribute
            .iter()
            .find(|x| x.name.as_deref() == Some("group"))
            .and_then(|x| x.i);
        assert_eq!(now, Some(2 * group), "'{weight}': group attribute");
        let merged_rows = rows(&m, weight);
        let mut inputs = rows(&a, weight);
        inputs.extend(rows(&b, weight));
        assert_eq!(merged_rows.len(), inputs.len(), "'{weight}'");
        for row in &inputs {
            let found = merged_rows.iter().any(|r| {
                r.iter()
                    .zip(row)
                    .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
            });
            assert!(found, "a filter of '{weight}' is not in the merged model");
        }
    }
    // Widening alone: the output refit (every layer, by default, on this small model) lifts
    // width 1 by 27 points and narrows the gap widening can show.
    let (_, _, one) = merged("dwcnn", "1", &["--output-fit", "0"]);
    let (_, _, wide) = merged("dwcnn", "1.5", &["--output-fit", "0"]);
    assert!(wide > one + 5.0, "{one:.1} → {wide:.1} at width 1.5");
    assert!(
        wider > one + 10.0,
        "{one:.1} → {wider:.1} at width 2 (no repair)"
    );
}

#[test]
fn groups_whose_width_the_graph_spells_out_keep_it() {
    // The ViT's residual stream widens (the reshapes that read its width get constants), its
    // MLP hidden layers too, and its heads by whole heads (round(4 · 1.5) = 6 of 16 units).
    let (m, r, _) = merged("vit", "1.5", &[]);
    assert!(kept_reasons(&r).is_empty(), "{:?}", kept_reasons(&r));
    assert_eq!(dims(&m, "cls_token"), [1, 1, 96]);
    assert_eq!(dims(&m, "blocks.0.mlp.fc1.bias"), [192]);
    assert_eq!(dims(&m, "blocks.0.attn.q.bias"), [96]);
    // nn.MultiheadAttention's export reshapes its packed in-projection to [N, B, 3, C]: an
    // axis that stacks Q, K and V by index. Q/K and V/O widen alike (6 heads each), so the
    // pieces stay equal and the reshape gets [N, B, 3, 96]; the packed rows hold 3 × 96.
    let (m, r, _) = merged("vit_mha", "1.5", &[]);
    assert!(kept_reasons(&r).is_empty(), "{:?}", kept_reasons(&r));
    assert_eq!(dims(&m, "cls_token"), [1, 1, 96]);
    assert_eq!(dims(&m, "blocks.0.self_attn.in_proj_bias"), [288]);
}

/// Packed attention heads widen (the in-projection's Q, K and V pieces at one merged size):
/// `vit_mha` at `--width 1.2` stays within 1.5× one model's parameters and comes within 5
/// points of the ensemble (measured 82.25 % at 1.45× against 86.5 %; before its heads could
/// widen, the best found at ≤ 1.5× was 80.1 %).
#[test]
fn packed_attention_heads_widen_near_the_ensemble() {
    let pair = "vit_mha";
    let (_, r, got) = merged(pair, "1.2", &[]);
    assert!(kept_reasons(&r).is_empty(), "{:?}", kept_reasons(&r));
    let ratio = r["merged_parameters"].as_f64().unwrap() / r["model_parameters"].as_f64().unwrap();
    assert!(ratio > 1.0 && ratio <= 1.5, "{ratio}");
    let ensemble = ensemble_task_mean(pair);
    assert!(got >= ensemble - 5.0, "{got:.1} vs ensemble {ensemble:.1}");
}

fn kept_reasons(r: &serde_json::Value) -> Vec<String> {
    r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["similarity"].as_str())
        .filter(|s| s.contains("kept one model's width") && !s.contains("pinned"))
        .map(String::from)
        .collect()
}

fn dims(m: &Model, name: &str) -> Vec<i64> {
    m.graph()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no initializer {name}"))
        .dims
        .clone()
}

#[test]
fn vits_widen_their_residual_stream_through_the_reshapes_that_read_it() {
    // (pair, Reshapes that touch the widened groups: the patch embedding's flatten and, per
    // block, the heads' split of Q, K and V and their merge; the packed in-projection's block
    // also stacks Q, K and V by index and splits and merges heads and batch around its
    // sequence-first attention.)
    for (pair, reshapes) in [("vit", 17), ("vit_mha", 37)] {
        widened_vit_keeps_a_permuted_copys_function(pair, reshapes);
    }
}

fn widened_vit_keeps_a_permuted_copys_function(pair: &str, reshapes: usize) {
    // Merged with a permuted copy of itself at width 2, no unit of a widened group is zipped:
    // the stream holds both copies' units side by side, so each LayerNorm sees every value
    // twice (the same mean and variance); the heads are both copies' heads, in the packed
    // in-projection (`vit_mha`) as Q, K and V pieces of twice the rows. Every merged unit of
    // the final stream must be one of the model's; a Reshape left reading a widened size, or
    // pinned to a wrong one, fails to run or scrambles the tokens, heads or pieces.
    let a = onnx::load(fixture(&format!("{pair}_a.onnx"))).unwrap();
    let inputs = calib_inputs(&a, 256);
    let (m, _) = merged_with_permuted_copy(&a, &inputs);
    assert_eq!(dims(&m, "cls_token"), [1, 1, 128]);
    assert_eq!(dims(&m, "blocks.3.norm2.weight"), [128]);
    // Both copies' heads: separate projections, or the packed Q, K and V rows.
    let (q, size) = match pair {
        "vit" => ("blocks.0.attn.q.bias", 128),
        _ => ("blocks.0.self_attn.in_proj_bias", 384),
    };
    assert_eq!(dims(&m, q), [size]);
    let pinned = m
        .graph()
        .initializer
        .iter()
        .filter(|t| t.name.as_deref().is_some_and(|n| n.contains("mudsc_width")))
        .count();
    assert_eq!(pinned, reshapes, "{pair}");
    let stream = ["/norm/LayerNormalization_output_0".to_string()];
    let (want, got) = (outputs(&a, &inputs, &stream), outputs(&m, &inputs, &stream));
    let (want, want_stream, got, got_stream) = (&want[0], &want[1], &got[0], &got[1]);
    let units = |t: &ndarray::ArrayD<f32>| {
        let w = *t.shape().last().unwrap();
        let rows = t.len() / w;
        t.to_shape((rows, w)).unwrap().t().to_owned()
    };
    let (want_units, got_units) = (units(want_stream), units(got_stream));
    for (i, g) in got_units.outer_iter().enumerate() {
        let closest = want_units
            .outer_iter()
            .map(|w| {
                w.iter()
                    .zip(g)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0f32, f32::max)
            })
            .fold(f32::MAX, f32::min);
        assert!(
            closest < 1e-3,
            "{pair}: merged stream unit {i} is no unit of the model ({closest})"
        );
    }
    // The cosine head normalises over twice the units, each twice: logits shrink by √2.
    let diff = max_gap(want, got, std::f32::consts::SQRT_2);
    assert!(diff < 1e-3, "{pair}: merged logits differ by {diff}");
}

#[test]
fn bad_widths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.onnx");
    let calib = calib_set();
    for (width, method) in [
        ("3", "mudsc-zip"),
        ("0.5", "mudsc-zip"),
        ("1.5", "mudsc-align"),
    ] {
        let r = merge_cli(
            &fixture("mlp_a.onnx"),
            &fixture("mlp_b.onnx"),
            &out,
            &[
                "--calib",
                calib.to_str().unwrap(),
                "--width",
                width,
                "--method",
                method,
            ],
        );
        assert_eq!(r.status.code(), Some(2), "{width} {method}");
        assert!(String::from_utf8_lossy(&r.stderr).contains("--width"));
        assert!(!out.exists());
    }
}

/// `--zip-until auto --max-params X`: every candidate scored is within the budget, the choice
/// is the best scored one, and the final merge has the chosen shape and parameter count.
#[test]
fn the_automatic_shape_stays_within_its_budget() {
    for budget in ["1.6", "1.0"] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("m.onnx");
        let report = dir.path().join("r.json");
        let calib = calib_set();
        let r = merge_cli(
            &fixture("resnet20_bn_folded_a.onnx"),
            &fixture("resnet20_bn_folded_b.onnx"),
            &out,
            &[
                "--calib",
                calib.to_str().unwrap(),
                "--calib-labels",
                "labels",
                "--zip-until",
                "auto",
                "--max-params",
                budget,
                "--report",
                report.to_str().unwrap(),
            ],
        );
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        let c = &r["shape_auto"];
        let limit: f64 = budget.parse().unwrap();
        let curve = c["curve"].as_array().unwrap();
        assert!(curve.len() >= 3, "{curve:?}");
        let scored: Vec<&serde_json::Value> =
            curve.iter().filter(|p| !p["score"].is_null()).collect();
        for p in &scored {
            let full_width_one = p["zip_until"].is_null() && p["width"].as_f64() == Some(1.0);
            assert!(
                full_width_one || p["parameters"].as_f64().unwrap() <= limit,
                "{p}"
            );
        }
        let best = scored
            .iter()
            .map(|p| p["score"].as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = scored
            .iter()
            .find(|p| {
                p["zip_until"] == c["zip_until"]
                    && p["width"] == c["width"]
                    && p["widen"] == c["widen"]
            })
            .unwrap();
        assert_eq!(chosen["score"].as_f64().unwrap(), best);
        assert_eq!(c["criterion"], "log-likelihood of the labels");
        let ratio =
            r["merged_parameters"].as_f64().unwrap() / r["model_parameters"].as_f64().unwrap();
        assert!(
            (ratio - c["parameters"].as_f64().unwrap()).abs() < 0.01,
            "{ratio} vs {c}"
        );
        assert!(ratio <= limit.max(1.0) + 1e-9);
        assert_eq!(r["partial"].is_null(), c["zip_until"].is_null());
    }
}

/// `--widen worst` gives the width's extra units to the groups the loop merged worst. On the BN
/// ResNet at `--width 1.2` that stays within 1.5× one model's parameters and comes within 5
/// points of the ensemble (computed here); without the output refit measured 87.5 % against
/// 88.7 %, where the even spread reaches 79.0 % at 1.20× (with the refit of every convolution
/// both reach 87.8 %: the comparison of the spreads is made without it).
#[test]
fn widening_the_worst_merged_groups_first_nears_the_ensemble() {
    let pair = "resnet20_bn_folded";
    let (_, even_report, even) = merged(pair, "1.2", &["--output-fit", "0"]);
    let (_, r, worst) = merged(pair, "1.2", &["--widen", "worst", "--output-fit", "0"]);
    let ratio = r["merged_parameters"].as_f64().unwrap() / r["model_parameters"].as_f64().unwrap();
    assert!(ratio > 1.0 && ratio <= 1.5, "{ratio}");
    let ensemble = ensemble_task_mean(pair);
    assert!(
        worst >= ensemble - 5.0,
        "worst-first {worst:.1} vs ensemble {ensemble:.1}"
    );
    assert!(
        worst > even,
        "worst-first {worst:.1} vs even {even:.1} ({even_report})"
    );
}

/// `--widen per-parameter` gives the even spread's parameters to the groups whose merge lost
/// the most per parameter of a unit. On the ViT those are the attention heads (a residual-
/// stream unit costs a row or column in every block, a head's unit one row in Q, K, V and a
/// column of the output projection): at `--width 1.25` it keeps every head of both models in
/// at least one block, stays within 1.5× one model's parameters and comes within 5 points of
/// the ensemble (measured 82.0 % at 1.48× against 86.3 %; the even spread 78.7 at 1.48×). On
/// the depthwise CNN, where the early channels are cheap, it beats the even spread at no more
/// parameters (measured 79.5 % at 1.47× against 76.45 at 1.48×; ensemble 84.5).
#[test]
fn widening_per_parameter_keeps_the_cheap_badly_merged_units_apart() {
    let per_parameter = ["--widen", "per-parameter"];
    let (m, r, got) = merged("vit", "1.25", &per_parameter);
    let ratio = |r: &serde_json::Value| {
        r["merged_parameters"].as_f64().unwrap() / r["model_parameters"].as_f64().unwrap()
    };
    assert!(ratio(&r) > 1.0 && ratio(&r) <= 1.5, "{}", ratio(&r));
    let every_head = (0..4).any(|b| dims(&m, &format!("blocks.{b}.attn.q.bias")) == [128]);
    assert!(every_head, "no block kept all 8 heads");
    let ensemble = ensemble_task_mean("vit");
    assert!(got >= ensemble - 5.0, "{got:.1} vs ensemble {ensemble:.1}");
    let (_, even_report, even) = merged("vit", "1.22", &["--widen", "all"]);
    assert!(ratio(&even_report) >= ratio(&r) - 0.01);
    assert!(got > even + 1.0, "per parameter {got:.1} vs even {even:.1}");

    let (_, r, got) = merged("dwcnn", "1.25", &per_parameter);
    let (_, even_report, even) = merged("dwcnn", "1.28", &["--widen", "all"]);
    assert!(
        ratio(&r) <= 1.5 && ratio(&r) <= ratio(&even_report),
        "{} vs {}",
        ratio(&r),
        ratio(&even_report)
    );
    assert!(got > even + 1.0, "per parameter {got:.1} vs even {even:.1}");
}

/// GroupNorm groups widen by whole groups: on the GN ResNet (every group GroupNorm-blocked,
/// exported as Reshape → InstanceNormalization → Reshape, γ and β as Mul and Add) the
/// worst-merged groups take extra GroupNorm groups; at `--width 1.2 --widen worst` that stays
/// within 1.5× one model's parameters and comes within 5 points of the ensemble (measured
/// 71.35 % at 1.46× against 73.2 %; at one model's width 65.7 %).
#[test]
fn group_norm_groups_widen_by_whole_groups_and_near_the_ensemble() {
    let pair = "resnet20_gn";
    let (m, r, worst) = merged(pair, "1.2", &["--widen", "worst"]);
    assert!(kept_reasons(&r).is_empty(), "{:?}", kept_reasons(&r));
    let ratio = r["merged_parameters"].as_f64().unwrap() / r["model_parameters"].as_f64().unwrap();
    assert!(ratio > 1.0 && ratio <= 1.5, "{ratio}");
    // Every widened GroupNorm scale holds whole groups of 4, 8 or 16 channels: its first
    // layer's 16 channels in 4 groups of 4, at 16 + 4k.
    let c = dims(&m, "conv1.weight")[0];
    assert!(c >= 16 && c % 4 == 0, "{c}");
    let ensemble = ensemble_task_mean(pair);
    assert!(
        worst >= ensemble - 5.0,
        "worst-first {worst:.1} vs ensemble {ensemble:.1}"
    );
}

#[test]
fn a_group_norm_resnet_merged_with_a_permuted_copy_at_width_2_keeps_its_function() {
    // Both copies' GroupNorm groups side by side: each normalises over the same channels as
    // before, so the merged model computes the model's logits. A GroupNorm export's
    // per-group InstanceNormalization scale left at one model's group count fails to run; a
    // Reshape to [N, groups, -1] left at the old count normalises the wrong channels together.
    // The cosine head normalises over both copies' 64 hidden units, each twice: the logits
    // shrink by √2 (as the ViT's do).
    let a = onnx::load(fixture("resnet20_gn_a.onnx")).unwrap();
    let inputs = calib_inputs(&a, 64);
    let (m, report) = merged_with_permuted_copy(&a, &inputs);
    assert!(report.merged_parameters > 3 * report.model_parameters);
    assert_eq!(dims(&m, "conv1.weight")[0], 32);
    let (want, got) = (&outputs(&a, &inputs, &[])[0], &outputs(&m, &inputs, &[])[0]);
    let diff = max_gap(want, got, std::f32::consts::SQRT_2);
    assert!(
        diff <= 1e-4 * magnitude(want),
        "merged logits differ by {diff}"
    );
}

#[test]
fn group_norm_rule_models_merged_with_a_permuted_copy_at_width_2_keep_their_function() {
    // The GroupNormalization op (opset 18: per-group scale; 21: per-channel) takes the merged
    // number of groups; PyTorch's export (InstanceNormalization over a reshape, its ones and
    // zeros as initializers) gets its reshape and constants rewritten. Each merged with a
    // permuted copy of itself at width 2 (ONNX Runtime: tract has no GroupNormalization)
    // normalises every channel with the same channels as before, so it computes the model's
    // outputs; a num_groups left at one model's count normalises two groups as one.
    for name in ["groupnorm_op18", "groupnorm_op21", "groupnorm_instancenorm"] {
        let (_, m) = rule_model_keeps_its_function_at_width_2(name);
        assert_eq!(dims(&m, "w1")[0], 16, "{name}");
    }
}

/// Rule model `name` merged with a randomly permuted copy of itself at width 2 on ONNX Runtime:
/// asserts that no group kept one model's width and that the merged model computes the
/// model's outputs; returns the model and the merge.
fn rule_model_keeps_its_function_at_width_2(name: &str) -> (Model, Model) {
    let a = onnx::load(common::rule_models().join(format!("{name}.onnx"))).unwrap();
    let shapes = data::input_shapes(&a, None, &[], 16).unwrap();
    let inputs = data::random_inputs(&a, &shapes, 7).unwrap();
    let ort = BackendKind::Ort;
    let (m, report) = merged_with_permuted_copy_at(&a, &inputs, 2.0, ort);
    let kept = kept_in(&report);
    assert!(kept.is_empty(), "{name}: {kept:?}");
    let run = |model: &Model| outputs_on(ort, model, &inputs, &[]).swap_remove(0);
    let (want, got) = (run(&a), run(&m));
    let diff = max_gap(&want, &got, 1.0);
    assert!(
        diff <= 1e-4 * magnitude(&want),
        "{name}: merged outputs differ by {diff}"
    );
    (a, m)
}

#[test]
fn stacked_packed_attention_merged_with_a_permuted_copy_at_width_2_keeps_its_function() {
    // timm's export of a packed projection: [B, N, 3·C] reshaped to [B, N, 3, heads,
    // head_dim], moved to the front and taken apart by Gathers (`qkv[0]`) or a Split
    // (`unbind`). Widened, the reshape's heads axis takes the merged head count (Q/K and V/O
    // widen alike, so the three pieces stay equal). Merged with a permuted copy of itself at
    // width 2, every head of both copies is kept and the model's outputs come back (scaled:
    // the output projection averages the copies' halves); a heads axis left at one model's
    // count fails to run or mixes heads.
    for name in ["attention_stacked_gather", "attention_stacked_split"] {
        let (a, m) = rule_model_keeps_its_function_at_width_2(name);
        assert_eq!(dims(&m, "wqkv")[1], 2 * dims(&a, "wqkv")[1], "{name}");
    }
}

#[test]
fn a_constant_over_widened_groups_that_is_not_one_value_keeps_the_width() {
    // The GroupNorm export's per-group InstanceNormalization scale is ones, repeated to the
    // merged group count; a scale of different values could not be, so its group keeps one
    // model's width and the report says why.
    let a = onnx::load(fixture("resnet20_gn_a.onnx")).unwrap();
    let inputs = calib_inputs(&a, 64);
    let mut a = a;
    let scale = a
        .proto
        .graph
        .as_mut()
        .unwrap()
        .node
        .iter_mut()
        .find(|n| n.output.first().map(String::as_str) == Some("/bn1/Constant_1_output_0"))
        .and_then(|n| n.attribute.first_mut())
        .and_then(|attr| attr.t.as_mut())
        .unwrap();
    *scale = TensorData::F32(ndarray::arr1(&[1.0f32, 2.0, 3.0, 4.0]).into_dyn()).to_proto("");
    let (m, report) = merged_with_permuted_copy_at(&a, &inputs, 1.5, BackendKind::Tract);
    let kept = kept_in(&report);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].contains("'/bn1/Constant_1_output_0' holds its units and is not one value"),
        "{kept:?}"
    );
    // The first layer's channels are that group's: they keep one model's 16.
    assert_eq!(dims(&m, "conv1.weight")[0], 16);
}

#[test]
fn zoo_models_merged_with_a_permuted_copy_at_width_2_keep_their_function() {
    // Every architecture of the zoo (exports of BERT, GPT-2, Llama, Swin, ConvNeXt, a
    // bottleneck ResNet, MobileNetV3, a U-Net block) merged with a randomly permuted copy of
    // itself at the number of models: the widened groups keep both copies' units side by side
    // (norms over them see every value twice), the groups the graph pins to one model's width
    // find the permutation. The merged model must compute the model's outputs: a reshape
    // pinned wrong, a widened size left in the graph, or a group matched from neighbours it
    // cannot see (a weight-matched group beside a widened one) shows here.
    let mut widened = 0;
    for (path, input) in common::fixture_models() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        // ZipIt's matching of the U-Net's transposed convolutions (kept at one model's
        // width) from the bundled input's samples is not exact even at width 1.
        if !path.to_string_lossy().contains("zoo") || name == "unet_block" {
            continue;
        }
        let a = onnx::load(&path).unwrap();
        let inputs = data::bind_inputs(&data::read(&input).unwrap(), &a, &input).unwrap();
        let (m, report) = merged_with_permuted_copy(&a, &inputs);
        if report.merged_parameters > report.model_parameters {
            widened += 1;
        }
        let (want, got) = (&outputs(&a, &inputs, &[])[0], &outputs(&m, &inputs, &[])[0]);
        let diff = max_gap(want, got, 1.0);
        assert!(
            diff <= 1e-4 * magnitude(want),
            "{name}: merged outputs differ by {diff}"
        );
    }
    // All but GPT-2 (tied embeddings, Conv1D weights read through a Transpose, packed heads).
    assert_eq!(widened, 6);
}

/// `a` merged with a randomly permuted copy of itself at the number of models: ZipIt (the
/// activations alone find the permutation of the groups kept at one model's width), no
/// repair, tract.
fn merged_with_permuted_copy(a: &Model, inputs: &[TensorData]) -> (Model, MergeReport) {
    merged_with_permuted_copy_at(a, inputs, 2.0, BackendKind::Tract)
}

/// `a` merged with a randomly permuted copy of itself by ZipIt at `width`, on `backend`, with
/// neither repair nor the output refit: the rewrite alone (the refit would fit the head back
/// to the copies' logits, undoing the √2 a width-2 cosine head loses).
fn merged_with_permuted_copy_at(
    a: &Model,
    inputs: &[TensorData],
    width: f64,
    backend: BackendKind,
) -> (Model, MergeReport) {
    let b = common::permuted_copy(a, inputs);
    let opts = MergeOptions {
        method: Method::Zipit,
        width,
        repair_samples: 0,
        output_fit_samples: 0,
        backend,
        ..Default::default()
    };
    merge(&[a.clone(), b], inputs, &opts, &mut |_, _, _| {}).unwrap()
}

/// The groups a library merge kept at one model's width, by their reasons.
fn kept_in(report: &MergeReport) -> Vec<&str> {
    report
        .groups
        .iter()
        .map(|g| g.similarity.as_str())
        .filter(|s| s.contains("kept one model's width"))
        .collect()
}

/// The first `n` samples of the bundled calibration set, bound to `model`'s inputs.
fn calib_inputs(model: &Model, n: usize) -> Vec<TensorData> {
    let p = calib_set();
    let arrays = data::read(&p).unwrap();
    common::head_rows(&data::bind_inputs(&arrays, model, &p).unwrap(), n)
}

/// The task mean (%) of `pair`'s ensemble on the test set.
fn ensemble_task_mean(pair: &str) -> f64 {
    let e = eval_tasks(
        &[
            &fixture(&format!("{pair}_a.onnx")),
            &fixture(&format!("{pair}_b.onnx")),
        ],
        &["--ensemble"],
    );
    100.0 * e["ensemble"]["task_mean"].as_f64().unwrap()
}

/// The largest |want − shrink · got| (`shrink`: how much a merge scaled the outputs down).
fn max_gap(want: &ndarray::ArrayD<f32>, got: &ndarray::ArrayD<f32>, shrink: f32) -> f32 {
    want.iter()
        .zip(got.iter())
        .map(|(x, y)| (x - y * shrink).abs())
        .fold(0.0f32, f32::max)
}

/// The largest |value| of `t`, at least 1: the scale a relative bound is taken against.
fn magnitude(t: &ndarray::ArrayD<f32>) -> f32 {
    t.iter().fold(1.0f32, |m, x| m.max(x.abs()))
}

/// `model`'s first output on `inputs` (tract), then the values named in `extra`, as f32.
fn outputs(model: &Model, inputs: &[TensorData], extra: &[String]) -> Vec<ndarray::ArrayD<f32>> {
    outputs_on(BackendKind::Tract, model, inputs, extra)
}

/// As `outputs`, on `backend`.
fn outputs_on(
    backend: BackendKind,
    model: &Model,
    inputs: &[TensorData],
    extra: &[String],
) -> Vec<ndarray::ArrayD<f32>> {
    let opts = BackendOptions::default();
    let mut s = open_session(backend, model, extra, &opts).unwrap();
    let out = run_batched(s.as_mut(), inputs, 64).unwrap();
    std::iter::once(&out[0])
        .chain(&out[out.len() - extra.len()..])
        .map(TensorData::to_f32)
        .collect()
}
