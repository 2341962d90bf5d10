//! Output refit: the merged model's output layers, refitted in closed form to what the
//! endpoints compute there.
//!
//! An output layer is the last Gemm or MatMul whose weights differ between the models: after
//! it the models compute the same function (a classifier's logits; a cosine head's
//! normalisation and shared class embedding). Its output units are the models' own (fixed:
//! they mean the same in every model) or one group's, matched like any other; the endpoints'
//! average output there, cluster by cluster as the merge defines a merged unit, is a target
//! the merged model should reproduce. The merge gives that layer the average of the models'
//! weights over merged input units, which reproduces the target only as far as the merged
//! features are the average of the endpoints' features; through a residual stream zipped across
//! LayerNorms (ViTs) or depthwise-coupled channels they are not, and a bundled ViT pair lost
//! 27 points to its ensemble there. The refit is the least-squares layer that maps the merged
//! model's own input features (after statistics repair) to the endpoints' average output on
//! the calibration inputs — no labels, no gradient steps, a ridge toward the merged weights —
//! the full-rank relative of REPAIR's per-unit affine correction, and of RegMean's
//! closed-form merge of linear layers (Jin et al., ICLR 2023).
//!
//! Where the layer's output is L2-normalised downstream (a cosine head), each endpoint's rows
//! are normalised before averaging, and the mean direction is taken at the endpoints' mean
//! length: the ensemble combines directions there, not raw outputs, whose scale differs
//! between models.
//!
//! The same holds for every linear layer whose output units are fixed or whole groups in their
//! order (attention Q/K/V by heads, a packed in-projection range by range, MLP layers, 1×1
//! convolutions over channels): refitted in graph order, each on the merged model as the
//! layers before it left it, they give the layers after them features closer to the
//! endpoints' (`RefitLayers`: by default wherever calibration can keep all their endpoint
//! outputs; on the bundled ViTs 70.8 → 76.8 and 70.2 → 78.6 % task mean against the output
//! layer alone). Fitting them all at once from the unrefitted model instead (one pass, as
//! often as three times) was measured: the ViTs fell to 36–61 %, the depthwise CNN to 20–23 %;
//! each layer's fit is stale once the layers before it move.

use std::collections::{HashMap, HashSet};

use faer::prelude::Solve;
use faer::Mat;
use ndarray::{Array2, ArrayD, Axis};

use super::calib::KEEP_BYTES;
use super::repair::Segment;
use super::store_float;
use super::units::{Layout, Matchings};
use super::weights::as_f64;
use crate::error::{Error, Result};
use crate::graph::{Graph, ShapeMap};
use crate::onnx::proto::ValueInfoProto;
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, BackendKind, BackendOptions, Session};
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

/// Ridge toward the merged weights, relative to the mean input power: small enough to
/// follow the data (1,000 samples for a 64-unit head), large enough to keep dead inputs at
/// their merged weights.
const RIDGE: f64 = 1e-4;

/// A layer to refit.
#[derive(Debug, Clone)]
pub struct OutputLayer {
    /// Its data input (the merged features).
    pub input: String,
    /// The value compared with the endpoints: the layer's output, or its bias Add's.
    pub output: String,
    pub weight: String,
    /// The weight is stored [out, in] (Gemm with transB; a 1×1 Conv's [out, in, 1, 1]), else
    /// [in, out].
    pub trans_b: bool,
    /// A 1×1 Conv: the units are on axis 1 of its input and output (else the last axis), and
    /// every pixel is a row.
    pub channels_first: bool,
    /// A 1-D [out] bias initializer (Gemm's C, or the Add's).
    pub bias: Option<String>,
    /// L2-normalised over its units downstream: targets are averaged as directions.
    pub normalized: bool,
    /// The groups its output units are, end to end (one group, or a packed projection's Q, K
    /// and V ranges); empty where they are fixed.
    pub segments: Vec<Segment>,
}

/// Which layers the refit fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefitLayers {
    /// The output layers alone.
    Output,
    /// Every linear layer whose output units are fixed or one group in order, in graph order,
    /// each on the merged model as refitted so far: one merged-model pass per layer, and one
    /// pass of every endpoint too where calibration cannot keep their outputs.
    All,
    /// Every layer where calibration can keep the endpoints' outputs of all of them over the
    /// refit's samples (within `calib::KEEP_BYTES`: the bundled models), else the output
    /// layers alone. On a ViT-B/16 those outputs are tens of gigabytes, and streaming them
    /// costs one pass of every model per layer, 49 there.
    Auto,
}

