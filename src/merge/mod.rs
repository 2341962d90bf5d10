//! The merge: calibration statistics, dual-space similarity, matching, and the merged
//! initializers, for any number of models of one architecture (`shared/docs/algorithm.md`).
//!
//! Deviations from the reference, each a fix of a defect it documents (§9):
//! - P2: the groups of one attention layer share one head assignment (their head-level
//!   scores are summed before the outer assignment), so alignment stays function-preserving.
//! - P1: the Q/K group reads Q's projection output (the reference reads K twice).
//! - P9: statistics in f64 with variances clamped at 0; dead units correlate 0.
//! - P10: moments weight every sample equally (exact for any batch sizes).
//! - Weight vectors map neighbour axes with the unmerge P on every axis (the reference swaps
//!   merge and unmerge, P4); identical for alignment.

mod alpha;
mod bn_fold;
mod budget;
pub(crate) use budget::{half_of_ram, parse_size};
mod calib;
pub(crate) mod cca;
mod conv_patches;
mod correlations;
mod dense_use;
mod frontier;
mod held_out;
mod matching;
mod observe;
mod output_fit;
mod partial;
mod passes;
mod probe;
mod process_memory;
mod repair;
mod shape_flow;
mod shape_search;
mod shard;
mod similarity;
mod spread;
mod taps;
mod tournament;
mod units;
mod weights;
mod widen;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use ndarray::Array2;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph::{infer_shapes, same_architecture, value_map, Graph, ShapeMap};
use crate::onnx::proto::StringStringEntryProto;
use crate::onnx::{Model, TensorData};
use crate::runtime::{BackendKind, BackendOptions};
use crate::symmetry::permute::SplitMix;
use crate::symmetry::{self, GroupKind};

pub use alpha::{choose_alpha, AlphaChoice, AlphaPoint};
pub use matching::{align, group_align, group_zip, lap, zip, zip_to, Matched};
pub use output_fit::RefitLayers;
pub use partial::{Cut, Trunk};
pub use shape_search::{choose_shape, ShapeChoice, ShapePoint};
pub use shard::{fingerprint, ShardGroup, Stats};
pub use spread::Spread;
pub use units::{Layout, Matchings, Role, Unmerge};
pub(crate) use weights::as_f64 as float_array;

/// The merge methods of the MuDSC paper's comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Plain weight averaging (P = [I; I]).
    Avg,
    /// Git Re-Basin weight matching: weight similarity, alignment, iterated.
    Rebasin,
    /// Activation alignment.
    ActAlign,
    /// ZipIt without partial zip: activation zip.
    Zipit,
    /// Weight zip, iterated.
    WeightZip,
    /// Alignment-based MuDSC: activation start, iterated on α·weight + (1−α)·activation.
    MudscAlign,
    /// Zip-based MuDSC (the default).
    MudscZip,
    /// CCA Merge: every group whose units only meet linear layers (and elementwise activations)
    /// is aligned to model 0 by CCA's linear map (`cca`); the others by mudsc-align's
    /// permutation. Averaged, not zipped.
    Cca,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Avg,
        Method::Rebasin,
        Method::ActAlign,
        Method::Zipit,
        Method::WeightZip,
        Method::MudscAlign,
        Method::MudscZip,
        Method::Cca,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Avg => "avg",
            Method::Rebasin => "rebasin",
            Method::ActAlign => "act-align",
            Method::Zipit => "zipit",
            Method::WeightZip => "weight-zip",
            Method::MudscAlign => "mudsc-align",
            Method::MudscZip => "mudsc-zip",
            Method::Cca => "cca",
        }
    }

    /// The alignment method on the same similarity (zip methods map to theirs).
    pub fn alignment(self) -> Method {
        match self {
            Method::Zipit => Method::ActAlign,
            Method::WeightZip => Method::Rebasin,
            Method::MudscZip | Method::Cca => Method::MudscAlign,
            other => other,
        }
    }

    fn uses_activations(self) -> bool {
        matches!(
            self,
            Method::ActAlign | Method::Zipit | Method::MudscAlign | Method::MudscZip | Method::Cca
        )
    }

    /// Whether the method runs the iterative dual-space loop (and so has the merge values
    /// that `--widen worst` and `per-parameter` read).
    pub fn iterates(self) -> bool {
        matches!(
            self,
            Method::Rebasin
                | Method::WeightZip
                | Method::MudscAlign
                | Method::MudscZip
                | Method::Cca
        )
    }

    fn zips(self) -> bool {
        matches!(self, Method::Zipit | Method::WeightZip | Method::MudscZip)
    }
}

impl MergeOptions {
    /// Whether the method zips (and so can keep more than one model's width).
    pub fn method_zips(&self) -> bool {
        self.method.zips()
    }

    /// Whether the method runs the iterative loop (whose merge values `--widen worst` reads).
    pub fn method_iterates(&self) -> bool {
        self.method.iterates()
    }
}

/// The default `MergeOptions::tol`: every bundled pair's loop (seed 0, the README's table)
/// ends on the same matchings as with the reference's rule (tol 0), in fewer or as many
/// sweeps. 0.5 %, not 0.1 %: over loop seeds 1–5 of dwcnn, mlp, vit, vit_mha and resnet20_gn
/// the task means stay the same but for dwcnn seeds 1 (53.4 → 51.7) and 2 (50.2 → 51.4),
/// while the ResNet-50 pair's loop (its merge value creeps up by 0.3 % every few sweeps)
/// stops after 9 sweeps instead of 23 (docs/benchmarks-real.md). 1 % cost dwcnn 0.8 points
/// on average over those seeds.
pub const DEFAULT_TOL: f64 = 5e-3;

/// The default `MergeOptions::patience`: the reference's (`iter_transform`'s `tol=5`). 3
/// would end the BN and GN ResNet-20 loops (seed 0) two sweeps before their best matchings.
pub const DEFAULT_PATIENCE: usize = 5;

/// The default `MergeOptions::repair_samples`. 128 was measured against it (2026-11-28): with
/// the default refit every bundled pair's task mean stays within 0.4 points for every method
/// (mudsc-zip within 0.15; three-model sets within 0.4) and the merged model's repair pass
/// halves, but without the refit 18 of the README's 56 method cells move by more than 0.5
/// points (−0.7 to +1.7: zipit on the BN ResNets −0.7): the repair of a weak merge is not
/// settled at 128 samples. `--repair-samples 128` stays an option for large models
/// (docs/benchmarks-real.md).
pub const DEFAULT_REPAIR_SAMPLES: usize = 256;

/// The default `MergeOptions::cca_ridge` (see the measurements in docs/which-method.md).
pub const DEFAULT_CCA_RIDGE: f64 = 2.0;

