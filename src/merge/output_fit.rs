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
//! convolutions over channels, k×k and depthwise convolutions over their input patches, a
//! convolution with the BatchNormalization that alone reads it as one layer): refitted in
//! graph order, each on the merged model as the
//! layers before it left it, they give the layers after them features closer to the
//! endpoints' (`RefitLayers`: by default wherever calibration can keep all their endpoint
//! outputs; on the bundled ViTs 70.8 → 76.8 and 70.2 → 78.6 % task mean against the output
//! layer alone). Fitting them all at once from the unrefitted model instead (one pass, as
//! often as three times) was measured: the ViTs fell to 36–61 %, the depthwise CNN to 20–23 %;
//! each layer's fit is stale once the layers before it move.

use std::collections::{HashMap, HashSet};

use faer::prelude::Solve;
use faer::Mat;
use ndarray::{Array2, ArrayD, ArrayView2, ArrayViewMut2, Axis};

use super::calib::KEEP_BYTES;
use super::conv_patches::{group_weights, ConvGeometry};
use super::frontier::Frontier;
use super::repair::Segment;
use super::store_float;
use super::taps::UnitMoments;
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
    /// The weight is stored [out, in] (Gemm with transB; a Conv's [out, in, k, k]), else
    /// [in, out].
    pub trans_b: bool,
    /// A Conv: the units are on axis 1 of its input and output (else the last axis), and
    /// every output pixel is a row.
    pub channels_first: bool,
    /// A 1-D [out] bias initializer (Gemm's C, or the Add's).
    pub bias: Option<String>,
    /// A k×k or depthwise Conv: fitted over its input patches (`conv_patches`), else over
    /// its input units.
    pub patches: Option<ConvGeometry>,
    /// A Conv read only by an inference BatchNormalization: the layer is the two together
    /// (compared at the normalisation's output), and the fitted bias goes into its shift.
    pub norm: Option<NormParams>,
    /// Calibration samples its fit reads (`layer_samples`).
    pub samples: usize,
    /// L2-normalised over its units downstream: targets are averaged as directions.
    pub normalized: bool,
    /// The groups its output units are, end to end (one group, or a packed projection's Q, K
    /// and V ranges); empty where they are fixed.
    pub segments: Vec<Segment>,
}

impl OutputLayer {
    /// Whether `refit` fits it under matchings `m`: a group's layer only where its units
    /// were matched by a permutation.
    pub fn fits(&self, m: &Matchings) -> bool {
        self.segments
            .iter()
            .all(|s| m.p.contains_key(&s.group) && !m.linear.contains_key(&s.group))
    }

    /// The initializers a refit of it sets, as statistics repair names the layers it
    /// corrects (`repair::Layers`): its weight, and the running mean of its BatchNorm.
    pub fn initializers(&self) -> impl Iterator<Item = &String> {
        std::iter::once(&self.weight).chain(self.norm.as_ref().map(|n| &n.mean))
    }
}

/// A BatchNormalization's parameter initializers and epsilon: per channel it scales by
/// `s = γ/√(σ² + ε)` and shifts by `β − s·μ`.
#[derive(Debug, Clone)]
pub struct NormParams {
    pub scale: String,
    pub shift: String,
    pub mean: String,
    pub var: String,
    pub epsilon: f64,
}

/// Which layers the refit fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefitLayers {
    /// The output layers alone.
    Output,
    /// Every linear layer whose output units are fixed or one group in order, in graph order,
    /// each on the merged model as refitted so far: each node of the merged model run once
    /// across the layers (`frontier`; a pass up to each layer where it gives up), and one pass
    /// of every endpoint per layer where calibration cannot keep their outputs.
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
        // Empty under `Auto`: every layer was over a budget; the output layer may still be
        // refitted below.
        let layers = find(true);
        let keep = fits(&layers);
        if (keep && !layers.is_empty()) || mode == RefitLayers::All {
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

/// Bytes of the endpoints' outputs of `layers` over each layer's samples (4 bytes an
/// element), from model 0's `shapes` inferred at `batch` samples; `None` where a shape is
/// unknown.
pub fn kept_bytes(
    layers: &[OutputLayer],
    shapes: &ShapeMap,
    batch: usize,
    models: usize,
) -> Option<usize> {
    let per_model: usize = layers
        .iter()
        .map(|l| {
            shapes
                .get(&l.output)
                .map(|s| 4 * s.iter().product::<usize>() / batch.max(1) * l.samples)
        })
        .sum::<Option<usize>>()?;
    Some(per_model * models)
}

/// Rows per unknown a convolution's fit reads: every output pixel is a row, so a few images
/// give a 3×3 convolution far more rows than its unknowns; the samples it needs, not the
/// refit's thousand, bound its passes, its kept outputs and its normal equations. Measured on
/// the bundled BN-folded ResNet-20 pair (task mean, every conv refitted, at least 64 samples):
/// 8 → 87.15, 16 → 87.2, 32 → 87.3, 64 → 87.4, all 1,000 samples → 87.6; the refit's time
/// 2.4, 2.7, 3.8, 6.5 and 40 s (streamed). The refit's time is then the merged model's
/// prefix passes and the stage-3 convolutions' normal equations.
const CONV_ROWS_PER_UNKNOWN: f64 = 8.0;

/// Fewest samples a convolution's fit reads: neighbouring pixels of one image are far from
/// independent rows. With 8 rows per unknown, 32 against 64 (the ResNet-20 pairs' 3×3
/// convolutions of the first two stages need fewer): BN-folded 87.15 → 87.4, BN-kept 87.3 →
/// 86.95, GN 71.3 → 70.9, depthwise CNN 73.95 → 74.3 (within the ±1-point sampling error), the
/// ResNets' refit 2.4 → 1.9 s.
const CONV_MIN_SAMPLES: usize = 32;

/// The calibration samples `layer`'s fit reads, of `samples`: all of them for a layer over
/// units, enough for `CONV_ROWS_PER_UNKNOWN` rows per unknown (and `CONV_MIN_SAMPLES`) for a
/// convolution (positions from model 0's `shapes` at `batch` samples, unknowns from its
/// weight in `model`).
pub fn layer_samples(
    layer: &OutputLayer,
    model: &Model,
    shapes: &ShapeMap,
    batch: usize,
    samples: usize,
) -> usize {
    if !layer.channels_first {
        return samples;
    }
    let (Some(out), Some((inputs, _))) = (shapes.get(&layer.output), unknowns(layer, model)) else {
        return samples;
    };
    let pixels = positions(layer, out, batch).max(1);
    let needed = (CONV_ROWS_PER_UNKNOWN * (inputs + 1) as f64 / pixels as f64).ceil() as usize;
    needed.max(CONV_MIN_SAMPLES).min(samples)
}

/// A layer's inputs per output unit (its weight's, per group) and its output units.
fn unknowns(layer: &OutputLayer, model: &Model) -> Option<(usize, usize)> {
    let weight = model
        .graph()
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(layer.weight.as_str()))?;
    let dims: Vec<usize> = weight.dims.iter().map(|&d| d.max(0) as usize).collect();
    Some(if layer.trans_b {
        (
            dims.iter().skip(1).product(),
            dims.first().copied().unwrap_or(0),
        )
    } else {
        (
            dims.first().copied().unwrap_or(0),
            dims.get(1).copied().unwrap_or(0),
        )
    })
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
    let (Some(out), Some((inputs, _))) = (shapes.get(&layer.output), unknowns(layer, model)) else {
        return true;
    };
    let rows = positions(layer, out, batch) * samples;
    rows as f64 >= ROWS_PER_UNKNOWN * (inputs + 1) as f64
}