/// The layers a merge refits, whether each is fitted on the model as the layers before it
/// left it (`every_layer`: one merged-model pass each), and whether calibration keeps their
/// endpoint outputs.
#[derive(Debug, Default)]
pub struct Plan {
    pub layers: Vec<OutputLayer>,
    pub every_layer: bool,
    pub keep: bool,
}

/// The plan for `mode`: `find(all)` lists the layers (`find`), `bytes` what keeping their
/// endpoint outputs costs (`kept_bytes`).
pub fn plan(
    mode: RefitLayers,
    find: impl Fn(bool) -> Vec<OutputLayer>,
    bytes: impl Fn(&[OutputLayer]) -> Option<usize>,
) -> Plan {
    let fits = |layers: &[OutputLayer]| bytes(layers).is_some_and(|b| b <= KEEP_BYTES);
    if mode != RefitLayers::Output {
        let layers = find(true);
        let keep = fits(&layers);
        if keep || mode == RefitLayers::All {
            return Plan {
                layers,
                every_layer: true,
                keep,
            };
        }
    }
    // Calibration checks what it keeps as it goes (an output of unknown size included) and
    // stops keeping past the budget.
    Plan {
        layers: find(false),
        every_layer: false,
        keep: true,
    }
}

/// Bytes of the endpoints' outputs of `layers` over `samples` (4 bytes an element), from
/// model 0's `shapes` inferred at `batch` samples; `None` where a shape is unknown.
pub fn kept_bytes(
    layers: &[OutputLayer],
    shapes: &ShapeMap,
    batch: usize,
    samples: usize,
    models: usize,
) -> Option<usize> {
    let per_batch: usize = layers
        .iter()
        .map(|l| {
            shapes
                .get(&l.output)
                .map(|s| 4 * s.iter().product::<usize>())
        })
        .sum::<Option<usize>>()?;
    Some(per_batch / batch.max(1) * samples * models)
}

/// Fewest rows per unknown of a layer's least-squares system (its inputs and bias, per output
/// unit) for the refit to run: with fewer the fit interpolates its calibration rows. The
/// bundled ViT's 65-unknown head on 64 images (0.98 rows per unknown) lost 9 points (59.2 →
/// 50.3 % task mean), on 128 (1.97) it gained 10; the MLP and depthwise CNN heads gained at
/// either. A ResNet-50's 2,048-input head on 256 images is not refitted, and its pass is
/// saved.
const ROWS_PER_UNKNOWN: f64 = 1.5;

/// Whether `samples` give `layer` enough rows (`ROWS_PER_UNKNOWN`): per sample, its output's
/// positions (tokens, pixels) from model 0's `shapes` at `batch` samples; its inputs from the
/// weight's shape in `model`. Unknown shapes pass (the solve checks the rows it got).
pub fn enough_rows(
    layer: &OutputLayer,
    model: &Model,
    shapes: &ShapeMap,
    batch: usize,
    samples: usize,
) -> bool {
    let Some(out) = shapes.get(&layer.output) else {
        return true;
    };
    let Some(weight) = model
        .graph()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(layer.weight.as_str()))
    else {
        return true;
    };
    let dims: Vec<usize> = weight.dims.iter().map(|&d| d.max(0) as usize).collect();
    let inputs = if layer.trans_b {
        dims.iter().skip(1).product()
    } else {
        dims.first().copied().unwrap_or(0)
    };
    let units = if layer.channels_first {
        out.get(1)
    } else {
        out.last()
    };
    let positions = out.iter().product::<usize>() / units.copied().unwrap_or(1).max(1);
    let rows = positions / batch.max(1) * samples;
    rows as f64 >= ROWS_PER_UNKNOWN * (inputs + 1) as f64
}

/// How the refit runs.
pub struct Fit<'a> {
    /// The calibration inputs; the refit reads the first `samples`, or the batches `kept`
    /// covers.
    pub calib: &'a [TensorData],
    pub samples: usize,
    /// The endpoints' outputs of the layers, kept by calibration (else the endpoints run).
    pub kept: &'a super::calib::Kept,
    pub backend: BackendKind,
    pub options: &'a BackendOptions,
    pub batch: usize,
}

