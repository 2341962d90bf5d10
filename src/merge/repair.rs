//! Statistics repair after merging. Merged units drift from the statistics the next layer
//! expects (variance collapses when unlike units are averaged), which drives ResNets to
//! chance. Two corrections, both folded into existing initializers (no new nodes):
//! - REPAIR: every Conv/Gemm/MatMul whose output units are one group gets, per unit, an affine
//!   correction of its weight row and bias so that the merged pre-activation has the mean and
//!   standard deviation interpolated from the endpoints' matched units.
//! - BatchNormalization reset: running mean and variance are measured on the calibration data
//!   in the merged model (what the reference does by a pass in training mode).
//!
//! Layers are corrected in graph order, each measured after the ones before it were fixed.
//! With a partial zip only the merged trunk is corrected: the remainders are the models' own.

use std::collections::{HashMap, HashSet};

use ndarray::{Array1, ArrayD, Axis};

use super::partial::copy_name;
use super::units::{Layout, Matchings};
use crate::error::Result;
use crate::graph::Graph;
use crate::onnx::proto::TensorProto;
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched, BackendKind, BackendOptions};
use crate::stats::Moments;
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

/// A layer whose output units are one group: its weight (and the axis holding the units) and
/// its bias (an initializer, or `None` when it has to be created).
struct Producer {
    node: usize,
    output: String,
    group: usize,
    weight: String,
    weight_axis: usize,
    bias: Option<String>,
    width: usize,
}

pub struct RepairReport {
    pub layers: usize,
    pub batch_norms: usize,
}