#[derive(Clone, Debug)]
pub struct MergeOptions {
    pub method: Method,
    /// Weight-space share of the dual similarity.
    pub alpha: f64,
    /// Zip: similarity decay of a merged cluster (`a`) and same-model budget factor (`b`).
    pub zip_a: f64,
    pub zip_b: f64,
    pub seed: u64,
    pub backend: BackendKind,
    pub backend_options: BackendOptions,
    pub batch: usize,
    pub max_sweeps: usize,
    /// The loop stops after this many sweeps in a row without a real improvement.
    pub patience: usize,
    /// A real improvement: the mean merge value rises by more than this fraction above the
    /// value at the last real improvement. A smaller rise is still kept (the best matchings
    /// are kept, as in the reference) but counts towards `patience`, so that a loop whose
    /// value creeps up by rounding-level steps (ResNet-50: 19 sweeps, the last 13 within
    /// 0.2 %) stops. 0 is the reference's rule (any rise resets the count).
    pub tol: f64,
    /// Statistics repair (REPAIR folded into Conv/Gemm, BatchNorm reset) on this many
    /// calibration samples; 0 turns it off.
    pub repair_samples: usize,
    /// Passes of the merged model that statistics repair makes (every layer measured and
    /// corrected at once in each); 0 = one pass per layer, in graph order.
    pub repair_passes: usize,
    /// Samples per batch of repair's merged-model pass; 0 (the default): every repair sample
    /// while their activations stay within 2 GiB (`repair_batch`). One batch holding every
    /// repair sample makes the one-pass repair exactly the sequential one; smaller batches
    /// (less memory) pool per-batch statistics, within half a point of it on the bundled
    /// pairs.
    pub repair_batch: usize,
    /// Repair also corrects token layers (a transformer's MatMul + bias Add, units last:
    /// attention projections, a packed QKV projection segment by segment, MLP layers, the
    /// writes into the residual stream). On by default: over loop seeds 0–3 it moves
    /// mudsc-zip on the bundled `vit` from 50.8 to 58.1 % task mean and on `vit_mha` from
    /// 46.4 to 49.6 % (joint +1.9 and +0.2 points).
    pub repair_token_layers: bool,
    /// Repair also the layers the output refit fits after it (`repair::Layers::Unless`):
    /// off by default, since the fit replaces what repair sets there; kept as the reference
    /// the default is tested against.
    pub repair_refitted: bool,
    /// Output refit (`output_fit`): the output layers (a classifier, a projection onto a fixed
    /// class embedding: no unit of theirs or after them permuted) are refitted by least
    /// squares on this many calibration samples to the endpoints' average output; 0 turns it
    /// off. Task mean of mudsc-zip on the bundled pairs (every layer refitted, the default
    /// there): vit 59.2 → 76.8, vit_mha 50.1 → 78.6, dwcnn 46.9 → 73.4 (the
    /// `docs/which-method.md` table for all).
    pub output_fit_samples: usize,
    /// Which layers the output refit fits: the output layer, or every linear layer whose
    /// output units are fixed or one group in order (1×1 convolutions included), in graph
    /// order, each on the merged model as refitted so far; `Auto` (the default) every layer
    /// where calibration can keep their endpoint outputs (`output_fit::RefitLayers`). Task
    /// mean of mudsc-zip, output layer → every layer: vit 70.8 → 76.8, vit_mha 70.2 → 78.6,
    /// dwcnn 64.2 → 73.4.
    pub refit_layers: RefitLayers,
    /// Groups seen at one position per sample (a class token, units on the last axis of a
    /// [B, D] value) are also observed at every token tensor that carries their units and
    /// that a layer reads, all positions (`observe`); false: one tap per group, as the
    /// reference.
    pub token_taps: bool,
    /// Tap positions (pixels, tokens) kept per calibration sample and group, evenly spread;
    /// 0 keeps all. On 224² models the Σxxᵀ arithmetic over every position can outweigh
    /// the forward passes, and a correlation of a few hundred units needs far fewer samples.
    pub tap_positions: usize,
    /// Partial zip: merge only up to this cut and keep each model's remainder.
    pub zip_until: Option<Cut>,
    /// Activation statistics computed beforehand (`statistics`, summed shards): used instead
    /// of calibrating; the calibration data then serve repair only.
    pub stats: Option<std::sync::Arc<Stats>>,
    /// Zip: merged units per plain group, as a factor of one model's width (1: one model's
    /// size; the number of models: no unit merged). Blocked groups (heads, norm groups) widen
    /// by whole blocks.
    pub width: f64,
    /// Which groups `--width`'s extra units go to (`spread`): every widenable group alike,
    /// the worst merged, or the most merge loss per parameter.
    pub widen: Spread,
    /// `--method cca`: ridge added to the covariances, relative to their mean variance
    /// (`cca::maps`).
    pub cca_ridge: f64,
    /// The process's memory budget, bytes: calibration splits into passes over the data
    /// (`passes`) where all groups' statistics do not fit beside what the process holds and
    /// the engines; the correlations go to a temporary file where they do not fit beside the
    /// weights (`correlations`); the weight-similarity cache takes only what is left. `None`:
    /// one pass, correlations held, and the full cache.
    pub max_memory: Option<u64>,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            method: Method::MudscZip,
            alpha: 0.5,
            zip_a: 0.5,
            zip_b: 1.0,
            seed: 0,
            backend: BackendKind::Auto,
            backend_options: BackendOptions::default(),
            batch: 64,
            max_sweeps: 100,
            patience: DEFAULT_PATIENCE,
            tol: DEFAULT_TOL,
            repair_samples: DEFAULT_REPAIR_SAMPLES,
            repair_passes: 1,
            repair_batch: 0,
            repair_token_layers: true,
            repair_refitted: false,
            output_fit_samples: 1000,
            refit_layers: RefitLayers::Auto,
            token_taps: true,
            tap_positions: 0,
            zip_until: None,
            stats: None,
            cca_ridge: DEFAULT_CCA_RIDGE,
            width: 1.0,
            widen: Spread::All,
            max_memory: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    pub id: usize,
    pub width: usize,
    pub kind: String,
    /// What the final matching was computed from.
    pub similarity: String,
    /// Mean similarity of the matched units (blocks, for blocked groups).
    pub merge_value: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MergeReport {
    pub method: Method,
    /// The inference engine that ran calibration and repair (`ort` or `tract`).
    pub engine: String,
    pub alpha: f64,
    pub models: Vec<String>,
    pub calibration_samples: usize,
    pub groups: Vec<GroupReport>,
    pub sweeps: usize,
    /// The mean merge value over groups after each sweep of the iterative loop (before a sweep
    /// that did not improve on the best is reverted): how the loop converged.
    pub sweep_values: Vec<f64>,
    /// Passes over the calibration data for the activation statistics (more than one when
    /// they exceed `--max-memory`; 0 when given as `--stats`).
    pub calibration_passes: usize,
    /// Whether the activation correlations were held in a temporary file through the
    /// matching, read back group by group, because `--max-memory` would not hold them beside
    /// the weights.
    pub correlations_spilled: bool,
    /// Weight similarities are summed from one block per member tensor: blocks computed
    /// whole, updated by the columns a neighbour's new matching moved, and reused because no
    /// neighbour's matching had changed; and the columns correlated of the columns read
    /// (what the updates saved).
    pub weight_similarities_computed: usize,
    pub weight_similarities_updated: usize,
    pub weight_similarities_reused: usize,
    pub weight_columns_correlated: usize,
    pub weight_columns_read: usize,
    /// Group matchings of the loop not recomputed: what they read was what an earlier
    /// matching of theirs had read, whose result they took.
    pub matchings_kept: usize,
    pub fixed_weight_axes: usize,
    /// Layers whose output statistics were repaired, and BatchNorms whose statistics were reset.
    pub repaired_layers: usize,
    pub reset_batch_norms: usize,
    /// Output layers refitted to the endpoints' average output (`output_fit`), by weight.
    pub refitted_layers: Vec<String>,
    /// Samples per batch of repair's merged-model pass (0: no repair).
    pub repair_batch: usize,
    pub unknown_ops: BTreeMap<String, usize>,
    /// Float parameters of the merged model and of model 0 (they differ under `--width`).
    pub merged_parameters: usize,
    pub model_parameters: usize,
    /// Mean correlation of the other models' weights with model 0's, tensor by tensor, on the
    /// identity matching (before any matching): near 1 when the models were fine-tuned from
    /// one base (the same-base methods then serve better), near 0 for different inits.
    pub identity_weight_correlation: Option<f64>,
    /// The merged trunk, for a partial zip.
    pub partial: Option<Trunk>,
    /// Seconds per phase.
    pub seconds: BTreeMap<String, f64>,
    /// Peak resident memory of the process so far, MiB (Linux; 0 where unknown).
    pub peak_rss_mib: f64,
    /// The same at the end of each phase (the process's high-water mark as it went).
    pub peak_rss_mib_by_phase: BTreeMap<String, f64>,
}

use correlations::Correlations;
pub use process_memory::peak_rss_mib;
use process_memory::{give_back_freed_memory, resident_bytes, trace_memory};

/// Wall-clock seconds per pipeline phase.
struct Timer {
    seconds: BTreeMap<String, f64>,
    /// Peak resident memory at the end of each phase: a memory profile by phase.
    peaks: BTreeMap<String, f64>,
    clock: Instant,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            seconds: BTreeMap::new(),
            peaks: BTreeMap::new(),
            clock: Instant::now(),
        }
    }

    fn lap(&mut self, phase: &str) {
        give_back_freed_memory();
        *self.seconds.entry(phase.to_string()).or_default() += self.clock.elapsed().as_secs_f64();
        self.peaks.insert(phase.to_string(), peak_rss_mib());
        trace_memory(phase);
        self.clock = Instant::now();
    }
}

/// What every phase after discovery reads: model 0's groups, each model's value names by
/// model-0 name, and each model's float initializers.
struct Prepared {
    disc: symmetry::Discovery,
    names: Vec<HashMap<String, String>>,
    /// Model 0's activations per sample (`activation_bytes_per_sample`).
    sample_bytes: usize,
    /// The batch `shapes` were inferred at.
    shape_batch: usize,
    /// Model 0's value shapes at the calibration batch, and (`--width` only) at one sample
    /// more: the axes that differ are the batch's, which widened reshapes copy or infer.
    shapes: ShapeMap,
    shapes_other_batch: Option<ShapeMap>,
    weights: weights::Weights,
    /// BatchNorm-kept layers as if folded: how they are compared and averaged.
    folded: bn_fold::Folded,
}

impl Prepared {
    /// Bytes of one sample of model 0's value `name` (4 an element; 0 where its shape is
    /// unknown).
    fn value_sample_bytes(&self, name: &str) -> u64 {
        let elements: usize = self.shapes.get(name).map_or(0, |s| s.iter().product());
        4 * (elements / self.shape_batch.max(1)) as u64
    }
}

/// The outcome of matching: per-group matrices, merge values, the sweeps it took, and how
/// much of the weight similarities the cache saved.
struct Matching {
    m: Matchings,
    values: Values,
    sweeps: usize,
    sweep_values: Vec<f64>,
    calibration_passes: usize,
    correlations_spilled: bool,
    similarities: similarity::Counts,
    /// Repair's endpoint statistics, when calibration gathered them.
    endpoint: Option<calib::SideMoments>,
    /// The output refit's endpoint targets, when calibration kept them.
    kept: calib::Kept,
    /// `--width`: which groups may widen, and the shape values the rewrite's reshapes read.
    widen: Option<(WidenScope, shape_flow::Flow)>,
}

/// Per group: `Ok` when `--width` may widen it, else why not.
type WidenScope = std::collections::BTreeMap<usize, std::result::Result<(), String>>;