/// The output layers of model 0 (`graph`) in `scope`, in graph order: linear layers whose
/// weight differs between the models, with no such weight after them (unless `all`), whose
/// output units are fixed or one group (plain or blocked) laid out in order. `names[i]` maps
/// model 0's names to model i's.
#[allow(clippy::too_many_arguments)]
pub fn find(
    graph: &Graph,
    models: &[Model],
    names: &[HashMap<String, String>],
    slots: &Slots,
    layout: &Layout,
    groups: &[Group],
    scope: Option<&HashSet<usize>>,
    all: bool,
) -> Vec<OutputLayer> {
    let specific = ModelSpecific::new(graph, models, names);
    let mut out = Vec::new();
    for &n in graph.topological_order() {
        if scope.is_some_and(|s| !s.contains(&n)) {
            continue;
        }
        let Some(mut layer) = linear_layer(graph, n) else {
            continue;
        };
        // Its weight the same in every model: nothing was merged there. A model-specific
        // weight after it: a later layer is the output layer.
        if !specific.reads.contains(&n) || (!all && specific.after(graph, &layer.output)) {
            continue;
        }
        let axis = if layer.channels_first {
            1
        } else {
            slots
                .of(&layer.output)
                .map_or(0, <[_]>::len)
                .saturating_sub(1)
        };
        layer.segments = match slots.slot(&layer.output, axis) {
            None => Vec::new(),
            Some(s) => match output_segments(layout, layout.st.comp_of[s], groups) {
                Some(segments) => segments,
                None => continue,
            },
        };
        out.push(layer);
    }
    out
}

/// The units of an output axis: fixed (no segment), or whole groups end to end, each in its
/// own unit order (plain, or blocked: attention heads, whose matching is still one target per
/// unit); `None` for anything else (fixed and matched units mixed, another order).
fn output_segments(layout: &Layout, comp: usize, groups: &[Group]) -> Option<Vec<Segment>> {
    let owners = super::repair::axis_owners(layout, comp, groups)?;
    if owners.iter().all(Option::is_none) {
        return Some(Vec::new());
    }
    super::repair::segments(layout, comp, groups)
}

/// The nodes of model 0 that read a weight (an initializer of more than one element) whose
/// values differ between the models, and for every node whether such a node comes after it.
struct ModelSpecific {
    reads: HashSet<usize>,
    /// Per node: a node of `reads` reads a value computed from its outputs.
    later: Vec<bool>,
}

impl ModelSpecific {
    fn new(graph: &Graph, models: &[Model], names: &[HashMap<String, String>]) -> ModelSpecific {
        let others: Vec<Option<Graph>> =
            models.iter().skip(1).map(|m| Graph::new(m).ok()).collect();
        let differs = |name: &str| -> bool {
            graph.initializer(name).is_some_and(|t| {
                t.dims.iter().product::<i64>() > 1
                    && others.iter().enumerate().any(|(k, g)| {
                        let other = names
                            .get(k + 1)
                            .and_then(|m| m.get(name))
                            .map_or(name, String::as_str);
                        g.as_ref()
                            .and_then(|g| g.initializer(other))
                            .is_none_or(|o| !same_values(t, o))
                    })
            })
        };
        let reads: HashSet<usize> = (0..graph.nodes().len())
            .filter(|&n| graph.node(n).input.iter().any(|i| differs(i)))
            .collect();
        // Reverse topological order: a node's consumers are decided before it.
        let mut later = vec![false; graph.nodes().len()];
        for &n in graph.topological_order().iter().rev() {
            later[n] = graph.node(n).output.iter().any(|o| {
                graph
                    .consumers(o)
                    .iter()
                    .any(|&(c, _)| reads.contains(&c) || later[c])
            });
        }
        ModelSpecific { reads, later }
    }

    /// A node reading a model-specific weight reads a value computed from `value`.
    fn after(&self, graph: &Graph, value: &str) -> bool {
        graph
            .consumers(value)
            .iter()
            .any(|&(c, _)| self.reads.contains(&c) || self.later[c])
    }
}