/// Rows one sample gives `layer`: its output's positions (tokens, pixels), from its shape
/// `out` inferred at `batch` samples over its units (axis 1 of a Conv's output, else the last).
fn positions(layer: &OutputLayer, out: &[usize], batch: usize) -> usize {
    let units = if layer.channels_first {
        out.get(1)
    } else {
        out.last()
    };
    out.iter().product::<usize>() / (batch.max(1) * units.copied().unwrap_or(1).max(1))
}

/// Most multiply-adds of one convolution's normal equations (rows × unknowns² per group, at
/// its samples): ≈ 1 s of f64 GEMM on the reference machine. Every ResNet-20 and depthwise
/// CNN convolution is far below it (≤ 3·10⁹); a ResNet-50's last-stage 3×3 convolutions
/// (4,609 unknowns over 256 images of 7 × 7 pixels: 2.7·10¹¹) are above it and keep their
/// merged weights, as every convolution did before patches were fitted.
const CONV_MULTIPLY_ADDS: f64 = 5e10;

/// Whether `layer`'s normal equations over `samples` cost at most `CONV_MULTIPLY_ADDS`: always
/// for a layer over units (its cost is bounded by the keep budget and `--refit-layers`), and
/// where a shape is unknown.
pub fn affordable(
    layer: &OutputLayer,
    model: &Model,
    shapes: &ShapeMap,
    batch: usize,
    samples: usize,
) -> bool {
    layer.patches.is_none()
        || normal_equation_cost(layer, model, shapes, batch, samples)
            .is_none_or(|cost| cost <= CONV_MULTIPLY_ADDS)
}

/// Most multiply-adds of all convolutions' normal equations together under
/// `RefitLayers::Auto` (≈ 2 s of f64 GEMM): the bundled ResNet-20 pairs need 2·10¹⁰, a
/// real-size ResNet-18's first two stages at 224² ten times more.
const AUTO_CONV_MULTIPLY_ADDS: f64 = 1e11;

/// Under `RefitLayers::Auto`, the convolutions (`channels_first` layers) stay in the refit's
/// layers only while their fits cost little beside calibration: their samples together at
/// most `calibration_passes` (samples × models: the refit's merged passes over them then
/// cost at most calibration's passes), and their normal equations at most
/// `AUTO_CONV_MULTIPLY_ADDS`. Else all of them are left out (the layers over units and the
/// head stay, as the keep budget decides): a ResNet-50's fifty convolutions at 224² would
/// double its merge. `--refit-layers all` refits them regardless.
pub fn auto_conv_budget(
    layers: &mut Vec<OutputLayer>,
    model: &Model,
    shapes: &ShapeMap,
    batch: usize,
    calibration_passes: usize,
) {
    let convs: Vec<&OutputLayer> = layers.iter().filter(|l| l.channels_first).collect();
    let samples: usize = convs.iter().map(|l| l.samples).sum();
    let multiply_adds: f64 = convs
        .iter()
        .map(|l| normal_equation_cost(l, model, shapes, batch, l.samples).unwrap_or(f64::INFINITY))
        .sum();
    if samples > calibration_passes || multiply_adds > AUTO_CONV_MULTIPLY_ADDS {
        layers.retain(|l| !l.channels_first);
    }
}

/// Most bytes of merged model that the refit of every layer may open under
/// `RefitLayers::Auto`, summed over its layers: each refitted layer opened the merged model in
/// the engine once (the prefix up to its input must see the layers refitted before it), and
/// still does where the frontier gives up (`frontier`: else each step opens only the nodes it
/// runs). A timm ViT-B/16 pair (330 MB a model) from 8 calibration images refitted its 49 token
/// layers in 107 s, before the frontier, on a merge whose other phases took 81 s; the bundled
/// models (≤ 2 MB, ≤ 25 layers) open a few MB in all.
pub const AUTO_SESSION_BYTES: usize = 2 << 30;

/// Whether the refit of `layers`, each opening a merged model of `model_bytes`, stays within
/// `AUTO_SESSION_BYTES`.
pub fn sessions_affordable(layers: &[OutputLayer], model_bytes: usize) -> bool {
    layers.len().saturating_mul(model_bytes) <= AUTO_SESSION_BYTES
}

/// Multiply-adds of `layer`'s normal equations over `samples`: rows × unknowns² (per group);
/// `None` where a shape is unknown.
fn normal_equation_cost(
    layer: &OutputLayer,
    model: &Model,
    shapes: &ShapeMap,
    batch: usize,
    samples: usize,
) -> Option<f64> {
    let out = shapes.get(&layer.output)?;
    let (inputs, outputs) = unknowns(layer, model)?;
    let rows = positions(layer, out, batch) * samples;
    let groups = layer.patches.as_ref().map_or(1, |g| g.groups(outputs));
    Some(rows as f64 * groups as f64 * ((inputs + 1) as f64).powi(2))
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
    /// Weights of layers statistics repair left to the refit unrepaired
    /// (`repair::Layers::Unless`): each is fitted with its ridge leaning on its weights as
    /// repair would have left them (`System::repair`, from the fit's own rows), not on the
    /// merged ones. The ridge decides the fit along directions its rows barely span: leaning
    /// on the unrepaired weights moved task means on the bundled pairs by up to 0.1 points,
    /// 0.05 with this (the GroupNorm ResNet-20's by up to 0.6 either way).
    pub repair_anchors: &'a HashSet<String>,
}