/// Merges `models` (same architecture) into one with model 0's graph, names and opsets.
/// `calib` holds calibration inputs bound to model 0's graph inputs.
pub fn merge(
    models: &[Model],
    calib: &[TensorData],
    opts: &MergeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(Model, MergeReport)> {
    let opts = &MergeOptions {
        backend: opts.backend.resolve(&opts.backend_options),
        ..opts.clone()
    };
    let mut timer = Timer::new();
    // The weights are loaded by `find_matchings`, after calibration.
    let mut prep = discover(models, calib, opts)?;
    timer.lap("discovery");
    budget::check(&prep.disc.groups, models.len(), opts)?;
    let graph = Graph::new(&models[0])?;
    if opts.width != 1.0 {
        let n = models.len() as f64;
        if !opts.method.zips() || !(1.0..=n).contains(&opts.width) || opts.zip_until.is_some() {
            return Err(Error::Usage(format!(
                "--width {} needs a zip method, a factor in [1, {n}] and no --zip-until",
                opts.width
            )));
        }
    }
    if opts.widen.reads_merge_values() && opts.width != 1.0 && !opts.method.iterates() {
        return Err(Error::Usage(format!(
            "--widen {} reads the merge values of the iterative loop: {} has none (use \
             mudsc-zip or weight-zip)",
            opts.widen.name(),
            opts.method.name()
        )));
    }
    if opts.method == Method::Cca && opts.zip_until.is_some() {
        return Err(Error::Usage(
            "--zip-until with --method cca: a partial merge unmerges the cut by permutation, \
             which a linear map is not"
                .into(),
        ));
    }
    let trunk = match &opts.zip_until {
        Some(cut) => Some(partial::trunk(&graph, cut)?),
        None => None,
    };
    // The output refit's layers, and whether calibration keeps their endpoint outputs.
    let fit_plan = if opts.output_fit_samples > 0 {
        let layout = Layout::new(&prep.disc.structure, &prep.disc.groups);
        let samples = opts
            .output_fit_samples
            .min(crate::data::sample_count(calib));
        output_fit::plan(
            opts.refit_layers,
            |all| {
                let mut layers = output_fit::find(
                    &graph,
                    models,
                    &prep.names,
                    &prep.disc.slots,
                    &layout,
                    &prep.disc.groups,
                    trunk.as_ref().map(|t| &t.nodes),
                    all,
                );
                for l in &mut layers {
                    l.samples = output_fit::layer_samples(
                        l,
                        &models[0],
                        &prep.shapes,
                        prep.shape_batch,
                        samples,
                    );
                }
                let (model, shapes, batch) = (&models[0], &prep.shapes, prep.shape_batch);
                layers.retain(|l| {
                    output_fit::enough_rows(l, model, shapes, batch, l.samples)
                        && output_fit::affordable(l, model, shapes, batch, l.samples)
                });
                if all && opts.refit_layers == RefitLayers::Auto {
                    let passes = samples * models.len();
                    output_fit::auto_conv_budget(&mut layers, model, shapes, batch, passes);
                    // A large model refits its output layer alone (`plan`: past the keep
                    // budget, the same).
                    if !output_fit::sessions_affordable(&layers, 4 * float_parameters(model)) {
                        layers.clear();
                    }
                }
                layers
            },
            |layers| output_fit::kept_bytes(layers, &prep.shapes, prep.shape_batch, models.len()),
        )
    } else {
        output_fit::Plan::default()
    };
    // Layers the refit will fit need no repair before it (`repair::Layers::Unless`), nor their
    // endpoint statistics from calibration. CCA's linearly aligned groups are not refitted.
    let left_to_refit: HashSet<String> = fit_plan
        .layers
        .iter()
        .filter(|l| !opts.repair_refitted && (opts.method != Method::Cca || l.segments.is_empty()))
        .flat_map(|l| l.initializers().cloned())
        .collect();
    let repair_taps = if opts.repair_samples > 0 {
        let layout = Layout::new(&prep.disc.structure, &prep.disc.groups);
        let scope = trunk.as_ref().map(|t| &t.nodes);
        repair::endpoint_taps(
            &graph,
            &layout,
            &prep.disc.slots,
            &prep.disc.groups,
            scope,
            &repair::Layers::Unless(&left_to_refit),
            opts.repair_token_layers,
        )
    } else {
        Vec::new()
    };
    // The endpoint outputs calibration keeps for the refit, each over its layer's samples.
    let keep: Vec<(String, usize)> = if fit_plan.keep {
        fit_plan
            .layers
            .iter()
            .map(|l| (l.output.clone(), l.samples))
            .collect()
    } else {
        Vec::new()
    };
    let matching = find_matchings(
        &mut prep,
        models,
        calib,
        opts,
        Later {
            repair_taps: &repair_taps,
            refit_outputs: &keep,
        },
        progress,
        &mut timer,
    )?;
    let Prepared {
        disc,
        names,
        weights,
        folded,
        ..
    } = &prep;
    let Matching {
        m,
        values,
        sweeps,
        sweep_values,
        calibration_passes,
        correlations_spilled,
        similarities,
        endpoint,
        kept,
        widen,
    } = &matching;
    let layout = Layout::new(&disc.structure, &disc.groups);

    // Rewrite.
    let inputs = weights::input_axes(&graph);
    let mut merged = models[0].clone();
    // Folded Conv → BatchNorm pairs are merged as their folded layers; every other float
    // initializer by its plain merge.
    let mut folded_merge: HashMap<String, ndarray::ArrayD<f64>> = bn_fold::merged_pairs(
        folded,
        |name, w| weights::merged_tensor(name, &layout, &disc.slots, w, m, &inputs),
        weights,
    )?
    .into_iter()
    .collect();
    if let Some(g) = merged.proto.graph.as_mut() {
        for t in &mut g.initializer {
            let name = t.name.clone().unwrap_or_default();
            let value = match folded_merge.remove(&name) {
                Some(value) => value,
                None if !weights[0].contains_key(&name)
                    || weights.iter().any(|w| !w.contains_key(&name)) =>
                {
                    continue
                }
                None => weights::merged_tensor(&name, &layout, &disc.slots, weights, m, &inputs)?,
            };
            store_float(t, value);
        }
        if opts.width != 1.0 {
            // Widened groups change intermediate shapes; the recorded ones would contradict
            // them (engines infer shapes again).
            g.value_info.clear();
            let original = Graph::new(&models[0])?;
            widen::set_depthwise_groups(&original, g);
            if let (Some(other), Some((scope, flow))) = (&prep.shapes_other_batch, widen) {
                let axes = shape_flow::Axes::new(disc, &prep.shapes, other);
                let widths: std::collections::BTreeMap<usize, usize> = disc
                    .groups
                    .iter()
                    .filter(|grp| matches!(scope.get(&grp.id), Some(Ok(()))))
                    .filter_map(|grp| Some((grp.id, m.p.get(&grp.id)?.merged)))
                    .filter(|&(id, w)| w != disc.groups[id].width)
                    .collect();
                let path = models[0].path.clone().unwrap_or_default();
                widen::pin_reshapes(&path, &original, g, &axes, flow, &widths)?;
                widen::resize_constants(&disc.groups, &original, g, &axes, &widths)?;
                widen::set_group_norm_groups(&path, &original, g, &axes, &widths)?;
            }
        }
    }
    if opts.width != 1.0 {
        check_widened_shapes(&merged, &models[0], &prep.shapes)?;
    }
    timer.lap("rewrite");

    let (mut repaired_layers, mut reset_batch_norms) = (0, 0);
    let mut left_unrepaired = HashSet::new();
    let subset = repair_samples(calib, opts);
    let passes = repair_passes(&subset, opts, prep.sample_bytes);
    let repair = |merged: &mut Model, layers: &repair::Layers| {
        repair::repair(
            models,
            names,
            merged,
            &layout,
            &disc.slots,
            &disc.groups,
            m,
            trunk.as_ref().map(|t| &t.nodes),
            layers,
            endpoint.as_ref(),
            &passes,
        )
    };
    // The layers the refit fits under these matchings are left to it.
    let refits: Vec<&output_fit::OutputLayer> = fit_plan
        .layers
        .iter()
        .filter(|l| !opts.repair_refitted && l.fits(m))
        .collect();
    let refit_sets: HashSet<String> = refits
        .iter()
        .flat_map(|l| l.initializers().cloned())
        .collect();
    if opts.repair_samples > 0 {
        let r = repair(&mut merged, &repair::Layers::Unless(&refit_sets))?;
        repaired_layers = r.layers;
        reset_batch_norms = r.batch_norms;
        left_unrepaired = r.left;
        timer.lap("repair");
    }
    let fit = output_fit::Fit {
        calib,
        samples: opts.output_fit_samples,
        kept,
        backend: opts.backend,
        options: &opts.backend_options,
        batch: opts.batch,
        repair_anchors: &left_unrepaired,
    };
    let refitted_layers = if fit_plan.every_layer {
        // In graph order, each fitted on the merged model as the layers before it left it.
        // The merged model's values computed once across the layers (`frontier`).
        let mut frontier = output_fit::frontier(&merged, &fit_plan.layers, &fit);
        let mut all = Vec::new();
        for layer in &fit_plan.layers {
            let one = std::slice::from_ref(layer);
            all.extend(output_fit::refit(
                models,
                names,
                &mut merged,
                one,
                m,
                &fit,
                Some(&mut frontier),
            )?);
        }
        all
    } else {
        output_fit::refit(models, names, &mut merged, &fit_plan.layers, m, &fit, None)?
    };
    if !refitted_layers.is_empty() {
        timer.lap("refit");
    }
    // A layer left unrepaired to the refit that it did not refit (no finite solution) is
    // repaired now, after the layers that read it were fitted on it unrepaired: late, but
    // as it would otherwise stay.
    let missed: HashSet<String> = refits
        .iter()
        .filter(|l| !refitted_layers.contains(&l.weight))
        .flat_map(|l| l.initializers().cloned())
        .filter(|i| left_unrepaired.contains(i))
        .collect();
    if opts.repair_samples > 0 && !missed.is_empty() {
        let r = repair(&mut merged, &repair::Layers::Only(&missed))?;
        repaired_layers += r.layers;
        reset_batch_norms += r.batch_norms;
        timer.lap("repair");
    }
    if let Some(t) = &trunk {
        let unmerge = partial::Unmerge {
            layout: &layout,
            slots: &disc.slots,
            m,
        };
        partial::split(&mut merged, models, names, t, &unmerge)?;
        timer.lap("partial");
        if opts.repair_samples > 0 && t.remainder_nodes > 0 {
            let remainder: std::collections::HashSet<usize> = (0..graph.nodes().len())
                .filter(|n| !t.nodes.contains(n))
                .collect();
            let r = repair::repair_remainders(models, names, &mut merged, &remainder, &passes)?;
            repaired_layers += r.layers;
            reset_batch_norms += r.batch_norms;
            timer.lap("repair");
        }
    }

    let report = MergeReport {
        method: opts.method,
        engine: crate::runtime::engine_name(opts.backend.resolve(&opts.backend_options)),
        alpha: opts.alpha,
        models: models.iter().map(Model::display_name).collect(),
        calibration_samples: crate::data::sample_count(calib),
        groups: disc
            .groups
            .iter()
            .map(|g| {
                let (v, how) = values
                    .get(&g.id)
                    .cloned()
                    .unwrap_or((f64::NAN, "none".into()));
                GroupReport {
                    id: g.id,
                    width: g.width,
                    kind: match &g.kind {
                        GroupKind::Plain => "plain".into(),
                        GroupKind::Blocked {
                            blocks, block_size, ..
                        } => format!("{blocks}x{block_size}"),
                    },
                    similarity: how,
                    merge_value: v,
                }
            })
            .collect(),
        sweeps: *sweeps,
        sweep_values: sweep_values.clone(),
        calibration_passes: *calibration_passes,
        correlations_spilled: *correlations_spilled,
        weight_similarities_computed: similarities.computed,
        weight_similarities_updated: similarities.updated,
        weight_similarities_reused: similarities.reused,
        weight_columns_correlated: similarities.columns_correlated,
        weight_columns_read: similarities.columns_read,
        matchings_kept: similarities.matchings_kept,
        fixed_weight_axes: disc.fixed.len(),
        repaired_layers,
        reset_batch_norms,
        refitted_layers,
        repair_batch: if opts.repair_samples > 0 {
            passes.probe_batch
        } else {
            0
        },
        unknown_ops: disc.unknown_ops.clone(),
        identity_weight_correlation: identity_correlation(weights),
        merged_parameters: float_parameters(&merged),
        model_parameters: float_parameters(&models[0]),
        partial: trunk,
        seconds: timer.seconds,
        peak_rss_mib: peak_rss_mib(),
        peak_rss_mib_by_phase: timer.peaks,
    };
    provenance(&mut merged, &report, models);
    Ok((merged, report))
}

/// Every model's units permuted into model 0's coordinates: the alignment that `opts.method`
/// (or, for a zip method, its alignment counterpart) finds, applied to each model alone. Model
/// 0 comes back unchanged; every model keeps its own function. This puts N models in one
/// weight coordinate system, e.g. to draw the plane through them.
pub fn align_to_first(
    models: &[Model],
    calib: &[TensorData],
    opts: &MergeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Vec<Model>> {
    let opts = MergeOptions {
        method: opts.method.alignment(),
        ..opts.clone()
    };
    let mut timer = Timer::new();
    let mut prep = prepare(models, calib, &opts, &mut timer)?;
    budget::check(&prep.disc.groups, models.len(), &opts)?;
    let matching = find_matchings(
        &mut prep,
        models,
        calib,
        &opts,
        Later::default(),
        progress,
        &mut timer,
    )?;
    let layout = Layout::new(&prep.disc.structure, &prep.disc.groups);
    (0..models.len())
        .map(|i| {
            let mut out = models[0].clone();
            if let Some(g) = out.proto.graph.as_mut() {
                for t in &mut g.initializer {
                    let name = t.name.clone().unwrap_or_default();
                    let Some(mut value) = prep.weights[i].get(&name).map(weights::Stored::to_f64)
                    else {
                        continue;
                    };
                    if let Some(axes) = prep.disc.slots.of(&name) {
                        value = weights::map_axes(value, axes, &layout, &matching.m, i, |_| {
                            Some(Role::Unmerge)
                        });
                    }
                    store_float(t, value);
                }
            }
            Ok(out)
        })
        .collect()
}

/// Statistics repair of a model merged elsewhere (a same-base merge) from `models`, whose units
/// are in one order (fine-tunes of one base, or models aligned to the first): with identity
/// matchings, every correctable layer of `merged` gets the average of the models' statistics
/// and every BatchNorm its statistics on the calibration data, as after a permutation merge.
/// Returns the layers repaired and the BatchNorms reset.
pub fn repair_merged(
    models: &[Model],
    merged: &mut Model,
    calib: &[TensorData],
    opts: &MergeOptions,
) -> Result<(usize, usize)> {
    let opts = MergeOptions {
        method: Method::Avg,
        backend: opts.backend.resolve(&opts.backend_options),
        ..opts.clone()
    };
    let mut timer = Timer::new();
    let mut prep = prepare(models, calib, &opts, &mut timer)?;
    let matching = find_matchings(
        &mut prep,
        models,
        calib,
        &opts,
        Later::default(),
        &mut |_, _, _| {},
        &mut timer,
    )?;
    let layout = Layout::new(&prep.disc.structure, &prep.disc.groups);
    let subset = repair_samples(calib, &opts);
    let passes = repair_passes(&subset, &opts, prep.sample_bytes);
    let r = repair::repair(
        models,
        &prep.names,
        merged,
        &layout,
        &prep.disc.slots,
        &prep.disc.groups,
        &matching.m,
        None,
        &repair::Layers::All,
        None,
        &passes,
    )?;
    Ok((r.layers, r.batch_norms))
}

/// Elements of every initializer, by name (the parameter cost of widening its axes).
fn weight_elements(model: &Model) -> HashMap<String, usize> {
    model
        .graph()
        .initializer
        .iter()
        .filter_map(|t| {
            Some((
                t.name.clone()?,
                t.dims.iter().product::<i64>().max(0) as usize,
            ))
        })
        .collect()
}

/// Entries of a model's float initializers.
fn float_parameters(model: &Model) -> usize {
    model
        .graph()
        .initializer
        .iter()
        .filter(|t| matches!(t.data_type, Some(1 | 10 | 11 | 16)))
        .map(|t| t.dims.iter().product::<i64>().max(0) as usize)
        .sum()
}

/// The first samples whose calibration batches carry side values (`calib::Side::samples`):
/// repair's, or where it gathers nothing, the most any kept value but those kept over every
/// sample reads. Past them calibration's engines return only the taps and the values kept
/// further (a classifier's logits): a convolution's outputs, kept over its 32–95 samples,
/// made every batch of the bundled BN ResNet-20's calibration 13 % slower.
fn side_samples(
    repair_taps: &[(String, Option<usize>)],
    repair_samples: usize,
    keep: &[(String, usize)],
    calib: &[TensorData],
) -> usize {
    let all = crate::data::sample_count(calib);
    match repair_taps.is_empty() {
        false => repair_samples.min(all),
        true => keep
            .iter()
            .map(|&(_, n)| n)
            .filter(|&n| n < all)
            .max()
            .unwrap_or(0),
    }
}

/// The calibration samples statistics repair runs on: the first `repair_samples`.
fn repair_samples(calib: &[TensorData], opts: &MergeOptions) -> Vec<TensorData> {
    calib
        .iter()
        .map(|t| t.slice_rows(0, opts.repair_samples.min(t.shape()[0])))
        .collect()
}

/// Statistics repair's passes over `subset`, as `opts` asks for them.
fn repair_passes<'a>(
    subset: &'a [TensorData],
    opts: &'a MergeOptions,
    sample_bytes: usize,
) -> repair::Passes<'a> {
    repair::Passes {
        calib: subset,
        backend: opts.backend,
        options: &opts.backend_options,
        batch: opts.batch,
        probe_batch: repair_batch(opts, sample_bytes),
        passes: opts.repair_passes,
        token_layers: opts.repair_token_layers,
    }
}