#[allow(clippy::too_many_arguments)]
pub fn repair(
    models: &[Model],
    names: &[HashMap<String, String>],
    merged: &mut Model,
    layout: &Layout,
    slots: &Slots,
    groups: &[Group],
    m: &Matchings,
    calib: &[TensorData],
    scope: Option<&HashSet<usize>>,
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<RepairReport> {
    let graph = Graph::new(&models[0])?;
    let in_scope = |n: usize| scope.is_none_or(|s| s.contains(&n));
    let mut producers = find_producers(&graph, layout, slots, groups);
    producers.retain(|p| in_scope(p.node));
    let mut report = RepairReport {
        layers: 0,
        batch_norms: 0,
    };
    let tap_stats =
        |model: &Model, taps: &[String]| tap_moments(model, taps, calib, backend, options);
    // Endpoint statistics of every producer, model by model.
    let taps: Vec<String> = producers.iter().map(|p| p.output.clone()).collect();
    let mut endpoint: Vec<Vec<Moments>> = Vec::new();
    for (model, map) in models.iter().zip(names) {
        let mapped: Vec<String> = taps
            .iter()
            .map(|t| map.get(t).cloned().unwrap_or(t.clone()))
            .collect();
        endpoint.push(tap_stats(model, &mapped)?);
    }
    for (k, p) in producers.iter().enumerate() {
        let Some(pm) = m.p.get(&p.group) else {
            continue;
        };
        // Goal: the average of the cluster's endpoint statistics.
        let sizes = pm.cluster_sizes();
        let (mut goal_mean, mut goal_sd) =
            (Array1::<f64>::zeros(p.width), Array1::<f64>::zeros(p.width));
        for (i, stats) in endpoint.iter().enumerate() {
            let (mean, sd) = stats[k].mean_std();
            for u in 0..p.width {
                let j = pm.target[i * p.width + u] as usize;
                let w = 1.0 / (sizes[j] as f64 + 1e-12);
                goal_mean[j] += w * mean[u];
                goal_sd[j] += w * sd[u];
            }
        }
        let now = tap_stats(merged, std::slice::from_ref(&p.output))?;
        let (mean, sd) = now[0].mean_std();
        let scale = std_ratio(&goal_sd, &sd);
        apply(merged, p, &scale, &mean, &goal_mean)?;
        report.layers += 1;
    }
    report.batch_norms = reset_batch_norms(merged, calib, &in_scope, backend, options)?;
    Ok(report)
}

/// After a partial zip every model's remainder reads merged trunk values, whose statistics
/// are the merge's, not the model's. Each Conv/Gemm of a model's remainder copy is corrected
/// to the statistics that layer has in the model itself (REPAIR with the endpoint as its own
/// goal), and the copies' BatchNorms are reset, so each remainder sees inputs shaped like
/// those it was trained on. `remainder` holds model-0 node indices; the copies are found by
/// the partial zip's naming (`<value>.m<i>`).
pub fn repair_remainders(
    models: &[Model],
    names: &[HashMap<String, String>],
    merged: &mut Model,
    remainder: &HashSet<usize>,
    calib: &[TensorData],
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<RepairReport> {
    let graph = Graph::new(&models[0])?;
    let layers: Vec<Layer> = graph
        .topological_order()
        .iter()
        .filter(|n| remainder.contains(n))
        .filter_map(|&n| correctable(&graph, n))
        .collect();
    let stats = |model: &Model, taps: &[String]| tap_moments(model, taps, calib, backend, options);
    // Each model's own statistics at its remainder layers.
    let mut goals: Vec<Vec<Moments>> = Vec::new();
    for (model, map) in models.iter().zip(names) {
        let taps: Vec<String> = layers
            .iter()
            .map(|l| map.get(&l.output).cloned().unwrap_or(l.output.clone()))
            .collect();
        goals.push(stats(model, &taps)?);
    }
    let mut report = RepairReport {
        layers: 0,
        batch_norms: 0,
    };
    for (k, layer) in layers.iter().enumerate() {
        // The copies of one layer sit on parallel branches: one pass measures them all.
        let taps: Vec<String> = (0..models.len())
            .map(|i| copy_name(&layer.output, i))
            .collect();
        let now = stats(merged, &taps)?;
        for (i, current) in now.iter().enumerate() {
            let Some(node) = merged
                .graph()
                .node
                .iter()
                .position(|n| n.output.first() == Some(&taps[i]))
            else {
                continue;
            };
            let (mean, sd) = current.mean_std();
            let (goal_mean, goal_sd) = goals[i][k].mean_std();
            let scale = std_ratio(&goal_sd, &sd);
            let p = Producer {
                node,
                output: taps[i].clone(),
                group: usize::MAX,
                weight: copy_name(&layer.weight, i),
                weight_axis: layer.weight_axis,
                bias: layer.bias.as_ref().map(|b| copy_name(b, i)),
                width: mean.len(),
            };
            apply(merged, &p, &scale, &mean, &goal_mean)?;
            report.layers += 1;
        }
    }
    let copies: HashSet<String> = remainder
        .iter()
        .flat_map(|&n| graph.node(n).output.clone())
        .flat_map(|y| (0..models.len()).map(move |i| copy_name(&y, i)))
        .collect();
    let in_copies: HashSet<usize> = {
        let merged_graph = Graph::new(merged)?;
        (0..merged_graph.nodes().len())
            .filter(|&n| {
                merged_graph
                    .node(n)
                    .output
                    .first()
                    .is_some_and(|y| copies.contains(y))
            })
            .collect()
    };
    report.batch_norms =
        reset_batch_norms(merged, calib, &|n| in_copies.contains(&n), backend, options)?;
    Ok(report)
}

/// For a layer REPAIR can correct: the weight axis holding its output units, the output's
/// channel axis, and its bias input.
fn layer_axes(node: &crate::onnx::proto::NodeProto) -> Option<(usize, usize, Option<String>)> {
    let trans_b = node
        .attribute
        .iter()
        .any(|a| a.name.as_deref() == Some("transB") && a.i == Some(1));
    match node.op_type.as_deref()? {
        "Conv" => Some((0, 1, node.input.get(2).cloned())),
        "Gemm" => Some((if trans_b { 0 } else { 1 }, 1, node.input.get(2).cloned())),
        _ => None,
    }
}

/// Per-channel scale taking standard deviation `sd` to `goal`; dead channels (either side
/// zero) keep their scale.
fn std_ratio(goal: &Array1<f64>, sd: &Array1<f64>) -> Vec<f64> {
    goal.iter()
        .zip(sd)
        .map(|(&g, &s)| if s > 1e-8 && g > 0.0 { g / s } else { 1.0 })
        .collect()
}

/// Per-channel moments of `model`'s values `taps` on the calibration data, in one pass.
fn tap_moments(
    model: &Model,
    taps: &[String],
    calib: &[TensorData],
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<Vec<Moments>> {
    let mut s = open_session(backend, model, taps, options)?;
    let outs = run_batched(s.as_mut(), calib, 64)?;
    let names = s.output_names().to_vec();
    Ok(taps
        .iter()
        .filter_map(|t| names.iter().position(|n| n == t))
        .map(|i| channel_moments(&outs[i]))
        .collect())
}

/// Per-channel moments of a tap [N, C, ...] or [..., C] (channels on axis 1 for rank ≥ 3).
fn channel_moments(t: &TensorData) -> Moments {
    let v = t.to_f32();
    let axis = if v.ndim() >= 3 { 1 } else { v.ndim() - 1 };
    let c = v.shape()[axis];
    let order: Vec<usize> = (0..v.ndim()).filter(|&a| a != axis).chain([axis]).collect();
    let moved = v
        .view()
        .permuted_axes(order)
        .as_standard_layout()
        .into_owned();
    let rows = moved.len() / c.max(1);
    let flat = moved.into_shape_with_order((rows, c)).expect("contiguous");
    let mut m = Moments::new(c);
    m.add(flat.view());
    m
}

fn find_producers(
    graph: &Graph,
    layout: &Layout,
    slots: &Slots,
    groups: &[Group],
) -> Vec<Producer> {
    let mut out = Vec::new();
    for &n in graph.topological_order() {
        let Some(layer) = correctable(graph, n) else {
            continue;
        };
        let Some(s) = slots.slot(&layer.output, layer.out_axis) else {
            continue;
        };
        let comp = layout.st.comp_of[s];
        let Some(g) = groups.iter().find(|g| {
            let units = layout.units_along(comp, g);
            units.len() == g.width && units.iter().enumerate().all(|(i, u)| *u == Some(i))
        }) else {
            continue;
        };
        out.push(Producer {
            node: n,
            output: layer.output,
            group: g.id,
            weight: layer.weight,
            weight_axis: layer.weight_axis,
            bias: layer.bias,
            width: g.width,
        });
    }
    out
}

/// A Conv/Gemm layer whose output statistics can be corrected in its own initializers.
struct Layer {
    output: String,
    out_axis: usize,
    weight: String,
    weight_axis: usize,
    bias: Option<String>,
}

/// Node `n` as a correctable layer: a Conv or Gemm with an untied weight initializer, not
/// followed by a BatchNormalization (whose reset handles the statistics), with its bias when
/// that is an untied initializer too.
fn correctable(graph: &Graph, n: usize) -> Option<Layer> {
    let node = graph.node(n);
    let uses = |name: &str| graph.consumers(name).len();
    let w = node
        .input
        .get(1)
        .filter(|w| graph.initializer(w).is_some())?;
    if uses(w) != 1 {
        return None; // tied weights: one correction cannot serve two layers
    }
    let y = node.output.first()?;
    let (weight_axis, out_axis, bias) = layer_axes(node)?;
    if graph
        .consumers(y)
        .iter()
        .any(|&(c, _)| graph.node(c).op_type.as_deref() == Some("BatchNormalization"))
    {
        return None;
    }
    Some(Layer {
        output: y.clone(),
        out_axis,
        weight: w.clone(),
        weight_axis,
        bias: bias.filter(|b| !b.is_empty() && graph.initializer(b).is_some() && uses(b) == 1),
    })
}

/// y' = s·(y − μ) + goal: weight rows scaled by s, bias b' = s·(b − μ) + goal.
fn apply(
    model: &mut Model,
    p: &Producer,
    s: &[f64],
    mean: &Array1<f64>,
    goal: &Array1<f64>,
) -> Result<()> {
    let Some(graph) = model.proto.graph.as_mut() else {
        return Ok(());
    };
    let find = |g: &crate::onnx::proto::GraphProto, name: &str| {
        g.initializer
            .iter()
            .position(|t| t.name.as_deref() == Some(name))
    };
    if let Some(i) = find(graph, &p.weight) {
        let mut w = TensorData::from_proto(&graph.initializer[i])?.to_f32();
        for (c, mut lane) in w.axis_iter_mut(Axis(p.weight_axis)).enumerate() {
            lane.mapv_inplace(|v| (v as f64 * s[c]) as f32);
        }
        replace(&mut graph.initializer[i], w);
    }
    let new_bias = |b: &[f32]| -> Vec<f32> {
        (0..s.len())
            .map(|c| (s[c] * (b[c] as f64 - mean[c]) + goal[c]) as f32)
            .collect()
    };
    match p.bias.as_ref().and_then(|b| find(graph, b)) {
        Some(i) => {
            let b = TensorData::from_proto(&graph.initializer[i])?.to_f32();
            let v = new_bias(b.as_slice().unwrap_or(&[]));
            if v.len() == b.len() {
                replace(
                    &mut graph.initializer[i],
                    ArrayD::from_shape_vec(b.shape(), v).expect("same size"),
                );
            }
        }
        None => {
            // No bias yet: give the layer one (an optional input of Conv and Gemm).
            let name = format!("{}.mudsc_repair_bias", p.weight);
            let v = new_bias(&vec![0.0; s.len()]);
            let t = TensorData::F32(ArrayD::from_shape_vec(vec![s.len()], v).expect("1-D"))
                .to_proto(&name);
            graph.initializer.push(t);
            let node = &mut graph.node[p.node];
            node.input.resize(3, String::new());
            node.input[2] = name;
        }
    }
    Ok(())
}

fn replace(t: &mut TensorProto, v: ArrayD<f32>) {
    let name = t.name.clone().unwrap_or_default();
    let data = match TensorData::from_proto(t) {
        Ok(TensorData::F64(_)) => TensorData::F64(v.mapv(f64::from)),
        _ => TensorData::F32(v),
    };
    *t = TensorProto {
        doc_string: t.doc_string.take(),
        ..data.to_proto(&name)
    };
}

/// Sets every BatchNormalization's running mean and variance to the statistics of its input
/// in the merged model, in graph order.
fn reset_batch_norms(
    model: &mut Model,
    calib: &[TensorData],
    in_scope: &dyn Fn(usize) -> bool,
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<usize> {
    let bns: Vec<(String, String, String)> = {
        let graph = Graph::new(model)?;
        graph
            .topological_order()
            .iter()
            .filter(|&&n| in_scope(n))
            .map(|&n| graph.node(n))
            .filter(|n| n.op_type.as_deref() == Some("BatchNormalization") && n.input.len() >= 5)
            .filter(|n| {
                graph.initializer(&n.input[3]).is_some() && graph.initializer(&n.input[4]).is_some()
            })
            .map(|n| (n.input[0].clone(), n.input[3].clone(), n.input[4].clone()))
            .collect()
    };
    for (x, mean_name, var_name) in &bns {
        let mut s = open_session(backend, model, std::slice::from_ref(x), options)?;
        let outs = run_batched(s.as_mut(), calib, 64)?;
        let Some(i) = s.output_names().iter().position(|n| n == x) else {
            continue;
        };
        let stats = channel_moments(&outs[i]);
        let (mean, sd) = stats.mean_std();
        let Some(graph) = model.proto.graph.as_mut() else {
            break;
        };
        for t in &mut graph.initializer {
            if t.name.as_deref() == Some(mean_name) {
                replace(t, mean.mapv(|v| v as f32).into_dyn());
            } else if t.name.as_deref() == Some(var_name) {
                replace(t, sd.mapv(|v| (v * v) as f32).into_dyn());
            }
        }
    }
    Ok(bns.len())
}