/// Per endpoint, its output units' moments over a layer's fit rows: the statistics repair
/// would have corrected the layer to (`repair::cluster_goal_of`).
struct Anchor(Vec<UnitMoments>);

impl Anchor {
    fn add(&mut self, outputs: &[&Array2<f64>], rows: usize, name: &str) -> Result<()> {
        if self.0.is_empty() {
            self.0 = outputs
                .iter()
                .map(|t| UnitMoments::new(t.ncols()))
                .collect();
        }
        for (moments, t) in self.0.iter_mut().zip(outputs) {
            moments.add_rows(t.slice(ndarray::s![..rows.min(t.nrows()), ..]), name)?;
        }
        Ok(())
    }

    /// Per merged unit, the repair goal (mean, standard deviation).
    fn goal(
        &self,
        layer: &OutputLayer,
        m: &Matchings,
    ) -> (ndarray::Array1<f64>, ndarray::Array1<f64>) {
        let stats: Vec<_> = self.0.iter().map(UnitMoments::mean_std).collect();
        super::repair::cluster_goal_of(&stats, &layer.segments, m)
    }
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
    let patches = if conv && !pointwise_conv(node, &w.dims) {
        Some(ConvGeometry::of(node, &w.dims)?)
    } else {
        None
    };
    let shape_ok = conv || w.dims.len() == 2;
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
    let mut norm = None;
    // (compared output, bias, weight stored [out, in], units on axis 1)
    let (output, bias, trans_b, channels_first) = match node.op_type.as_deref()? {
        "Gemm" => {
            if attr_i("transA") != 0 || attr_f("alpha", 1.0) != 1.0 || attr_f("beta", 1.0) != 1.0 {
                return None;
            }
            (output, bias_input()?, attr_i("transB") == 1, false)
        }
        "Conv" => match batch_norm_after(graph, &output, out_units) {
            Some((normalized, params)) => {
                norm = Some(params);
                (normalized, bias_input()?, true, true)
            }
            None => (output, bias_input()?, true, true),
        },
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
        patches,
        norm,
        samples: 0,
        segments: Vec::new(),
    })
}