/// How alike the models' weights are unit for unit, before any matching: see
/// [`crate::same_base::Kinship`].
///
/// f32 weights are read in place: each tensor went through an f64 copy and two more vectors
/// of it, 13 GB of allocations and 7 s for two 2.2 GB models.
fn identity_correlation(weights: &weights::Weights) -> Option<f64> {
    let mut kinship = crate::same_base::Kinship::default();
    let mut names: Vec<&String> = weights[0].keys().collect();
    names.sort();
    for w in &weights[1..] {
        for name in &names {
            let (a, Some(b)) = (&weights[0][*name], w.get(*name)) else {
                continue;
            };
            if a.shape() != b.shape() {
                continue;
            }
            match (a.as_f32_slice(), b.as_f32_slice()) {
                (Some(a), Some(b)) => kinship.add(a, b),
                _ => kinship.add(
                    &a.to_f64().iter().copied().collect::<Vec<_>>(),
                    &b.to_f64().iter().copied().collect::<Vec<_>>(),
                ),
            }
        }
    }
    kinship.value()
}

/// Writes `value` into initializer `t`, in the float type its header names (not re-read from
/// its data).
pub(crate) fn store_float(t: &mut crate::onnx::proto::TensorProto, value: ndarray::ArrayD<f64>) {
    let name = t.name.clone().unwrap_or_default();
    let data = match crate::onnx::DataType::from_onnx(t.data_type.unwrap_or(0)) {
        Some(crate::onnx::DataType::F64) => TensorData::F64(value),
        Some(crate::onnx::DataType::F16) => {
            TensorData::F16(value.mapv(|v| half::f16::from_f32(v as f32)))
        }
        Some(crate::onnx::DataType::BF16) => {
            TensorData::BF16(value.mapv(|v| half::bf16::from_f32(v as f32)))
        }
        _ => TensorData::F32(value.mapv(|v| v as f32)),
    };
    *t = crate::onnx::proto::TensorProto {
        doc_string: t.doc_string.take(),
        ..data.to_proto(&name)
    };
}

/// Checks the architectures, discovers model 0's groups at the calibration batch shape, and
/// reads every model's float initializers.
fn prepare(
    models: &[Model],
    calib: &[TensorData],
    opts: &MergeOptions,
    timer: &mut Timer,
) -> Result<Prepared> {
    let mut prep = discover(models, calib, opts)?;
    timer.lap("discovery");
    prep.load_weights(models)?;
    timer.lap("load");
    Ok(prep)
}

impl Prepared {
    /// Each model's float initializers, by model-0 name, and the BatchNorm-kept layers as
    /// if folded. Calibration does not read them: `merge` loads them after it, so that the
    /// engines' copies of the models and these never coexist (on a ViT-B pair, 660 MB less
    /// at calibration's peak).
    fn load_weights(&mut self, models: &[Model]) -> Result<()> {
        // Bytes of weights copied between two releases of the models' mapped pages.
        const RELEASE_BYTES: usize = 256 << 20;
        if !self.weights.is_empty() {
            return Ok(());
        }
        let base = &models[0];
        self.weights = models
            .iter()
            .zip(&self.names)
            .map(|(m, map)| {
                let by_name: HashMap<&str, &crate::onnx::proto::TensorProto> = m
                    .graph()
                    .initializer
                    .iter()
                    .filter_map(|t| Some((t.name.as_deref()?, t)))
                    .collect();
                let mut out = HashMap::new();
                let mut read = 0;
                for t in &base.graph().initializer {
                    let name = t.name.clone().unwrap_or_default();
                    let other = map.get(&name).map_or(name.as_str(), String::as_str);
                    if let Some(tp) = by_name.get(other) {
                        let data = TensorData::from_proto(tp)?;
                        read += data.len() * data.dtype().size();
                        if let Some(a) = weights::stored(data) {
                            out.insert(name, a);
                        }
                    }
                    // The mapped pages this copy read are given back as it goes, not once
                    // at the end: both models' pages beside both copies made the peak of a
                    // merge of two 2.2 GB models (8.8 GB, 2.04 × the models).
                    if read >= RELEASE_BYTES {
                        crate::onnx::mapped::release();
                        read = 0;
                    }
                }
                Ok(out)
            })
            .collect::<Result<_>>()?;
        self.folded = bn_fold::fold(&Graph::new(base)?, &self.weights);
        // Copied: the models' mapped pages that the copy read need not stay resident.
        crate::onnx::mapped::release();
        Ok(())
    }
}