/// Two tensor protos hold the same values: the same raw bytes, else the same decoded values.
fn same_values(a: &crate::onnx::proto::TensorProto, b: &crate::onnx::proto::TensorProto) -> bool {
    if a.dims != b.dims || a.data_type != b.data_type {
        return false;
    }
    match (&a.raw_data, &b.raw_data) {
        (Some(x), Some(y)) => x == y,
        _ => match (TensorData::from_proto(a), TensorData::from_proto(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        },
    }
}

/// Node `n` as a linear layer with untied float initializers: Gemm (transA 0, alpha and beta
/// 1) or MatMul with a 2-D weight and an optional bias Add.
fn linear_layer(graph: &Graph, n: usize) -> Option<OutputLayer> {
    let node = graph.node(n);
    let uses = |name: &str| graph.consumers(name).len();
    let attr_f = |name: &str, default: f32| {
        node.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .map_or(default, |a| a.f.unwrap_or(default))
    };
    let attr_i = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .and_then(|a| a.i)
            .unwrap_or(0)
    };
    let input = node.input.first()?.clone();
    let weight = node.input.get(1)?.clone();
    let w = graph.initializer(&weight)?;
    let conv = node.op_type.as_deref() == Some("Conv");
    let shape_ok = if conv {
        pointwise_conv(node, &w.dims)
    } else {
        w.dims.len() == 2
    };
    if uses(&weight) != 1 || !shape_ok || graph.initializer(&input).is_some() {
        return None;
    }
    let out_axis = usize::from(!conv && attr_i("transB") != 1);
    let out_units = usize::try_from(w.dims[out_axis]).ok()?;
    let bias_ok = |b: &str| {
        uses(b) == 1
            && graph
                .initializer(b)
                .is_some_and(|t| t.dims.len() == 1 && t.dims[0] as usize == out_units)
    };
    let output = node.output.first()?.clone();
    // Gemm's C and Conv's B are the bias input; a tied or misshapen one rules the layer out.
    let bias_input = || match node.input.get(2).filter(|b| !b.is_empty()) {
        Some(b) if bias_ok(b) => Some(Some(b.clone())),
        Some(_) => None,
        None => Some(None),
    };
    // (compared output, bias, weight stored [out, in], units on axis 1)
    let (output, bias, trans_b, channels_first) = match node.op_type.as_deref()? {
        "Gemm" => {
            if attr_i("transA") != 0 || attr_f("alpha", 1.0) != 1.0 || attr_f("beta", 1.0) != 1.0 {
                return None;
            }
            (output, bias_input()?, attr_i("transB") == 1, false)
        }
        "Conv" => (output, bias_input()?, true, true),
        "MatMul" => {
            // A following Add of an untied [out] bias is part of the layer.
            let (output, bias) = match graph.consumers(&output) {
                &[(add, _)] if graph.node(add).op_type.as_deref() == Some("Add") => {
                    let a = graph.node(add);
                    match a.input.iter().find(|i| **i != output) {
                        Some(b) if bias_ok(b) => (a.output.first()?.clone(), Some(b.clone())),
                        _ => (output, None),
                    }
                }
                _ => (output, None),
            };
            (output, bias, false, false)
        }
        _ => return None,
    };
    Some(OutputLayer {
        input,
        normalized: normalized(graph, &output),
        output,
        weight,
        trans_b,
        channels_first,
        bias,
        segments: Vec::new(),
    })
}

/// A Conv that is a linear layer over channels: a [out, in, 1, …, 1] weight, one group, unit
/// strides and dilations, no padding.
fn pointwise_conv(node: &crate::onnx::proto::NodeProto, dims: &[i64]) -> bool {
    let attr = |name: &str| {
        node.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
    };
    let ones = |name: &str| {
        attr(name).is_none_or(|a| a.ints.iter().all(|&v| v == 1) && a.i.is_none_or(|v| v == 1))
    };
    let no_pads = attr("pads").is_none_or(|a| a.ints.iter().all(|&v| v == 0));
    let auto_pad = attr("auto_pad")
        .and_then(|a| a.s.as_deref())
        .is_none_or(|s| s == b"NOTSET" || s == b"VALID");
    dims.len() >= 3
        && dims[2..].iter().all(|&d| d == 1)
        && ones("group")
        && ones("strides")
        && ones("dilations")
        && no_pads
        && auto_pad
}

/// `y` is divided by a norm computed from itself (the cosine head's
/// `y / sqrt(sum(y * y) + eps)`), or goes through LpNormalization.
fn normalized(graph: &Graph, y: &str) -> bool {
    graph.consumers(y).iter().any(|&(c, slot)| {
        let node = graph.node(c);
        match node.op_type.as_deref() {
            Some("LpNormalization") => true,
            Some("Div") if slot == 0 => node
                .input
                .get(1)
                .is_some_and(|d| computed_from(graph, d, y, 8)),
            _ => false,
        }
    })
}

/// `value` is computed from `from` within `depth` nodes, through ops that read no tensor
/// initializer but scalars (an epsilon, an exponent).
fn computed_from(graph: &Graph, value: &str, from: &str, depth: usize) -> bool {
    if value == from {
        return true;
    }
    if depth == 0 {
        return false;
    }
    let Some(crate::graph::Source::Node { node, .. }) = graph.source(value) else {
        return false;
    };
    let n = graph.node(node);
    let scalar = |i: &String| {
        graph
            .initializer(i)
            .is_some_and(|t| t.dims.iter().product::<i64>() <= 1)
    };
    n.input
        .iter()
        .filter(|i| !i.is_empty() && !scalar(i))
        .any(|i| computed_from(graph, i, from, depth - 1))
}