/// The BatchNormalization (inference form: one output, untied [units] parameter
/// initializers) that alone reads `value`, as its output and parameters.
fn batch_norm_after(graph: &Graph, value: &str, units: usize) -> Option<(String, NormParams)> {
    let &[(n, 0)] = graph.consumers(value) else {
        return None;
    };
    let node = graph.node(n);
    if node.op_type.as_deref() != Some("BatchNormalization")
        || node.output.len() != 1
        || node.input.len() != 5
        || crate::symmetry::rules::attr_int(node, "training_mode").is_some_and(|m| m != 0)
    {
        return None;
    }
    let param = |i: usize| {
        let name = node.input.get(i)?;
        let t = graph.initializer(name)?;
        (graph.consumers(name).len() == 1 && t.dims.len() == 1 && t.dims[0] as usize == units)
            .then(|| name.clone())
    };
    Some((
        node.output.first()?.clone(),
        NormParams {
            scale: param(1)?,
            shift: param(2)?,
            mean: param(3)?,
            var: param(4)?,
            epsilon: super::bn_fold::epsilon(node),
        },
    ))
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
    frontier: Option<&mut Frontier>,
) -> Result<Vec<String>> {
    let layers: Vec<OutputLayer> = layers.iter().filter(|l| l.fits(m)).cloned().collect();
    let layers = &layers[..];
    if layers.is_empty() || fit.samples == 0 || crate::data::sample_count(fit.calib) == 0 {
        return Ok(Vec::new());
    }
    let inputs: Vec<String> = layers.iter().map(|l| l.input.clone()).collect();
    // The endpoints' outputs: kept by calibration on its batches, or computed here.
    // Each layer reads its own first samples (a convolution fewer than the refit's).
    let samples_of = |l: &OutputLayer| samples_of(l, fit);
    let batches_of = |l: &OutputLayer, ranges: &[(usize, usize)]| {
        ranges.iter().take_while(|r| r.0 < samples_of(l)).count()
    };
    let kept: Option<Vec<&Vec<TensorData>>> = (fit.kept.values.len() == models.len())
        .then(|| {
            fit.kept
                .values
                .iter()
                .flat_map(|v| layers.iter().map(move |l| v.get(&l.output)))
                .collect::<Option<Vec<_>>>()
        })
        .flatten()
        .filter(|v| {
            v.iter()
                .zip(layers.iter().cycle())
                .all(|(b, l)| b.len() >= batches_of(l, &fit.kept.ranges))
        });
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
            let total = layers.iter().map(samples_of).max().unwrap_or(0);
            let total = total.min(crate::data::sample_count(fit.calib));
            let batch = fit.batch.max(1);
            (0..total.div_ceil(batch))
                .map(|k| (k * batch, ((k + 1) * batch).min(total)))
                .collect()
        }
    };
    // The merged model's values of the layer's input: from the frontier (every node computed
    // once across the layers, on its batches, which are then this refit's), else from a
    // pass of the model up to it.
    let all_samples = crate::data::sample_count(fit.calib);
    let ready: Option<&Frontier> = match (frontier, layers) {
        (Some(f), [layer])
            if f.covers(samples_of(layer).min(all_samples))
                && (kept.is_none() || ranges.starts_with(f.ranges())) =>
        {
            let ready = f.advance(merged, &layer.input, fit.calib, fit.backend, fit.options)?;
            ready.then_some(&*f)
        }
        _ => None,
    };
    let frontier_values = ready.and_then(|f| Some((f.values(&inputs[0])?, f.ranges().to_vec())));
    let ranges = match &frontier_values {
        Some((_, r)) => r.clone(),
        None => ranges,
    };
    let mut merged_session = match frontier_values {
        Some(_) => None,
        None => Some(with_outputs(merged, &inputs, |up_to| {
            open_session(fit.backend, up_to, &[], fit.options)
        })?),
    };
    // Per layer its normal equations: one system, or one per group of a patch layer.
    let mut systems: Vec<Vec<System>> = vec![Vec::new(); layers.len()];
    let mut anchors: Vec<Option<Anchor>> = layers
        .iter()
        .map(|l| {
            fit.repair_anchors
                .contains(&l.weight)
                .then(|| Anchor(Vec::new()))
        })
        .collect();
    for (b, &(start, end)) in ranges.iter().enumerate() {
        let active: Vec<bool> = layers.iter().map(|l| start < samples_of(l)).collect();
        if !active.contains(&true) {
            break;
        }
        // Only the samples the active convolutions read (axis 0 of a Conv's values is the
        // batch): 32 of a batch of 64 (the every-layer refit of a ResNet-20 ran each prefix
        // over twice the samples it used).
        let batch_end = end;
        let reading: Vec<&OutputLayer> = layers
            .iter()
            .zip(&active)
            .filter(|p| *p.1)
            .map(|p| p.0)
            .collect();
        let end = match reading.iter().all(|l| l.channels_first) {
            true => reading
                .iter()
                .map(|l| samples_of(l).min(end))
                .max()
                .unwrap_or(end),
            false => end,
        };
        // The calibration batch, for the merged model's pass and the endpoints' (none runs
        // where the frontier and calibration's kept outputs serve).
        let slice: Vec<TensorData> = match merged_session.is_some() || kept.is_none() {
            true => fit.calib.iter().map(|t| t.slice_rows(start, end)).collect(),
            false => Vec::new(),
        };
        let x_all: Vec<std::borrow::Cow<TensorData>> = match (&frontier_values, &mut merged_session)
        {
            // The frontier's batch, cut to the samples a convolution's pass reads.
            (Some((values, _)), _) => vec![match end < batch_end {
                true => std::borrow::Cow::Owned(values[b].slice_rows(0, end - start)),
                false => std::borrow::Cow::Borrowed(&values[b]),
            }],
            (None, Some(session)) => named(session.as_mut(), &slice, &inputs)?
                .into_iter()
                .map(std::borrow::Cow::Owned)
                .collect(),
            (None, None) => unreachable!("the session is opened without the frontier's values"),
        };
        // Per model, per active layer: the endpoint's output as rows.
        let t_all: Vec<Vec<Option<Array2<f64>>>> = match &kept {
            Some(kept) => kept
                .chunks(layers.len())
                .map(|per_model| {
                    per_model
                        .iter()
                        .zip(layers.iter().zip(&active))
                        .map(|(batches, (l, &on))| {
                            on.then(|| {
                                let kept = &batches[b];
                                match kept.shape().first() {
                                    Some(&n) if n == batch_end - start && end < batch_end => {
                                        as_rows(
                                            &kept.slice_rows(0, end - start),
                                            &l.output,
                                            l.channels_first,
                                        )
                                    }
                                    _ => as_rows(kept, &l.output, l.channels_first),
                                }
                            })
                            .transpose()
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?,
            None => endpoints
                .iter_mut()
                .map(|(s, outs)| {
                    named(s.as_mut(), &slice, outs)?
                        .iter()
                        .zip(outs.iter().zip(layers.iter().zip(&active)))
                        .map(|(t, (name, (l, &on)))| {
                            on.then(|| as_rows(t, name, l.channels_first)).transpose()
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .collect::<Result<_>>()?,
        };
        for (k, layer) in layers.iter().enumerate() {
            let Some(outputs) = t_all
                .iter()
                .map(|t| t[k].as_ref())
                .collect::<Option<Vec<_>>>()
            else {
                continue;
            };
            let rows = outputs.first().map_or(0, |t| t.nrows());
            let mut target = mean_output(layer, &outputs, rows, m)?;
            // A convolution reads its own first samples, within a batch too (axis 0 is
            // ONNX Conv's batch), whatever batches the outputs were kept in.
            let mut x = std::borrow::Cow::Borrowed(&*x_all[k]);
            let take = samples_of(layer).min(end) - start;
            if layer.channels_first && take < end - start {
                let per_sample = rows / (end - start);
                target = target
                    .slice(ndarray::s![..take * per_sample, ..])
                    .to_owned();
                x = std::borrow::Cow::Owned(x_all[k].slice_rows(0, take));
            }
            let rows = target.nrows();
            if let Some(anchor) = anchors[k].as_mut() {
                anchor.add(&outputs, rows, &layer.output)?;
            }
            match &layer.patches {
                Some(geometry) => {
                    geometry.accumulate(&layer.input, &x.to_f32(), &target, &mut systems[k])?
                }
                None => {
                    let x = as_rows(&x, &layer.input, layer.channels_first)?;
                    if x.nrows() != rows {
                        return Err(Error::tensor(
                            &layer.output,
                            format!(
                                "{rows} rows in the endpoints against {} merged input rows",
                                x.nrows()
                            ),
                        ));
                    }
                    if systems[k].is_empty() {
                        systems[k].push(System::new(x.ncols(), target.ncols()));
                    }
                    systems[k][0].add(&x, &target);
                }
            }
        }
    }
    drop(merged_session);
    drop(endpoints);
    let mut refitted = Vec::new();
    for ((layer, mut system), anchor) in layers.iter().zip(systems).zip(anchors) {
        if system.is_empty() {
            continue;
        }
        let goal = anchor.map(|a| a.goal(layer, m));
        if apply(merged, layer, &mut system, goal.as_ref())? {
            refitted.push(layer.weight.clone());
        }
    }
    Ok(refitted)
}

/// The calibration samples `layer`'s fit reads: its own (a convolution's few), at most the
/// refit's.
fn samples_of(layer: &OutputLayer, fit: &Fit) -> usize {
    match layer.samples {
        0 => fit.samples,
        n => n.min(fit.samples),
    }
}

/// A frontier for refitting `layers` one by one (`Frontier`), on the batches the refits use
/// (calibration's where it kept the endpoints' outputs, else `fit.batch`-sample batches) over
/// the most samples a layer but the last reads. The last (the output layer) is often read
/// over many more samples than the convolutions before it (1,000 against 32–95 on the
/// bundled ResNet-20s): holding every value over those for it made the convolutions' passes
/// over them cost three times the prefixes they replaced, so it runs its own pass there. Its
/// held values may take `KEEP_BYTES`, as calibration's kept outputs may.
pub fn frontier(merged: &Model, layers: &[OutputLayer], fit: &Fit) -> Frontier {
    let before_last = match layers {
        [only] => std::slice::from_ref(only),
        [before @ .., _] => before,
        [] => &[],
    };
    let total = before_last
        .iter()
        .map(|l| samples_of(l, fit))
        .max()
        .unwrap_or(0)
        .min(crate::data::sample_count(fit.calib));
    let ranges = if fit.kept.values.is_empty() {
        let batch = fit.batch.max(1);
        (0..total.div_ceil(batch))
            .map(|k| (k * batch, ((k + 1) * batch).min(total)))
            .collect()
    } else {
        fit.kept
            .ranges
            .iter()
            .copied()
            .take_while(|r| r.0 < total)
            .collect()
    };
    Frontier::new(merged, ranges, KEEP_BYTES)
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
                    "{} rows in an endpoint against {rows} in the first",
                    t.nrows()
                ),
            ));
        }
        // A copy only where its rows are normalised first.
        let t = if layer.normalized {
            let mut t = t.clone();
            for (mut row, sum) in t.rows_mut().into_iter().zip(norms.iter_mut()) {
                let norm = row.dot(&row).sqrt();
                if norm > 0.0 {
                    row /= norm;
                    *sum += norm;
                }
            }
            std::borrow::Cow::Owned(t)
        } else {
            std::borrow::Cow::Borrowed(t)
        };
        if layer.segments.is_empty() {
            target.scaled_add(1.0 / outputs.len() as f64, &*t);
        }
        let columns = super::repair::cluster_columns(&layer.segments, m, i);
        if columns
            .iter()
            .any(|&(from, to, _)| from >= t.ncols() || to >= units)
        {
            return Err(Error::tensor(
                &layer.output,
                format!("{} units, fewer than its matched groups'", t.ncols()),
            ));
        }
        let weighted: Vec<(usize, usize, f64)> = columns
            .into_iter()
            .map(|(from, to, size)| (from, to, 1.0 / size.max(1) as f64))
            .collect();
        // Row by row (both row-major): each element gets the same additions in the same
        // order as a column at a time, without a strided walk per column.
        for (src, mut dst) in t.rows().into_iter().zip(target.rows_mut()) {
            for &(from, to, w) in &weighted {
                dst[to] += w * src[from];
            }
        }
    }
    if layer.normalized {
        for (mut row, sum) in target.rows_mut().into_iter().zip(&norms) {
            row *= sum / outputs.len() as f64;
        }
    }
    Ok(target)
}

/// Runs `s` and returns its `wanted` outputs.
fn named(s: &mut dyn Session, inputs: &[TensorData], wanted: &[String]) -> Result<Vec<TensorData>> {
    let mut outs = s.run(inputs)?;
    let names = s.output_names().to_vec();
    wanted
        .iter()
        .map(|w| {
            let at = names.iter().position(|n| n == w).ok_or_else(|| {
                Error::tensor(w, "missing from the engine's outputs for the output refit")
            })?;
            Ok(std::mem::replace(
                &mut outs[at],
                TensorData::F32(ArrayD::zeros(vec![0])),
            ))
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
pub(super) struct System {
    /// Its upper triangle only (`Symmetric`): a 3×3 convolution's 577 inputs cost 72 % of
    /// the full product's multiply-adds, the refit's largest arithmetic.
    gram: crate::stats::SymmetricGram,
    cross: Array2<f64>,
    rows: usize,
    /// f32 rows not yet multiplied (`next_rows`): the f32 products run over whole chunks,
    /// wherever the batches that brought the rows ended, so that the sums do not depend on
    /// the batching (calibration's kept outputs and the refit's own passes cut the same
    /// samples differently).
    pending: Option<Pending>,
}

/// Rows (their bias column included) and targets waiting for their chunk's product.
#[derive(Clone)]
struct Pending {
    rows: Array2<f32>,
    targets: Array2<f32>,
    filled: usize,
}

impl System {
    pub(super) fn new(inputs: usize, outputs: usize) -> System {
        System {
            gram: crate::stats::SymmetricGram::zeros(inputs + 1),
            cross: Array2::zeros((inputs + 1, outputs)),
            rows: 0,
            pending: None,
        }
    }

    /// Views for up to `n` more f32 rows (bias column included, the last) and their targets,
    /// within a chunk of `chunk` rows: the caller writes the first rows of them, as many as
    /// it then `commit`s.
    pub(super) fn next_rows(
        &mut self,
        n: usize,
        chunk: usize,
    ) -> (ArrayViewMut2<'_, f32>, ArrayViewMut2<'_, f32>) {
        let (inputs, outputs) = (self.gram.units(), self.cross.ncols());
        let p = self.pending.get_or_insert_with(|| Pending {
            rows: Array2::zeros((chunk.max(1), inputs)),
            targets: Array2::zeros((chunk.max(1), outputs)),
            filled: 0,
        });
        let end = (p.filled + n).min(p.rows.nrows());
        (
            p.rows.slice_mut(ndarray::s![p.filled..end, ..]),
            p.targets.slice_mut(ndarray::s![p.filled..end, ..]),
        )
    }

    /// Adds the `n` rows written into `next_rows`' views; a full chunk is multiplied.
    pub(super) fn commit(&mut self, n: usize) {
        let full = self.pending.as_mut().is_some_and(|p| {
            p.filled = (p.filled + n).min(p.rows.nrows());
            p.filled == p.rows.nrows()
        });
        if full {
            self.flush();
        }
    }

    /// Multiplies the pending rows (products in f32, added into the f64 sums).
    fn flush(&mut self) {
        let Some(p) = self.pending.as_mut().filter(|p| p.filled > 0) else {
            return;
        };
        let (x1, t) = (
            p.rows.slice(ndarray::s![..p.filled, ..]),
            p.targets.slice(ndarray::s![..p.filled, ..]),
        );
        self.gram.add_f32(x1);
        crate::stats::add_product_f32(self.cross.view_mut(), x1.t(), t, &mut Vec::new());
        self.rows += p.filled;
        p.filled = 0;
    }

    fn add(&mut self, x: &Array2<f64>, t: &Array2<f64>) {
        let ones = Array2::<f64>::ones((x.nrows(), 1));
        let x1 = ndarray::concatenate(Axis(1), &[x.view(), ones.view()]).expect("same rows");
        self.add_with_bias_column(x1.view(), t.view());
    }

    /// Adds rows `x1` whose last column is the constant 1 (the bias's input).
    pub(super) fn add_with_bias_column(&mut self, x1: ArrayView2<f64>, t: ArrayView2<f64>) {
        self.gram.add(x1);
        crate::stats::add_product(self.cross.view_mut(), x1.t(), t);
        self.rows += x1.nrows();
    }

    /// Corrects `w0` ([in + 1, out], the bias last) as statistics repair would (REPAIR):
    /// each output unit's mean and standard deviation on this system's rows, read from the
    /// normal equations (Σŷ = W₀ᵀΣx₁, Σŷ² = w₀ᵀ(X₁ᵀX₁)w₀), brought to `goal_mean` and
    /// `goal_sd`. A dead unit (no spread) keeps its scale.
    fn repair(
        &mut self,
        w0: &mut Array2<f64>,
        goal_mean: &ndarray::Array1<f64>,
        goal_sd: &ndarray::Array1<f64>,
    ) {
        self.flush();
        let n = self.rows as f64;
        let d = self.gram.units() - 1;
        if n == 0.0 || w0.nrows() != d + 1 {
            return;
        }
        let gw = self.gram.to_full().dot(&*w0);
        let mean = gw.row(d).mapv(|v| v / n);
        let sd: ndarray::Array1<f64> = (0..w0.ncols())
            .map(|j| {
                let square = w0.column(j).dot(&gw.column(j)) / n;
                (square - mean[j] * mean[j]).max(0.0).sqrt()
            })
            .collect();
        let scale = super::repair::std_ratio(goal_sd, &sd);
        for (j, s) in scale.into_iter().enumerate() {
            let mut column = w0.column_mut(j);
            column *= s;
            column[d] += goal_mean[j] - s * mean[j];
        }
    }

    /// argmin ‖X₁W − T‖² + λ‖W − W₀‖² over the weight rows (the bias row is free), for the
    /// current weights `w0` ([in + 1, out], the bias last); `None` from too few rows
    /// (`ROWS_PER_UNKNOWN`) or a non-finite solution.
    pub(super) fn solve(&mut self, w0: &Array2<f64>, with_bias: bool) -> Option<Array2<f64>> {
        self.flush();
        self.pending = None;
        let n = self.gram.units() - usize::from(!with_bias);
        let d = self.gram.units() - 1;
        if (self.rows as f64) < ROWS_PER_UNKNOWN * n as f64 {
            return None;
        }
        let lambda = RIDGE * (0..d).map(|i| self.gram.get(i, i)).sum::<f64>() / d.max(1) as f64;
        let lambda = lambda.max(1e-12);
        let a = Mat::<f64>::from_fn(n, n, |i, j| {
            self.gram.get(i, j) + if i == j && i < d { lambda } else { 0.0 }
        });
        let b = Mat::<f64>::from_fn(n, self.cross.ncols(), |i, j| {
            self.cross[[i, j]] + if i < d { lambda * w0[[i, j]] } else { 0.0 }
        });
        let x = a.partial_piv_lu().solve(&b);
        let out = Array2::from_shape_fn((n, self.cross.ncols()), |(i, j)| x[(i, j)]);
        out.iter().all(|v| v.is_finite()).then_some(out)
    }
}

/// Writes the refitted weights of `layer` into `merged`, group by group (`systems`: one, or
/// one per group of a patch layer's outputs); false when it kept its own. A group whose system
/// has no solution keeps its merged weights. Behind a BatchNormalization the fit is of the
/// composite (per channel `s·W` and `s·(b − μ) + β`): the conv gets `W'/s`, the normalisation's
/// shift the fitted bias (its scale and statistics stay as repair left them).
fn apply(
    merged: &mut Model,
    layer: &OutputLayer,
    systems: &mut [System],
    repair_goal: Option<&(ndarray::Array1<f64>, ndarray::Array1<f64>)>,
) -> Result<bool> {
    let Some(graph) = merged.proto.graph.as_mut() else {
        return Ok(false);
    };
    let find = |name: &str| {
        graph
            .initializer
            .iter()
            .position(|t| t.name.as_deref() == Some(name))
    };
    let read = |i: usize| -> Result<Option<Vec<f64>>> {
        Ok(as_f64(&TensorData::from_proto(&graph.initializer[i])?)
            .map(|a| a.iter().copied().collect()))
    };
    let Some(wi) = find(&layer.weight) else {
        return Ok(false);
    };
    let Some(w) = as_f64(&TensorData::from_proto(&graph.initializer[wi])?) else {
        return Ok(false);
    };
    // A Conv's [out, in, k, …] as [out, in · k · …]; stored back in its own shape.
    let shape = w.shape().to_vec();
    let flat_in: usize = shape.iter().skip(1).product();
    let mut w = Array2::from_shape_vec(
        (shape.first().copied().unwrap_or(0), flat_in),
        w.iter().copied().collect(),
    )
    .map_err(|e| Error::tensor(&layer.weight, e.to_string()))?;
    let groups = systems.len();
    let outputs = if layer.trans_b { w.nrows() } else { w.ncols() };
    if groups == 0 || !outputs.is_multiple_of(groups) || (groups > 1 && !layer.trans_b) {
        return Ok(false);
    }
    let per = outputs / groups;
    let bias_index = layer.bias.as_deref().and_then(find);
    let bias: Vec<f64> = match bias_index {
        Some(i) => match read(i)? {
            Some(b) => b,
            None => return Ok(false),
        },
        None => vec![0.0; outputs],
    };
    // Per output unit the composite's scale and the bias it adds: (1, b) without a norm.
    let norm = match &layer.norm {
        None => None,
        Some(n) => {
            let index = |name: &str| find(name).map(read).transpose();
            let (Some(Some(gamma)), Some(Some(beta)), Some(Some(mean)), Some(Some(var)), Some(si)) = (
                index(&n.scale)?,
                index(&n.shift)?,
                index(&n.mean)?,
                index(&n.var)?,
                find(&n.shift),
            ) else {
                return Ok(false);
            };
            let scale: Vec<f64> = gamma
                .iter()
                .zip(&var)
                .map(|(&g, &v)| super::bn_fold::norm_scale(g, v, n.epsilon))
                .collect();
            Some((scale, beta, mean, si))
        }
    };
    let (scale, composite_bias): (Vec<f64>, Vec<f64>) = match &norm {
        None => (vec![1.0; outputs], bias.clone()),
        Some((scale, beta, mean, _)) => (
            scale.clone(),
            (0..outputs.min(scale.len()).min(beta.len()).min(mean.len()))
                .map(|o| scale[o] * (bias[o] - mean[o]) + beta[o])
                .collect(),
        ),
    };
    if bias.len() != outputs || scale.len() != outputs || composite_bias.len() != outputs {
        return Ok(false);
    }
    // A Conv or Gemm without a bias that repair would have corrected gets one, as repair
    // gave it before the refit: without it the GroupNorm ResNet-20's bias-free convolutions
    // were fitted with one unknown per unit fewer (weight-zip 70.0 % against 70.4).
    let new_bias_at = match (repair_goal, bias_index, &norm) {
        (Some(_), None, None) => graph.node.iter().position(|n| {
            matches!(n.op_type.as_deref(), Some("Conv" | "Gemm"))
                && n.input.get(1) == Some(&layer.weight)
                && n.input.get(2).is_none_or(String::is_empty)
        }),
        _ => None,
    };
    let free_bias = bias_index.is_some() || norm.is_some() || new_bias_at.is_some();
    let mut fitted_bias = composite_bias.clone();
    let mut any = false;
    for (g, system) in systems.iter_mut().enumerate() {
        let units = g * per..(g + 1) * per;
        // [in, out] of this group's outputs (as the composite computes them), the bias row
        // appended.
        let mut w_in_out = if layer.trans_b {
            group_weights(&w, g, groups)
        } else {
            w.clone()
        };
        for (mut column, s) in w_in_out
            .columns_mut()
            .into_iter()
            .zip(&scale[units.clone()])
        {
            column *= *s;
        }
        let inputs = w_in_out.nrows();
        if system.gram.units() != inputs + 1 || system.cross.ncols() != per {
            return Ok(false);
        }
        let mut w0 = Array2::<f64>::zeros((inputs + 1, per));
        w0.slice_mut(ndarray::s![..inputs, ..]).assign(&w_in_out);
        w0.row_mut(inputs)
            .assign(&ndarray::ArrayView1::from(&composite_bias[units.clone()]));
        // A goal narrower than the layer's units leaves the anchor at the merged weights.
        if let Some((mean, sd)) =
            repair_goal.filter(|(mean, sd)| norm.is_none() && mean.len().min(sd.len()) >= units.end)
        {
            let (mean, sd) = (
                mean.slice(ndarray::s![units.clone()]).to_owned(),
                sd.slice(ndarray::s![units.clone()]).to_owned(),
            );
            system.repair(&mut w0, &mean, &sd);
        }
        let Some(solved) = system.solve(&w0, free_bias) else {
            continue;
        };
        for (k, o) in units.enumerate() {
            // A unit the normalisation zeroes keeps its weights: nothing to divide by.
            if scale[o].abs() < 1e-12 {
                continue;
            }
            let row = solved
                .slice(ndarray::s![..inputs, k])
                .mapv(|v| v / scale[o]);
            if layer.trans_b {
                w.row_mut(o).assign(&row);
            } else {
                w.column_mut(o).assign(&row);
            }
            if free_bias {
                fitted_bias[o] = solved[[inputs, k]];
            }
        }
        any = true;
    }
    if !any {
        return Ok(false);
    }
    let stored = ArrayD::from_shape_vec(shape, w.iter().copied().collect())
        .map_err(|e| Error::tensor(&layer.weight, e.to_string()))?;
    store_float(&mut graph.initializer[wi], stored.into_dyn());
    let vector = |v: Vec<f64>| {
        ArrayD::from_shape_vec(vec![outputs], v)
            .map_err(|e| Error::tensor(&layer.weight, e.to_string()))
    };
    match (&norm, bias_index) {
        // The fitted bias is the normalisation's shift: β = c − s·(b − μ).
        (Some((scale, _, mean, si)), _) => {
            let shift = (0..outputs)
                .map(|o| fitted_bias[o] - scale[o] * (bias[o] - mean[o]))
                .collect();
            store_float(&mut graph.initializer[*si], vector(shift)?);
        }
        (None, Some(i)) => store_float(&mut graph.initializer[i], vector(fitted_bias)?),
        (None, None) => {
            if let Some(node) = new_bias_at {
                let dtype = graph.initializer[wi].data_type;
                super::repair::add_bias(graph, node, &layer.weight, dtype, vector(fitted_bias)?);
            }
        }
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
            patches: None,
            norm: None,
            samples: 0,
            segments: Vec::new(),
        }
    }

    /// A model holding only initializers of these names and dims (values empty): what the
    /// sizing functions read.
    fn model_with(weights: &[(&str, Vec<i64>)]) -> Model {
        use crate::onnx::proto::{GraphProto, ModelProto, TensorProto};
        let initializer = weights
            .iter()
            .map(|(name, dims)| TensorProto {
                name: Some(name.to_string()),
                dims: dims.clone(),
                ..Default::default()
            })
            .collect();
        Model {
            proto: ModelProto {
                graph: Some(GraphProto {
                    initializer,
                    ..Default::default()
                }),
                ..Default::default()
            },
            path: None,
            data_files: Vec::new(),
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
        // Every layer over a budget (`find(true)` empty): the output layer alone.
        let none = |all: bool| if all { Vec::new() } else { find(false) };
        let head = plan(RefitLayers::Auto, none, |_| Some(0));
        assert!(!head.every_layer && head.keep);
        assert_eq!(weights(&head), ["head_w"]);
    }

    #[test]
    fn auto_opens_the_merged_model_for_every_layer_only_while_it_is_small() {
        let layers = find(true);
        let per_model = AUTO_SESSION_BYTES / layers.len();
        assert!(sessions_affordable(&layers, per_model));
        assert!(!sessions_affordable(&layers, per_model + 1));
        // A timm ViT-B/16 (330 MB) with its 49 token layers.
        assert!(!sessions_affordable(
            &vec![layers[0].clone(); 49],
            330_000_000
        ));
    }

    /// Rows per sample are the output's positions; unknowns the weight's inputs and the bias:
    /// a [10, 64] head needs 1.5 × 65 = 97.5 rows, a 1×1 conv over 32 channels on 4 × 4
    /// pixels 1.5 × 33 = 49.5, that is 4 images.
    #[test]
    fn a_layer_is_refitted_only_from_enough_rows() {
        let model = model_with(&[("head_w", vec![10, 64]), ("conv_w", vec![16, 32, 1, 1])]);
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

    /// The repair anchor reads each unit's statistics from the normal equations: the
    /// corrected weights give every unit its goal mean and standard deviation on the
    /// system's rows, computed here from the rows themselves; a unit without spread keeps its
    /// scale and takes the goal mean, and a goal of no spread leaves the scale alone.
    #[test]
    fn the_repair_anchor_gives_each_unit_its_goal_statistics() {
        let x = Array2::from_shape_fn((300, 5), |(i, j)| {
            ((i * 7 + j * 13) as f64 * 0.37).sin() * (1.0 + j as f64) + 0.3 * j as f64
        });
        let mut w0 = Array2::from_shape_fn((6, 4), |(i, j)| ((i * 4 + j) as f64 * 1.1).cos());
        w0.column_mut(3).fill(0.0);
        w0[[5, 3]] = 0.7; // a dead unit: its bias alone
        let (goal_mean, goal_sd) = (
            ndarray::arr1(&[1.0, -2.0, 0.5, 3.0]),
            ndarray::arr1(&[2.0, 0.5, 0.0, 1.0]),
        );
        let mut system = System::new(5, 4);
        system.add(&x, &Array2::zeros((300, 4)));
        let before = w0.clone();
        system.repair(&mut w0, &goal_mean, &goal_sd);
        let ones = Array2::<f64>::ones((300, 1));
        let x1 = ndarray::concatenate(Axis(1), &[x.view(), ones.view()]).unwrap();
        let (y, y0) = (x1.dot(&w0), x1.dot(&before));
        let stats = |y: &Array2<f64>, j: usize| {
            let c = y.column(j);
            let mean = c.mean().unwrap();
            (
                mean,
                (c.mapv(|v| (v - mean).powi(2)).mean().unwrap()).sqrt(),
            )
        };
        for j in 0..2 {
            let (mean, sd) = stats(&y, j);
            assert!((mean - goal_mean[j]).abs() < 1e-9, "unit {j}: mean {mean}");
            assert!((sd - goal_sd[j]).abs() < 1e-9, "unit {j}: sd {sd}");
        }
        // No goal spread: the scale stays, the mean moves to the goal.
        let ((mean, sd), (_, sd0)) = (stats(&y, 2), stats(&y0, 2));
        assert!((mean - goal_mean[2]).abs() < 1e-9 && (sd - sd0).abs() < 1e-9);
        assert_eq!(
            w0.column(2).slice(ndarray::s![..5]),
            before.column(2).slice(ndarray::s![..5])
        );
        // A dead unit: its weights stay (zero), its output is the goal mean.
        assert!(w0
            .column(3)
            .slice(ndarray::s![..5])
            .iter()
            .all(|&v| v == 0.0));
        assert!((w0[[5, 3]] - goal_mean[3]).abs() < 1e-12);
    }

    /// The bytes kept: per sample from shapes at the batch, times each layer's samples and
    /// the models.
    #[test]
    fn kept_bytes_scale_from_the_inferred_batch() {
        let shapes: ShapeMap = [
            ("fc1_out".to_string(), vec![8, 16]),
            ("head_out".to_string(), vec![8, 4, 2]),
        ]
        .into_iter()
        .collect();
        let with = |name: &str, samples: usize| OutputLayer {
            samples,
            ..layer(name)
        };
        let layers = [with("fc1", 100), with("head", 40)];
        // 16 floats a sample over 100 samples, 8 over 40; 2 models.
        assert_eq!(
            kept_bytes(&layers, &shapes, 8, 2),
            Some(4 * (16 * 100 + 8 * 40) * 2)
        );
        assert_eq!(kept_bytes(&[with("fc2", 100)], &shapes, 8, 2), None);
    }

    /// A convolution reads the samples that give it `CONV_ROWS_PER_UNKNOWN` rows per unknown
    /// (at least `CONV_MIN_SAMPLES`, at most the refit's); a layer over units reads them all.
    #[test]
    fn a_convolution_reads_the_samples_its_unknowns_need() {
        let model = model_with(&[("conv_w", vec![64, 64, 3, 3])]);
        let conv = OutputLayer {
            channels_first: true,
            ..layer("conv")
        };
        // 577 unknowns, 8 rows each: 4,616 rows; 8 × 8 pixels a sample: 73 samples.
        let at = |pixels: usize, samples: usize| {
            let shapes: ShapeMap = [("conv_out".to_string(), vec![4, 64, pixels, pixels])]
                .into_iter()
                .collect();
            layer_samples(&conv, &model, &shapes, 4, samples)
        };
        assert_eq!(at(8, 1000), 73);
        assert_eq!(at(8, 50), 50);
        assert_eq!(at(32, 1000), CONV_MIN_SAMPLES);
        let shapes: ShapeMap = [("fc_out".to_string(), vec![4, 10])].into_iter().collect();
        assert_eq!(layer_samples(&layer("fc"), &model, &shapes, 4, 1000), 1000);
    }

    /// A convolution whose normal equations cost more than `CONV_MULTIPLY_ADDS` is not
    /// refitted: a ResNet-50's last-stage 3×3 (512 channels, 7 × 7 pixels, 256 images), not a
    /// ResNet-20's (64 channels, 8 × 8, 73 images).
    #[test]
    fn a_convolution_too_costly_to_fit_keeps_its_weights() {
        let conv = |channels: i64| {
            let dims = vec![channels, channels, 3, 3];
            let geometry = ConvGeometry::of(&crate::onnx::proto::NodeProto::default(), &dims);
            let model = model_with(&[("conv_w", dims)]);
            let layer = OutputLayer {
                channels_first: true,
                patches: geometry,
                ..layer("conv")
            };
            (model, layer)
        };
        let shapes = |channels: usize, pixels: usize| -> ShapeMap {
            [("conv_out".to_string(), vec![4, channels, pixels, pixels])]
                .into_iter()
                .collect()
        };
        let (small, small_layer) = conv(64);
        assert!(affordable(&small_layer, &small, &shapes(64, 8), 4, 73));
        let (large, large_layer) = conv(512);
        assert!(!affordable(&large_layer, &large, &shapes(512, 7), 4, 256));
        // Without patches (a layer over units) the keep budget bounds it instead.
        assert!(affordable(&layer("conv"), &large, &shapes(512, 7), 4, 256));
        // Under auto, convolutions whose samples together exceed calibration's passes are
        // all left out; the layers over units stay.
        let with = |samples: usize| OutputLayer {
            samples,
            ..small_layer.clone()
        };
        let shapes = shapes(64, 8);
        let mut layers = vec![with(73), with(73), layer("fc")];
        auto_conv_budget(&mut layers, &small, &shapes, 4, 146);
        assert_eq!(layers.len(), 3);
        auto_conv_budget(&mut layers, &small, &shapes, 4, 145);
        assert_eq!(weights_of(&layers), ["fc_w"]);
    }

    fn weights_of(layers: &[OutputLayer]) -> Vec<&str> {
        layers.iter().map(|l| l.weight.as_str()).collect()
    }
}