/// The activation statistics of every group with a tap: what `merge` computes from the
/// calibration data, as a shard that `merge` can take instead (`MergeOptions::stats`).
pub fn statistics(
    models: &[Model],
    calib: &[TensorData],
    opts: &MergeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<Stats> {
    let opts = &MergeOptions {
        backend: opts.backend.resolve(&opts.backend_options),
        stats: None,
        ..opts.clone()
    };
    let Prepared {
        disc,
        names,
        sample_bytes,
        ..
    } = discover(models, calib, opts)?;
    let none = calib::Side::none();
    let all = disc.groups.iter().map(|g| g.id).collect();
    let points = tap_points(&disc, &models[0], opts)?;
    let pass = Pass {
        groups: &all,
        points: &points,
        side: &none,
        batching: calib::Batching {
            batch: opts.batch,
            sample_bytes,
            bytes: calib::BATCH_BYTES,
            activations: None,
        },
    };
    let (moments, _, _) = collect_moments(&disc, &names, models, calib, pass, opts, progress)?;
    Ok(Stats {
        models: models.iter().map(fingerprint).collect(),
        groups: shard_groups(&disc, &points),
        samples: crate::data::sample_count(calib),
        moments,
    })
}

/// The groups whose activations are calibrated, as statistics files record them: each with
/// the values it is observed at (`tap_points`, joined by " + "), so that statistics taken at
/// other points (`--taps`) are refused.
fn shard_groups(disc: &symmetry::Discovery, points: &TapPoints) -> Vec<ShardGroup> {
    points
        .iter()
        .filter(|(_, points)| !points.is_empty())
        .map(|(id, points)| ShardGroup {
            id: *id,
            width: disc.groups[*id].width,
            tap: points
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(" + "),
        })
        .collect()
}

/// Model 0's groups, discovered at the calibration batch shape, and every model's value names
/// by model-0 name, after checking the models share one architecture; the weights are not
/// loaded yet (`Prepared::load_weights`).
fn discover(models: &[Model], calib: &[TensorData], opts: &MergeOptions) -> Result<Prepared> {
    if models.len() < 2 {
        return Err(Error::Usage("merging needs at least two models".into()));
    }
    let base = &models[0];
    for other in &models[1..] {
        same_architecture(base, other)?;
    }
    let names: Vec<HashMap<String, String>> = models.iter().map(|m| value_map(base, m)).collect();

    let first = crate::data::input_shapes(base, Some(calib), &[], 1)?;
    let first: HashMap<String, Vec<usize>> = first
        .into_iter()
        .map(|(k, mut v)| {
            if let Some(d) = v.first_mut() {
                *d = (*d).min(opts.batch.max(1));
            }
            (k, v)
        })
        .collect();
    let shapes = infer_shapes(base, &first)?;
    let batch = first.values().find_map(|v| v.first().copied()).unwrap_or(1);
    let sample_bytes = activation_bytes_per_sample(base, &shapes, batch);
    let shapes_other_batch = if opts.width != 1.0 {
        let more: HashMap<String, Vec<usize>> = first
            .iter()
            .map(|(k, v)| {
                let mut v = v.clone();
                if let Some(d) = v.first_mut() {
                    *d += 1;
                }
                (k.clone(), v)
            })
            .collect();
        // A model whose batch is fixed in its file cannot take one more sample: then no axis
        // depends on the batch, and widened reshapes keep every size as a constant.
        Some(infer_shapes(base, &more).unwrap_or_else(|_| shapes.clone()))
    } else {
        None
    };
    Ok(Prepared {
        disc: symmetry::discover(base, &shapes)?,
        names,
        sample_bytes,
        shape_batch: batch,
        shapes,
        shapes_other_batch,
        weights: Vec::new(),
        folded: bn_fold::Folded::default(),
    })
}

/// Bytes of one sample's activations, summed over every value of `model` but its
/// initializers, from shapes inferred at `batch` samples (4 bytes an element): a bound on
/// what an engine holds per sample in one pass (it reuses buffers, so it holds less).
fn activation_bytes_per_sample(model: &Model, shapes: &ShapeMap, batch: usize) -> usize {
    let weights: std::collections::HashSet<&str> = model
        .graph()
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .collect();
    let total: usize = shapes
        .iter()
        .filter(|(name, _)| !weights.contains(name.as_str()))
        .map(|(_, shape)| 4 * shape.iter().product::<usize>())
        .sum();
    total / batch.max(1)
}

/// What `--repair-batch auto` allows the merged-model pass's activations (by
/// `activation_bytes_per_sample`). Below it every repair sample goes in one batch, the exact
/// one-pass scheme (every bundled pair: the largest estimate, the GroupNorm ResNet-20's, is
/// 1.1 GB for its 256 samples); a 224² ResNet-50 at 256 samples would hold about 2.6 GB more,
/// so it runs in batches whose statistics are pooled (on the bundled pairs, batches of 64 and
/// 16 land within 0.5 points of one batch of 256). 1.25 GiB, not the 2 GiB of before: larger
/// batches were slower, not faster (224² ResNet-18 pair, 256 samples: batches of 91 7.1 s at
/// a 2.87 GB peak, of 56 6.2–6.4 s at 1.96 GB, of 22 6.0 s at 1.45 GB; ResNet-50, batches of
/// 20 or 10: 16.3 and 16.7 s, its peak calibration's either way).
const REPAIR_ACTIVATIONS: usize = 5 << 28;

/// The merged-model pass's batch: `opts.repair_batch`, or (0, auto) the largest within
/// `REPAIR_ACTIVATIONS`, at most every repair sample.
fn repair_batch(opts: &MergeOptions, sample_bytes: usize) -> usize {
    if opts.repair_batch > 0 {
        return opts.repair_batch;
    }
    (REPAIR_ACTIVATIONS / sample_bytes.max(1)).clamp(1, opts.repair_samples.max(1))
}

/// Calibration statistics (where the method uses activations), then the matchings: the
/// start, and the iterative dual-space loop for the methods that iterate.
fn find_matchings(
    prep: &mut Prepared,
    models: &[Model],
    calib: &[TensorData],
    opts: &MergeOptions,
    later: Later<'_>,
    progress: &mut dyn FnMut(&str, usize, usize),
    timer: &mut Timer,
) -> Result<Matching> {
    // The similarity matrices' recycled allocation (`stats::spare`) lives as long as this.
    let spare = crate::stats::spare::Released;
    let Later {
        repair_taps,
        refit_outputs: keep,
    } = later;
    let (disc, names) = (&prep.disc, &prep.names);
    let mut endpoint = None;
    let mut kept = calib::Kept::default();
    let mut calibration_passes = 0;
    // Activation statistics: given, or calibrated here.
    // Correlations, as f32 upper triangles for the whole iterative loop: they only rank
    // candidate pairs (as the f32 weight similarities do), and on a ViT-B pair the twelve
    // 6,144-unit MLP groups' matrices are 0.9 GB so, 3.6 GB as full f64 matrices. Spilled to
    // a temporary file where `--max-memory` would not hold them beside the weights.
    let model_bytes: Vec<u64> = models
        .iter()
        .map(|m| prost::Message::encoded_len(&m.proto) as u64)
        .collect();
    let mut act = if opts.method.uses_activations()
        && spills_correlations(&disc.groups, &model_bytes, opts)
    {
        Correlations::spilling()?
    } else {
        Correlations::held()
    };
    // CCA: the groups a linear map can align, and their maps (from the moments, before those
    // become correlations).
    let cca_scope = if opts.method == Method::Cca {
        cca::scope(&disc.groups, &Graph::new(&models[0])?)
    } else {
        std::collections::BTreeMap::new()
    };
    let mut cca_sd: HashMap<usize, ndarray::Array1<f64>> = HashMap::new();
    // `--width`: the merged width of each group that may be widened.
    let widen = match &prep.shapes_other_batch {
        Some(other) => {
            let axes = shape_flow::Axes::new(disc, &prep.shapes, other);
            Some(widen::scope(&disc.groups, &Graph::new(&models[0])?, &axes))
        }
        None => None,
    };
    let no_scope = WidenScope::new();
    let widen_scope = widen.as_ref().map_or(&no_scope, |w| &w.0);
    // Blocks (attention heads, GroupNorm groups) widen whole. Heads that share their order
    // with other groups (Q/K, V/O) widen only evenly: `--widen worst` re-matches one group at
    // a time, which would part them from those groups.
    let shares_blocks = |g: &symmetry::Group| {
        disc.groups
            .iter()
            .any(|o| o.id != g.id && o.block.is_some() && o.block == g.block)
    };
    let uniform: HashMap<usize, usize> = disc
        .groups
        .iter()
        .filter(|g| matches!(widen_scope.get(&g.id), Some(Ok(()))))
        .filter_map(|g| match g.kind {
            GroupKind::Plain => {
                let wide = (g.width as f64 * opts.width).round() as usize;
                Some((g.id, wide.clamp(g.width, models.len() * g.width)))
            }
            GroupKind::Blocked { .. } if opts.widen == Spread::Worst && shares_blocks(g) => None,
            GroupKind::Blocked {
                blocks, block_size, ..
            } => {
                let wide = (blocks as f64 * opts.width).round() as usize;
                Some((g.id, wide.clamp(blocks, models.len() * blocks) * block_size))
            }
        })
        .collect();
    // The start and the loop match at one model's width; `--width`'s extra units go afterwards
    // (`widen_matched`): a group's weight similarity reads its neighbours' correspondences,
    // which a neighbour widened during the loop would keep apart.
    let targets: HashMap<usize, usize> = HashMap::new();
    if opts.method.uses_activations() {
        let points = tap_points(disc, &models[0], opts)?;
        // Shards' sums (`--stats`), read in place; calibrated groups are correlations already.
        let shards = match &opts.stats {
            Some(stats) => {
                let fingerprints: Vec<String> = models.iter().map(fingerprint).collect();
                stats.check(
                    std::path::Path::new("--stats"),
                    &fingerprints,
                    &shard_groups(disc, &points),
                )?;
                keep_sd(&stats.moments, &cca_scope, &mut cca_sd);
                Some(&stats.moments)
            }
            None => {
                // Repair's endpoint statistics ride on the first pass.
                let side = calib::Side {
                    names: names
                        .iter()
                        .map(|map| {
                            repair_taps
                                .iter()
                                .map(|(t, _)| map.get(t).cloned().unwrap_or(t.clone()))
                                .collect()
                        })
                        .collect(),
                    axes: repair_taps.iter().map(|(_, axis)| *axis).collect(),
                    samples: side_samples(repair_taps, opts.repair_samples, keep, calib),
                    keep: names
                        .iter()
                        .map(|map| {
                            keep.iter()
                                .map(|(t, _)| map.get(t).cloned().unwrap_or(t.clone()))
                                .collect()
                        })
                        .collect(),
                    keep_samples: keep
                        .iter()
                        .map(|(_, n)| (*n).min(crate::data::sample_count(calib)))
                        .collect(),
                };
                let tapped = tapped_groups(prep, &points, models.len());
                if process_memory::traced() {
                    for t in &tapped {
                        eprintln!(
                            "memory: group {} {} units, {} KiB of taps a sample",
                            t.id,
                            t.units,
                            t.sample_outputs >> 10
                        );
                    }
                }
                // The budget is the whole process's: what it holds already, the engines'
                // copies of the models and the batches in flight come off it first.
                let batch_bytes = passes::batch_bytes(opts.max_memory);
                let engines = passes::engine_bytes(&model_bytes, batch_bytes);
                let held = resident_bytes();
                if let Some(b) = opts.max_memory.filter(|&b| b < held + engines) {
                    crate::runtime::warn_once(&format!(
                        "--max-memory {} MiB is below what calibration holds besides the \
                         statistics, about {} MiB (the process now, the engines' copies of the \
                         models, their batches): the merge will go over it",
                        b >> 20,
                        (held + engines) >> 20
                    ));
                }
                let budget = opts.max_memory.map(|b| b.saturating_sub(held + engines));
                // One sample of the first pass's side values, in every model.
                let side_outputs = repair_taps
                    .iter()
                    .map(|(t, _)| t)
                    .chain(keep.iter().map(|(t, _)| t))
                    .map(|t| prep.value_sample_bytes(t))
                    .sum::<u64>()
                    * models.len() as u64;
                let plan = passes::plan(&tapped, side_outputs, budget, batch_bytes, !act.spills());
                calibration_passes = plan.len();
                let none = calib::Side::none();
                for (k, pass) in plan.iter().enumerate() {
                    let only: std::collections::HashSet<usize> =
                        pass.groups.iter().copied().collect();
                    let side = if k == 0 { &side } else { &none };
                    // The engines' activations get the one batch `engines` set aside for
                    // them, and whatever the pass's statistics leave of the budget.
                    let activations = budget.map(|b| {
                        let free = usize::try_from(b.saturating_sub(pass.held));
                        batch_bytes.saturating_add(free.unwrap_or(usize::MAX))
                    });
                    if process_memory::traced() {
                        eprintln!(
                            "memory: pass {k}: {} groups, statistics {} MiB, batches of {} MiB, \
                             activations {} MiB ({} MiB a sample)",
                            only.len(),
                            pass.held >> 20,
                            batch_bytes >> 20,
                            activations.map_or(usize::MAX, |a| a >> 20),
                            (prep.sample_bytes * models.len()) >> 20
                        );
                    }
                    let pass = Pass {
                        groups: &only,
                        points: &points,
                        side,
                        batching: calib::Batching {
                            batch: opts.batch,
                            sample_bytes: prep.sample_bytes,
                            bytes: batch_bytes,
                            activations,
                        },
                    };
                    let (moments, side, rows) =
                        collect_moments(disc, names, models, calib, pass, opts, progress)?;
                    if k == 0 {
                        endpoint = Some(side);
                        kept = rows;
                    }
                    keep_sd(&moments, &cca_scope, &mut cca_sd);
                    // Correlations now, so that only this pass's f64 moments are ever held.
                    for (g, m) in moments {
                        act.insert(g, m.correlation_f32())?;
                    }
                    give_back_freed_memory();
                    trace_memory("calibration pass");
                }
                None
            }
        };
        timer.lap("calibration");
        // Correlations straight from the shards' sums (a clone of those would hold them
        // twice: 3.9 GB on a ViT-B pair).
        if let Some(shards) = shards {
            for (g, m) in shards {
                act.insert(*g, m.correlation_f32())?;
            }
        }
        timer.lap("statistics");
    }
    // The weights only now: the engines that calibrated are gone.
    prep.load_weights(models)?;
    timer.lap("load");
    let Prepared { disc, weights, .. } = &*prep;

    // Matching.
    let layout = Layout::new(&disc.structure, &disc.groups);
    let n = models.len();
    let mut m = Matchings {
        models: n,
        ..Default::default()
    };
    let mut values: Values = BTreeMap::new();
    // A tensor that every model holds identically (a frozen class-embedding matrix, a shared
    // lookup table) already puts its groups in one coordinate system: those stay as they are.
    let pinned = pinned_groups(&disc.groups, weights);
    let mut units = matching_units(&disc.groups);
    units.retain(|u| {
        let shared = u.iter().find_map(|g| pinned.get(g));
        if let Some(tensor) = shared {
            for &g in u {
                let (p, bp) = identity(&disc.groups[g], n);
                m.p.insert(g, Unmerge::from_dense(&p));
                if let Some(bp) = bp {
                    m.blocks.insert(g, Unmerge::from_dense(&bp));
                }
                values.insert(
                    g,
                    (
                        f64::NAN,
                        format!("pinned: '{tensor}' is the same in every model"),
                    ),
                );
            }
        }
        shared.is_none()
    });
    let mut sweeps = 0;
    let mut sweep_values = Vec::new();
    let mut similarities = similarity::Counts::default();
    if opts.method == Method::Avg {
        for g in &disc.groups {
            let (p, bp) = identity(g, n);
            m.p.insert(g.id, Unmerge::from_dense(&p));
            if let Some(bp) = bp {
                m.blocks.insert(g.id, Unmerge::from_dense(&bp));
            }
            values.insert(g.id, (f64::NAN, "identity".into()));
        }
    } else {
        let mut wsim = similarity::WeightSimilarity::new(
            &disc.groups,
            &layout,
            &disc.slots,
            weights,
            &prep.folded,
        )
        .with_capacity(weight_cache_bytes(&disc.groups, n, opts));
        warn_if_matching_exceeds(&disc.groups, n, opts);
        trace_memory("weight similarities ready");
        // Start: activations where the method uses them.
        if opts.method.uses_activations() {
            for unit in &units {
                // Without the iterative loop a correlation is used once: freed as it is read.
                let iterates = opts.method.iterates();
                let mut sims: Vec<(usize, Array2<f64>, String)> = Vec::new();
                for &g in unit {
                    let a = act.get(g)?.map(|a| a.map_full(|_, _, v| f64::from(v)));
                    sims.push(match a {
                        Some(a) => {
                            if !iterates && !uniform.contains_key(&g) {
                                act.remove(g);
                            }
                            (g, a, "activation".to_string())
                        }
                        None => {
                            let s = wsim
                                .get(&disc.groups[g], &m)
                                .unwrap_or_else(|| Array2::eye(n * disc.groups[g].width));
                            (g, s, "weight (no tap)".to_string())
                        }
                    });
                }
                match_unit(&disc.groups, sims, opts, &targets, &mut m, &mut values)?;
            }
        }
        if opts.method.iterates() {
            let mut rng = SplitMix(opts.seed ^ 0x9E37_79B9_7F4A_7C15);
            let mut best: Option<(Matchings, Values)> = None;
            let (mut best_value, mut stall) = (f64::NEG_INFINITY, 0);
            // The value at the last real improvement (one that resets `stall`).
            let mut reference = f64::NEG_INFINITY;
            // Per unit, the inputs and the result of each of its matchings: a unit whose
            // inputs are those of an earlier matching would be matched again to the same
            // result, which it takes instead (on a ViT-B pair each 6,144-unit MLP group costs
            // a 116-GFLOP Gram and a zip). All of them, not only the last: a sweep that did
            // not improve is reverted, and the next one meets the best sweep's inputs again.
            // `MUDSC_RECOMPUTE_ALL` (tests) recomputes every unit, the reference's loop.
            let mut seen: HashMap<usize, Vec<(Vec<_>, Vec<_>)>> = HashMap::new();
            let keep = std::env::var_os("MUDSC_RECOMPUTE_ALL").is_none();
            let result = |unit: &[usize], m: &Matchings, values: &Values| -> Vec<Held> {
                unit.iter()
                    .map(|g| {
                        (
                            m.p.get(g).cloned(),
                            m.blocks.get(g).cloned(),
                            values.get(g).cloned(),
                        )
                    })
                    .collect()
            };
            for sweep in 0..opts.max_sweeps {
                sweeps = sweep + 1;
                let before = (m.p.clone(), m.blocks.clone());
                let mut order: Vec<usize> = (0..units.len()).collect();
                rng.shuffle(&mut order);
                for &u in &order {
                    let inputs: Vec<_> = units[u]
                        .iter()
                        .map(|&g| wsim.inputs(&disc.groups[g], &m))
                        .collect();
                    let earlier = seen
                        .get(&u)
                        .and_then(|all| all.iter().find(|(i, _)| *i == inputs));
                    if let (true, Some((_, held))) = (keep, earlier) {
                        restore(&units[u], held, &mut m, &mut values);
                        wsim.counts.matchings_kept += 1;
                        continue;
                    }
                    let mut sims: Vec<(usize, Array2<f64>, String)> = Vec::new();
                    for &g in &units[u] {
                        // Upper triangles: `blend` reads and mirrors only that.
                        let w = wsim.get_upper(&disc.groups[g], &m);
                        let a = act.get(g)?;
                        sims.push(match (w, a, opts.method.uses_activations()) {
                            (Some(mut w), Some(a), true) => {
                                blend(&mut w, &a, opts.alpha);
                                (g, w, "dual".into())
                            }
                            (Some(mut w), _, _) => {
                                crate::stats::mirror_upper(&mut w);
                                (g, w, "weight".into())
                            }
                            (None, Some(a), _) => (
                                g,
                                a.map_full(|_, _, v| f64::from(v)),
                                "activation (no weights)".into(),
                            ),
                            (None, None, _) => {
                                (g, Array2::eye(n * disc.groups[g].width), "none".into())
                            }
                        });
                    }
                    match_unit(&disc.groups, sims, opts, &targets, &mut m, &mut values)?;
                    let held = result(&units[u], &m, &values);
                    seen.entry(u).or_default().push((inputs, held));
                }
                let mean = values
                    .values()
                    .map(|v| v.0)
                    .filter(|v| v.is_finite())
                    .sum::<f64>()
                    / values.len().max(1) as f64;
                sweep_values.push(mean);
                progress("matching", sweep + 1, opts.max_sweeps);
                trace_memory("matching sweep");
                // A sweep that changed no matching reached a fixed point: every later sweep,
                // in any order, recomputes the same matchings from the same state.
                let fixed = m.p == before.0 && m.blocks == before.1;
                if best.is_some() && best_value >= mean {
                    stall += 1;
                    if let Some((bm, bv)) = &best {
                        m = bm.clone();
                        values = bv.clone();
                    }
                } else {
                    best_value = mean;
                    best = Some((m.clone(), values.clone()));
                    if reference.is_finite() && mean - reference <= opts.tol * reference.abs() {
                        stall += 1;
                    } else {
                        stall = 0;
                        reference = mean;
                    }
                }
                if stall >= opts.patience {
                    break;
                }
                if fixed {
                    break;
                }
            }
            if let Some((bm, bv)) = best {
                m = bm;
                values = bv;
            }
        }
        if !uniform.is_empty() {
            // Groups every model holds identically stay as they are.
            let wide: HashMap<usize, usize> = match opts.widen {
                Spread::All => uniform.clone(),
                Spread::Worst => {
                    spread::worst_first(&uniform, &disc.groups, &values, n, opts.width)
                        .into_iter()
                        .collect()
                }
                Spread::PerParameter => spread::per_parameter(
                    &uniform,
                    &disc.groups,
                    &matching_units(&disc.groups),
                    &values,
                    &weight_elements(&models[0]),
                    n,
                )
                .into_iter()
                .collect(),
            }
            .into_iter()
            .filter(|(g, _)| !pinned.contains_key(g))
            .collect();
            widen_matched(
                &disc.groups,
                &wide,
                &mut wsim,
                &act,
                opts,
                &mut m,
                &mut values,
            )?;
        }
        similarities = wsim.counts;
    }
    // CCA's linear maps replace the permutations of the groups they can align (a group every
    // model holds identically stays as it is), anchored to those permutations where the
    // activations leave the map undetermined (dead units).
    for (g, sd) in cca_sd {
        let (Some(r), Some(p)) = (act.get(g)?, m.p.get(&g)) else {
            continue;
        };
        if pinned.contains_key(&g) {
            continue;
        }
        let cov = r.map_full(|i, j, r| f64::from(r) * sd[i] * sd[j]);
        let maps = cca::maps(&cov, p, opts.cca_ridge)?;
        values.insert(g, (maps.unit_correlation, "cca".into()));
        m.linear.insert(g, std::sync::Arc::new(maps.maps));
    }
    for (g, scope) in widen_scope {
        let why = match scope {
            Err(why) => why.as_str(),
            Ok(()) if !uniform.contains_key(g) => "heads widen only with an even --width",
            Ok(()) => continue,
        };
        if let Some(v) = values.get_mut(g) {
            v.1 = format!("{} (kept one model's width: {why})", v.1);
        }
    }
    for (g, scope) in &cca_scope {
        if let (Err(why), Some(v)) = (scope, values.get_mut(g)) {
            v.1 = format!("{} (cca: kept a permutation: {why})", v.1);
        }
    }
    drop(spare);
    timer.lap("matching");
    Ok(Matching {
        m,
        values,
        sweeps,
        sweep_values,
        calibration_passes,
        correlations_spilled: act.spills(),
        similarities,
        endpoint,
        kept,
        widen,
    })
}

/// Values of the models that calibration gathers on its passes for the phases after
/// matching: repair's endpoint taps (their moments) and the refit layers' outputs (kept).
#[derive(Clone, Copy, Default)]
struct Later<'a> {
    repair_taps: &'a [(String, Option<usize>)],
    refit_outputs: &'a [(String, usize)],
}