/// Refits `layers` of `merged` (model-0 names; `names[i]` maps them to model i's) and returns
/// the weights of those refitted. The merged model runs once over the fit's samples with the
/// layers' inputs as outputs; the endpoints' outputs come from calibration (`fit.kept`) or,
/// without them, from one pass of each endpoint. A layer whose system is singular or
/// non-finite keeps its merged weights.
pub fn refit(
    models: &[Model],
    names: &[HashMap<String, String>],
    merged: &mut Model,
    layers: &[OutputLayer],
    m: &Matchings,
    fit: &Fit,
) -> Result<Vec<String>> {
    // A group's layer is refitted only where its units were matched by a permutation.
    let layers: Vec<OutputLayer> = layers
        .iter()
        .filter(|l| {
            l.segments
                .iter()
                .all(|s| m.p.contains_key(&s.group) && !m.linear.contains_key(&s.group))
        })
        .cloned()
        .collect();
    let layers = &layers[..];
    if layers.is_empty() || fit.samples == 0 || crate::data::sample_count(fit.calib) == 0 {
        return Ok(Vec::new());
    }
    let inputs: Vec<String> = layers.iter().map(|l| l.input.clone()).collect();
    let mut merged_session = with_outputs(merged, &inputs, |up_to| {
        open_session(fit.backend, up_to, &[], fit.options)
    })?;
    // The endpoints' outputs: kept by calibration on its batches, or computed here.
    let kept: Option<Vec<&Vec<TensorData>>> = (fit.kept.values.len() == models.len())
        .then(|| {
            fit.kept
                .values
                .iter()
                .flat_map(|v| layers.iter().map(move |l| v.get(&l.output)))
                .collect::<Option<Vec<_>>>()
        })
        .flatten()
        .filter(|v| v.iter().all(|b| b.len() == fit.kept.ranges.len()));
    let mut endpoints: Vec<(Box<dyn Session>, Vec<String>)> = Vec::new();
    let ranges: Vec<(usize, usize)> = match &kept {
        Some(_) => fit.kept.ranges.clone(),
        None => {
            for (model, map) in models.iter().zip(names) {
                let outs: Vec<String> = layers
                    .iter()
                    .map(|l| map.get(&l.output).cloned().unwrap_or(l.output.clone()))
                    .collect();
                endpoints.push((open_session(fit.backend, model, &outs, fit.options)?, outs));
            }
            let total = fit.samples.min(crate::data::sample_count(fit.calib));
            let batch = fit.batch.max(1);
            (0..total.div_ceil(batch))
                .map(|k| (k * batch, ((k + 1) * batch).min(total)))
                .collect()
        }
    };
    let mut systems: Vec<Option<System>> = vec![None; layers.len()];
    for (b, &(start, end)) in ranges.iter().enumerate() {
        let slice: Vec<TensorData> = fit.calib.iter().map(|t| t.slice_rows(start, end)).collect();
        let x_all = named(merged_session.as_mut(), &slice, &inputs, layers)?;
        let t_all: Vec<Vec<Array2<f64>>> = match &kept {
            Some(kept) => kept
                .chunks(layers.len())
                .map(|per_model| {
                    per_model
                        .iter()
                        .zip(layers)
                        .map(|(batches, l)| as_rows(&batches[b], &l.output, l.channels_first))
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?,
            None => endpoints
                .iter_mut()
                .map(|(s, outs)| named(s.as_mut(), &slice, outs, layers))
                .collect::<Result<_>>()?,
        };
        for (k, layer) in layers.iter().enumerate() {
            let x = &x_all[k];
            let outputs: Vec<&Array2<f64>> = t_all.iter().map(|t| &t[k]).collect();
            let target = mean_output(layer, &outputs, x.nrows(), m)?;
            systems[k]
                .get_or_insert_with(|| System::new(x.ncols(), target.ncols()))
                .add(x, &target);
        }
    }
    drop(merged_session);
    drop(endpoints);
    let mut refitted = Vec::new();
    for (layer, system) in layers.iter().zip(systems) {
        let Some(system) = system else { continue };
        if apply(merged, layer, &system)? {
            refitted.push(layer.weight.clone());
        }
    }
    Ok(refitted)
}

/// `f` of `model` with `values` as its only outputs, so that the engine runs only the nodes
/// they need: a layer's inputs early in the graph cost a fraction of a pass (every layer
/// refitted in turn: about half the passes). The outputs are swapped in place and back, not
/// set on a copy: a copy held the model's weights once more per refitted layer (330 MB each
/// on a ViT-B).
fn with_outputs<T>(model: &mut Model, values: &[String], f: impl FnOnce(&Model) -> T) -> T {
    let only: Vec<ValueInfoProto> = values
        .iter()
        .map(|v| ValueInfoProto {
            name: Some(v.clone()),
            ..Default::default()
        })
        .collect();
    let Some(graph) = model.proto.graph.as_mut() else {
        return f(model);
    };
    let declared = std::mem::replace(&mut graph.output, only);
    let result = f(model);
    if let Some(graph) = model.proto.graph.as_mut() {
        graph.output = declared;
    }
    result
}

/// The endpoints' average output of `layer` on one batch (`outputs[i]`: model i's rows): per
/// merged unit the mean of its cluster's endpoint units (segment by segment, merged segments
/// following each other at their merged widths, as the rewrite lays them out), or for fixed
/// units the plain mean.
/// Where the graph L2-normalises the output, the mean direction at the endpoints' mean length:
/// what the head reads is the direction, and at the models' own scale a merge of a model with
/// itself keeps its weights.
fn mean_output(
    layer: &OutputLayer,
    outputs: &[&Array2<f64>],
    rows: usize,
    m: &Matchings,
) -> Result<Array2<f64>> {
    let units = if layer.segments.is_empty() {
        outputs.first().map_or(0, |t| t.ncols())
    } else {
        layer.segments.iter().map(|s| m.p[&s.group].merged).sum()
    };
    let mut target = Array2::<f64>::zeros((rows, units));
    let mut norms = ndarray::Array1::<f64>::zeros(rows);
    for (i, &t) in outputs.iter().enumerate() {
        if t.nrows() != rows {
            return Err(Error::tensor(
                &layer.output,
                format!(
                    "{} rows in an endpoint against {rows} merged input rows",
                    t.nrows()
                ),
            ));
        }
        let mut t = t.clone();
        if layer.normalized {
            for (mut row, sum) in t.rows_mut().into_iter().zip(norms.iter_mut()) {
                let norm = row.dot(&row).sqrt();
                if norm > 0.0 {
                    row /= norm;
                    *sum += norm;
                }
            }
        }
        if layer.segments.is_empty() {
            target.scaled_add(1.0 / outputs.len() as f64, &t);
        }
        let columns = super::repair::cluster_columns(&layer.segments, m, i);
        if columns.iter().any(|&(from, _, _)| from >= t.ncols()) {
            return Err(Error::tensor(
                &layer.output,
                format!("{} units, fewer than its matched groups'", t.ncols()),
            ));
        }
        for (from, to, size) in columns {
            let w = 1.0 / size.max(1) as f64;
            target.column_mut(to).scaled_add(w, &t.column(from));
        }
    }
    if layer.normalized {
        for (mut row, sum) in target.rows_mut().into_iter().zip(&norms) {
            row *= sum / outputs.len() as f64;
        }
    }
    Ok(target)
}

/// Runs `s` and returns its `wanted` outputs as rows (`as_rows`).
fn named(
    s: &mut dyn Session,
    inputs: &[TensorData],
    wanted: &[String],
    layers: &[OutputLayer],
) -> Result<Vec<Array2<f64>>> {
    let outs = s.run(inputs)?;
    let names = s.output_names().to_vec();
    wanted
        .iter()
        .zip(layers)
        .map(|(w, l)| {
            let at = names.iter().position(|n| n == w).ok_or_else(|| {
                Error::tensor(w, "missing from the engine's outputs for the output refit")
            })?;
            as_rows(&outs[at], w, l.channels_first)
        })
        .collect()
}

/// A value as [rows, units]: units on the last axis (axis 1 when `channels_first`), every
/// other axis a row; NaN and ±inf count as 0.
fn as_rows(t: &TensorData, name: &str, channels_first: bool) -> Result<Array2<f64>> {
    let mut a = t.to_f32();
    if channels_first && a.ndim() > 2 {
        let mut order: Vec<usize> = (0..a.ndim()).filter(|&d| d != 1).collect();
        order.push(1);
        a = a.permuted_axes(order).as_standard_layout().into_owned();
    }
    let units = *a.shape().last().unwrap_or(&1);
    let rows = a.len() / units.max(1);
    let flat: Vec<f64> = a
        .iter()
        .map(|&v| if v.is_finite() { f64::from(v) } else { 0.0 })
        .collect();
    Array2::from_shape_vec((rows, units), flat)
        .map_err(|e| Error::tensor(name, format!("as rows of units: {e}")))
}

/// The normal equations of one layer, over inputs with a constant column appended (the
/// bias): XᵀX and XᵀT, accumulated in f64.
#[derive(Clone)]
struct System {
    gram: Array2<f64>,
    cross: Array2<f64>,
    rows: usize,
}

impl System {
    fn new(inputs: usize, outputs: usize) -> System {
        System {
            gram: Array2::zeros((inputs + 1, inputs + 1)),
            cross: Array2::zeros((inputs + 1, outputs)),
            rows: 0,
        }
    }

    fn add(&mut self, x: &Array2<f64>, t: &Array2<f64>) {
        let ones = Array2::<f64>::ones((x.nrows(), 1));
        let x1 = ndarray::concatenate(Axis(1), &[x.view(), ones.view()]).expect("same rows");
        self.gram += &x1.t().dot(&x1);
        self.cross += &x1.t().dot(t);
        self.rows += x.nrows();
    }

    /// argmin ‖X₁W − T‖² + λ‖W − W₀‖² over the weight rows (the bias row is free), for the
    /// current weights `w0` ([in + 1, out], the bias last); `None` from too few rows
    /// (`ROWS_PER_UNKNOWN`) or a non-finite solution.
    fn solve(&self, w0: &Array2<f64>, with_bias: bool) -> Option<Array2<f64>> {
        let n = self.gram.nrows() - usize::from(!with_bias);
        let d = self.gram.nrows() - 1;
        if (self.rows as f64) < ROWS_PER_UNKNOWN * n as f64 {
            return None;
        }
        let lambda = RIDGE * (0..d).map(|i| self.gram[[i, i]]).sum::<f64>() / d.max(1) as f64;
        let lambda = lambda.max(1e-12);
        let a = Mat::<f64>::from_fn(n, n, |i, j| {
            self.gram[[i, j]] + if i == j && i < d { lambda } else { 0.0 }
        });
        let b = Mat::<f64>::from_fn(n, self.cross.ncols(), |i, j| {
            self.cross[[i, j]] + if i < d { lambda * w0[[i, j]] } else { 0.0 }
        });
        let x = a.partial_piv_lu().solve(&b);
        let out = Array2::from_shape_fn((n, self.cross.ncols()), |(i, j)| x[(i, j)]);
        out.iter().all(|v| v.is_finite()).then_some(out)
    }
}

/// Writes the refitted weights of `layer` into `merged`; false when it kept its own.
fn apply(merged: &mut Model, layer: &OutputLayer, system: &System) -> Result<bool> {
    let Some(graph) = merged.proto.graph.as_mut() else {
        return Ok(false);
    };
    let find = |name: &str| {
        graph
            .initializer
            .iter()
            .position(|t| t.name.as_deref() == Some(name))
    };
    let Some(wi) = find(&layer.weight) else {
        return Ok(false);
    };
    let Some(w) = as_f64(&TensorData::from_proto(&graph.initializer[wi])?) else {
        return Ok(false);
    };
    // A 1×1 Conv's [out, in, 1, …] as [out, in]; stored back in its own shape.
    let shape = w.shape().to_vec();
    let flat_in: usize = shape.iter().skip(1).product();
    let w = Array2::from_shape_vec(
        (shape.first().copied().unwrap_or(0), flat_in),
        w.iter().copied().collect(),
    )
    .map_err(|e| Error::tensor(&layer.weight, e.to_string()))?;
    // [in, out], the bias row appended.
    let w_in_out = if layer.trans_b { w.t().to_owned() } else { w };
    let (inputs, outputs) = w_in_out.dim();
    if system.gram.nrows() != inputs + 1 || system.cross.ncols() != outputs {
        return Ok(false);
    }
    let bias_index = layer.bias.as_deref().and_then(find);
    let bias: Vec<f64> = match bias_index {
        Some(i) => match as_f64(&TensorData::from_proto(&graph.initializer[i])?) {
            Some(b) => b.iter().copied().collect(),
            None => return Ok(false),
        },
        None => vec![0.0; outputs],
    };
    let mut w0 = Array2::<f64>::zeros((inputs + 1, outputs));
    w0.slice_mut(ndarray::s![..inputs, ..]).assign(&w_in_out);
    w0.row_mut(inputs)
        .assign(&ndarray::Array1::from_vec(bias.clone()));
    let Some(solved) = system.solve(&w0, bias_index.is_some()) else {
        return Ok(false);
    };
    let weights = solved.slice(ndarray::s![..inputs, ..]).to_owned();
    let stored = if layer.trans_b {
        weights.t().to_owned()
    } else {
        weights
    };
    let stored = ArrayD::from_shape_vec(shape, stored.iter().copied().collect())
        .map_err(|e| Error::tensor(&layer.weight, e.to_string()))?;
    store_float(&mut graph.initializer[wi], stored.into_dyn());
    if let Some(i) = bias_index {
        let b: ArrayD<f64> = solved.row(inputs).to_owned().into_dyn();
        store_float(&mut graph.initializer[i], b);
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str) -> OutputLayer {
        OutputLayer {
            input: format!("{name}_in"),
            output: format!("{name}_out"),
            weight: format!("{name}_w"),
            trans_b: true,
            channels_first: false,
            bias: None,
            normalized: false,
            segments: Vec::new(),
        }
    }

    /// `find(all)`: two hidden layers and the head, or the head alone.
    fn find(all: bool) -> Vec<OutputLayer> {
        let head = vec![layer("head")];
        if all {
            [vec![layer("fc1"), layer("fc2")], head].concat()
        } else {
            head
        }
    }

    fn weights(plan: &Plan) -> Vec<&str> {
        plan.layers.iter().map(|l| l.weight.as_str()).collect()
    }

    /// Auto refits every layer only where calibration can keep all their outputs; past the
    /// budget, or where a shape is unknown, the output layer alone (from kept outputs, as
    /// calibration checks what it keeps). `All` streams what it cannot keep.
    #[test]
    fn auto_refits_every_layer_only_within_the_keep_budget() {
        let auto = |bytes: Option<usize>| plan(RefitLayers::Auto, find, |_| bytes);
        let fits = auto(Some(KEEP_BYTES));
        assert!(fits.every_layer && fits.keep);
        assert_eq!(weights(&fits), ["fc1_w", "fc2_w", "head_w"]);
        for over in [Some(KEEP_BYTES + 1), None] {
            let head = auto(over);
            assert!(!head.every_layer && head.keep);
            assert_eq!(weights(&head), ["head_w"]);
        }
        let all = plan(RefitLayers::All, find, |_| Some(KEEP_BYTES + 1));
        assert!(all.every_layer && !all.keep);
        assert_eq!(all.layers.len(), 3);
        let output = plan(RefitLayers::Output, find, |_| Some(0));
        assert!(!output.every_layer && output.keep);
        assert_eq!(weights(&output), ["head_w"]);
    }

    /// Rows per sample are the output's positions; unknowns the weight's inputs and the bias:
    /// a [10, 64] head needs 1.5 × 65 = 97.5 rows, a 1×1 conv over 32 channels on 4 × 4
    /// pixels 1.5 × 33 = 49.5, that is 4 images.
    #[test]
    fn a_layer_is_refitted_only_from_enough_rows() {
        use crate::onnx::proto::{GraphProto, ModelProto, TensorProto};
        let weight = |name: &str, dims: Vec<i64>| TensorProto {
            name: Some(name.to_string()),
            dims,
            ..Default::default()
        };
        let model = Model {
            proto: ModelProto {
                graph: Some(GraphProto {
                    initializer: vec![
                        weight("head_w", vec![10, 64]),
                        weight("conv_w", vec![16, 32, 1, 1]),
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            },
            path: None,
            data_files: Vec::new(),
        };
        let shapes: ShapeMap = [
            ("head_out".to_string(), vec![8, 10]),
            ("conv_out".to_string(), vec![8, 16, 4, 4]),
        ]
        .into_iter()
        .collect();
        let head = layer("head");
        assert!(!enough_rows(&head, &model, &shapes, 8, 97));
        assert!(enough_rows(&head, &model, &shapes, 8, 98));
        let conv = OutputLayer {
            channels_first: true,
            ..layer("conv")
        };
        assert!(!enough_rows(&conv, &model, &shapes, 8, 3));
        assert!(enough_rows(&conv, &model, &shapes, 8, 4));
        // Unknown shapes pass: the solve counts the rows it got.
        assert!(enough_rows(&layer("fc9"), &model, &shapes, 8, 1));
        let mut system = System::new(64, 10);
        let x = Array2::<f64>::ones((97, 64));
        system.add(&x, &Array2::zeros((97, 10)));
        assert!(system.solve(&Array2::zeros((65, 10)), true).is_none());
        system.add(&Array2::ones((1, 64)), &Array2::zeros((1, 10)));
        assert!(system.solve(&Array2::zeros((65, 10)), true).is_some());
    }

    /// The bytes kept: per sample from shapes at the batch, times samples and models.
    #[test]
    fn kept_bytes_scale_from_the_inferred_batch() {
        let shapes: ShapeMap = [
            ("fc1_out".to_string(), vec![8, 16]),
            ("head_out".to_string(), vec![8, 4, 2]),
        ]
        .into_iter()
        .collect();
        let layers = [layer("fc1"), layer("head")];
        // (16 + 8) floats a sample, 100 samples, 2 models.
        assert_eq!(
            kept_bytes(&layers, &shapes, 8, 100, 2),
            Some(4 * 24 * 100 * 2)
        );
        assert_eq!(kept_bytes(&[layer("fc2")], &shapes, 8, 100, 2), None);
    }
}