/// One matching's result per group of `unit` (unmerge, block unmerge, merge value; `None`
/// where the matching gave none), as `find_matchings`' loop records it.
type Held = (Option<Unmerge>, Option<Unmerge>, Option<(f64, String)>);

/// Puts a unit's recorded result back into the matchings and values.
fn restore(unit: &[usize], held: &[Held], m: &mut Matchings, values: &mut Values) {
    for (g, (p, blocks, value)) in unit.iter().zip(held) {
        match p {
            Some(p) => m.p.insert(*g, p.clone()),
            None => m.p.remove(g),
        };
        match blocks {
            Some(b) => m.blocks.insert(*g, b.clone()),
            None => m.blocks.remove(g),
        };
        match value {
            Some(v) => values.insert(*g, v.clone()),
            None => values.remove(g),
        };
    }
}

/// The dual similarity α·weight + (1−α)·activation, in `w` (symmetric, as both are; only its
/// upper triangle is read, `WeightSimilarity::get_upper`). The activation correlation is read
/// from its triangle into `w`'s upper one, which a tiled mirror then copies down (writing
/// `[j, i]` beside `[i, j]` walked a column per row).
fn blend(w: &mut Array2<f64>, act: &crate::stats::Symmetric<f32>, alpha: f64) {
    act.for_each_upper(|i, j, a| {
        w[[i, j]] = w[[i, j]] * alpha + f64::from(a) * (1.0 - alpha);
    });
    crate::stats::mirror_upper(w);
}

/// `--width`: the merged model's shapes must hold together before it is written. Shape
/// inference over it, at the calibration batch, catches a size the checks before the merge
/// could not see (a widened value meeting a constant of one model's width, say) as an error
/// naming the node, instead of a file that no engine runs.
fn check_widened_shapes(merged: &Model, base: &Model, shapes: &ShapeMap) -> Result<()> {
    let graph = Graph::new(base)?;
    let inputs: HashMap<String, Vec<usize>> = graph
        .inputs()
        .iter()
        .filter_map(|vi| {
            let name = vi.name.clone()?;
            let shape = shapes.get(&name)?.clone();
            Some((name, shape))
        })
        .collect();
    infer_shapes(merged, &inputs).map(|_| ()).map_err(|e| {
        Error::Usage(format!(
            "--width: the widened model does not hold together ({e}); merge at --width 1, or \
             report the model"
        ))
    })
}

/// `--width`: re-matches the groups in `wide` (merged units of each) at their widths, every
/// similarity taken from the matchings at one model's width before any group widens (the
/// loop's similarity for methods that iterate, the activations for those that do not; the
/// weights where a group has no tap). Groups that share a block order are matched together.
fn widen_matched(
    groups: &[symmetry::Group],
    wide: &HashMap<usize, usize>,
    wsim: &mut similarity::WeightSimilarity,
    act: &Correlations,
    opts: &MergeOptions,
    m: &mut Matchings,
    values: &mut Values,
) -> Result<()> {
    // One unit's similarities at a time (a ViT-B's twelve MLP groups hold 3.6 GB of them),
    // each against the matchings as the loop left them.
    let before = m.clone();
    for unit in matching_units(groups) {
        if !unit.iter().all(|g| wide.contains_key(g)) {
            continue;
        }
        let mut unit_sims = Vec::with_capacity(unit.len());
        for &g in &unit {
            let a = act.get(g)?;
            let weighs = opts.method.iterates() || a.is_none();
            let w = if weighs {
                wsim.get(&groups[g], &before)
            } else {
                None
            };
            let sim = match (w, a) {
                (Some(mut w), Some(a)) if opts.method.uses_activations() => {
                    blend(&mut w, &a, opts.alpha);
                    w
                }
                (Some(w), _) => w,
                (None, Some(a)) => a.map_full(|_, _, v| f64::from(v)),
                (None, None) => break,
            };
            let how = values.get(&g).map(|v| v.1.clone()).unwrap_or_default();
            unit_sims.push((g, sim, how));
        }
        if unit_sims.len() == unit.len() {
            match_unit(groups, unit_sims, opts, wide, m, values)?;
        }
    }
    Ok(())
}

/// The per-unit standard deviations of the groups in `scope` that `moments` hold: with the
/// correlations, the covariances CCA needs after the matching loop.
fn keep_sd(
    moments: &HashMap<usize, crate::stats::Moments>,
    scope: &std::collections::BTreeMap<usize, std::result::Result<(), String>>,
    out: &mut HashMap<usize, ndarray::Array1<f64>>,
) {
    for (g, m) in moments {
        if matches!(scope.get(g), Some(Ok(()))) {
            out.insert(*g, m.mean_std().1);
        }
    }
}

/// Whether `--max-memory` is too small to hold every tapped group's correlation through the
/// matching beside what the process holds now, the models' weights (about the models' size)
/// and the widest group's matrices while it is matched: then they are spilled to a temporary
/// file (`Correlations::spilling`) and calibration's passes need not keep them either.
fn spills_correlations(
    groups: &[symmetry::Group],
    model_bytes: &[u64],
    opts: &MergeOptions,
) -> bool {
    let Some(budget) = opts.max_memory else {
        return false;
    };
    let n = model_bytes.len();
    let correlations: u64 = groups
        .iter()
        .filter(|g| g.tap.is_some())
        .map(|g| passes::correlation_bytes(g.width * n))
        .sum();
    let widest = widest_group_bytes(groups, n, opts.method);
    let needed = resident_bytes()
        .saturating_add(model_bytes.iter().sum())
        .saturating_add(correlations)
        .saturating_add(widest);
    needed > budget
}

/// The most any one group holds while it is matched (`budget::group_bytes`' peak).
fn widest_group_bytes(groups: &[symmetry::Group], models: usize, method: Method) -> u64 {
    widest_group(groups, models, method).map_or(0, |(_, bytes)| bytes)
}

/// The group that holds the most while it is matched, and those bytes.
fn widest_group(
    groups: &[symmetry::Group],
    models: usize,
    method: Method,
) -> Option<(&symmetry::Group, u64)> {
    groups
        .iter()
        .map(|g| (g, budget::group_bytes(g, models, method).0))
        .max_by_key(|&(_, bytes)| bytes)
}

/// Warns, as calibration does for its own floor, when `--max-memory` is below what the
/// matching cannot do without: what the process holds now (the models' weights, the
/// correlations it keeps) and the widest group's matrices while it is matched. A BERT-base
/// pair under `--max-memory 2G` peaked at 2.4 GB in its matching, unannounced: its MLP groups'
/// 6,144 × 6,144 matrices alone are over a gigabyte.
fn warn_if_matching_exceeds(groups: &[symmetry::Group], models: usize, opts: &MergeOptions) {
    let Some(budget) = opts.max_memory else {
        return;
    };
    let Some((widest, matrices)) = widest_group(groups, models, opts.method) else {
        return;
    };
    let held = resident_bytes();
    if held.saturating_add(matrices) > budget {
        crate::runtime::warn_once(&format!(
            "--max-memory {} MiB is below what the matching holds, about {} MiB (the process \
             now, with the models' weights, {} MiB; group g{}'s matrices while it is matched, \
             {} MiB for {} models × {} units): the merge will go over it",
            budget >> 20,
            held.saturating_add(matrices) >> 20,
            held >> 20,
            widest.id,
            matrices >> 20,
            models,
            widest.width
        ));
    }
}

/// What the weight similarities' cache may hold under `--max-memory`: the budget less what
/// the process holds now (the models' weights, every group's correlation) and the widest
/// group's matrices while it is matched, at most `similarity::CACHE_BYTES`. A cache that does
/// not fit only costs time: the blocks left out are recomputed when read.
fn weight_cache_bytes(groups: &[symmetry::Group], models: usize, opts: &MergeOptions) -> usize {
    let Some(budget) = opts.max_memory else {
        return similarity::CACHE_BYTES;
    };
    let widest = widest_group_bytes(groups, models, opts.method);
    let free = budget.saturating_sub(resident_bytes().saturating_add(widest));
    usize::try_from(free)
        .unwrap_or(usize::MAX)
        .min(similarity::CACHE_BYTES)
}

/// One pass over the calibration data: the groups it taps, and the side values whose unit
/// moments ride on it.
struct Pass<'a> {
    groups: &'a std::collections::HashSet<usize>,
    /// Every tapped group's tap points (`tap_points`), of which the pass reads its groups'.
    points: &'a TapPoints,
    side: &'a calib::Side,
    /// How the data is cut into batches.
    batching: calib::Batching,
}

/// Each tapped group's tap points in model 0 (`observe::tap_points`: values and unit axes),
/// in group order. Computed once: the pass plan, every calibration pass and the statistics
/// files' group list (`shard_groups`) read them.
type TapPoints = Vec<(usize, Vec<(String, usize)>)>;

fn tap_points(disc: &symmetry::Discovery, model: &Model, opts: &MergeOptions) -> Result<TapPoints> {
    let layout = Layout::new(&disc.structure, &disc.groups);
    let graph = Graph::new(model)?;
    Ok(disc
        .groups
        .iter()
        .filter(|g| g.tap.is_some())
        .map(|g| {
            let points = observe::tap_points(g, &graph, &disc.slots, &layout, opts.token_taps);
            (g.id, points)
        })
        .collect())
}

/// The tapped groups as calibration's pass plan sees them: units across `models`, and one
/// sample's tap outputs in every model (model 0's shapes, 4 bytes an element).
fn tapped_groups(prep: &Prepared, points: &TapPoints, models: usize) -> Vec<passes::Tapped> {
    points
        .iter()
        .map(|(id, taps)| passes::Tapped {
            id: *id,
            units: prep.disc.groups[*id].width * models,
            sample_outputs: taps
                .iter()
                .map(|(t, _)| prep.value_sample_bytes(t))
                .sum::<u64>()
                * models as u64,
        })
        .collect()
}

/// Runs every model on the calibration data and streams each tapped group's moments.
fn collect_moments(
    disc: &symmetry::Discovery,
    names: &[HashMap<String, String>],
    models: &[Model],
    calib: &[TensorData],
    pass: Pass<'_>,
    opts: &MergeOptions,
    progress: &mut dyn FnMut(&str, usize, usize),
) -> Result<(
    HashMap<usize, crate::stats::Moments>,
    calib::SideMoments,
    calib::Kept,
)> {
    let Pass {
        groups: only,
        points,
        side,
        batching,
    } = pass;
    let taps: Vec<calib::Tap> = points
        .iter()
        .filter(|(id, _)| only.contains(id))
        .flat_map(|(id, points)| {
            let g = &disc.groups[*id];
            points
                .iter()
                .map(|(tap, axis)| calib::Tap {
                    group: g.id,
                    names: names
                        .iter()
                        .map(|m| m.get(tap).cloned().unwrap_or(tap.clone()))
                        .collect(),
                    axis: *axis,
                    width: g.width,
                    positions: opts.tap_positions,
                })
                .collect::<Vec<_>>()
        })
        .collect();
    calib::collect(
        models,
        &taps,
        side,
        calib,
        batching,
        opts.backend,
        &opts.backend_options,
        &mut |done, total| progress("calibration", done, total),
    )
}

/// Groups with a member tensor that is bit-identical in every model and not constant along
/// the group's axis, with that tensor's name.
fn pinned_groups(groups: &[symmetry::Group], weights: &weights::Weights) -> HashMap<usize, String> {
    let mut out = HashMap::new();
    for g in groups {
        for member in &g.members {
            let Some(first) = weights[0].get(&member.tensor) else {
                continue;
            };
            let same = weights[1..]
                .iter()
                .all(|w| w.get(&member.tensor) == Some(first));
            let varies = first.varies_along(member.axis);
            if same && varies {
                out.insert(g.id, member.tensor.clone());
                break;
            }
        }
    }
    out
}

/// Per group: its merge value and what the matching was computed from. Ordered, so that the
/// loop's mean merge value is summed in one order in every run (a hash map's order changes
/// from run to run, and with it the last bits of the mean the loop compares).
type Values = BTreeMap<usize, (f64, String)>;

/// Groups matched together: a plain group alone; blocked groups sharing a block order together.
fn matching_units(groups: &[symmetry::Group]) -> Vec<Vec<usize>> {
    let mut by_block: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut units = Vec::new();
    for g in groups {
        match g.block {
            None => units.push(vec![g.id]),
            Some(b) => by_block.entry(b).or_default().push(g.id),
        }
    }
    units.extend(by_block.into_values());
    units
}

/// Matches one unit (a plain group, or blocked groups sharing their block order).
fn match_unit(
    groups: &[symmetry::Group],
    mut sims: Vec<(usize, Array2<f64>, String)>,
    opts: &MergeOptions,
    targets: &HashMap<usize, usize>,
    m: &mut Matchings,
    values: &mut Values,
) -> Result<()> {
    let n = m.models;
    match sims.as_slice() {
        [(g, _, _)] if groups[*g].block.is_none() => {
            let (g, s, how) = sims.pop().expect("one similarity");
            let matched = if opts.method.zips() {
                let target = targets.get(&g).copied().unwrap_or(groups[g].width);
                matching::zip_owned(s, n, opts.zip_a, opts.zip_b, target)
            } else {
                let matched = align(s.view(), n)?;
                crate::stats::spare::give_back(s);
                matched
            };
            m.p.insert(g, Unmerge::from_dense(&matched.p));
            values.insert(g, (matched.value, how));
            crate::stats::spare::give_back(matched.p);
        }
        _ => {
            // Blocked: sum every group's head-level scores so that they share one block order,
            // and widen them alike (`--width`: the fewest blocks any of them may have).
            let target_blocks = sims
                .iter()
                .filter_map(|(g, _, _)| match groups[*g].kind {
                    GroupKind::Blocked {
                        blocks, block_size, ..
                    } => Some(targets.get(g).map_or(blocks, |t| t / block_size.max(1))),
                    GroupKind::Plain => None,
                })
                .min()
                .unwrap_or(0);
            let mut shared: Vec<Array2<f64>> = Vec::new();
            for (g, s, _) in &sims {
                if let GroupKind::Blocked {
                    blocks, block_size, ..
                } = groups[*g].kind
                {
                    for i in 1..n {
                        let (gs, _) = matching::block_scores(
                            s.view(),
                            i,
                            groups[*g].width,
                            blocks,
                            block_size,
                        )?;
                        if i == 1 {
                            shared.push(gs);
                        }
                    }
                }
            }
            for (k, (g, s, how)) in sims.iter().enumerate() {
                let GroupKind::Blocked {
                    blocks, block_size, ..
                } = groups[*g].kind
                else {
                    continue;
                };
                let others: Vec<Array2<f64>> = shared
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != k)
                    .map(|x| x.1.clone())
                    .collect();
                let (matched, bp) = if opts.method.zips() {
                    group_zip(
                        s.view(),
                        n,
                        blocks,
                        block_size,
                        &others,
                        opts.zip_a,
                        opts.zip_b,
                        target_blocks.max(blocks),
                    )?
                } else {
                    group_align(s.view(), n, blocks, block_size, &others)?
                };
                m.p.insert(*g, Unmerge::from_dense(&matched.p));
                m.blocks.insert(*g, Unmerge::from_dense(&bp));
                values.insert(*g, (matched.value, how.clone()));
            }
        }
    }
    Ok(())
}

fn identity(g: &symmetry::Group, n: usize) -> (Array2<f64>, Option<Array2<f64>>) {
    let stack =
        |w: usize| Array2::from_shape_fn((n * w, w), |(r, c)| if r % w == c { 1.0 } else { 0.0 });
    let bp = match g.kind {
        GroupKind::Blocked { blocks, .. } => Some(stack(blocks)),
        GroupKind::Plain => None,
    };
    (stack(g.width), bp)
}

/// Records how the model was made, in its metadata.
fn provenance(model: &mut Model, report: &MergeReport, inputs: &[Model]) {
    let models: Vec<String> = inputs.iter().map(provenance_name).collect();
    let mut entries = vec![
        ("mudsc.method", report.method.name().to_string()),
        ("mudsc.alpha", report.alpha.to_string()),
        (
            "mudsc.calibration_samples",
            report.calibration_samples.to_string(),
        ),
        ("mudsc.models", models.join(", ")),
        ("mudsc.version", env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(t) = &report.partial {
        entries.push(("mudsc.zip_until", t.cut_node.clone()));
    }
    stamp_provenance(model, entries);
}

/// An input model as a merged model's metadata names it: its file name and the file's sha256,
/// a record that identifies it without leaking the user's paths.
pub(crate) fn provenance_name(m: &Model) -> String {
    match m.path.as_deref().and_then(sha256_hex) {
        Some(h) => format!("{} (sha256 {h})", m.file_name()),
        None => m.file_name(),
    }
}

/// Marks `model` as made by mudsc and sets each `(key, value)` of `entries` in its metadata,
/// replacing an earlier value of the key (a merged model starts as model 0's copy).
pub(crate) fn stamp_provenance(model: &mut Model, entries: Vec<(&str, String)>) {
    model.proto.producer_name = Some("mudsc".into());
    model.proto.producer_version = Some(env!("CARGO_PKG_VERSION").into());
    for (k, v) in entries {
        model
            .proto
            .metadata_props
            .retain(|e| e.key.as_deref() != Some(k));
        model.proto.metadata_props.push(StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        });
    }
}

/// The sha256 of a file, in hex; `None` when it cannot be read.
pub fn sha256_hex(path: &std::path::Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut file = std::fs::File::open(path).ok()?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Some(
        hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_repair_batch_fits_the_activation_budget() {
        let opts = MergeOptions {
            repair_samples: 256,
            ..Default::default()
        };
        // 1 MiB a sample: all 256 in one batch; 100 MiB: 1.25 GiB ÷ 100 MiB; over the budget
        // alone: one at a time.
        assert_eq!(repair_batch(&opts, 1 << 20), 256);
        assert_eq!(repair_batch(&opts, 100 << 20), 12);
        assert_eq!(repair_batch(&opts, 8 << 30), 1);
        let fixed = MergeOptions {
            repair_batch: 64,
            ..opts.clone()
        };
        assert_eq!(repair_batch(&fixed, 100 << 20), 64);
    }
}
