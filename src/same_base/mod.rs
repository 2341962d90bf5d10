//! Same-base merges: models fine-tuned from one pretrained checkpoint share its unit order, so
//! no permutation is needed; they are merged entry by entry through their task vectors
//! τᵢ = θᵢ − θ_base (task arithmetic, TIES, DARE), or directly (weighted average, SLERP).
//!
//! Every float initializer the graphs share is merged; integer, boolean and string tensors
//! (shapes, indices, masks) are model 0's. A tensor equal in every model (a frozen head, a
//! mask holding −∞) is copied as it is. Models of different initialisations can be put in one
//! unit order first (`--align-first`: [`crate::merge::align_to_first`], then this module).

mod dare;
mod kinship;
mod slerp;
mod ties;

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::graph::{same_architecture, value_map};
use crate::onnx::proto::TensorProto;
use crate::onnx::{Model, TensorData};

pub use dare::key as dare_key;
pub use kinship::{correlation, Kinship, DIFFERENT_BASES, SAME_BASE};

/// How the models' weights are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Combine {
    /// Σ wᵢ θᵢ with weights summing to 1 (equal by default). Needs no base.
    Linear,
    /// θ_base + λ Σ wᵢ τᵢ.
    TaskArithmetic,
    /// Trim each τᵢ to its top `density` fraction by magnitude, elect a sign per parameter,
    /// θ_base + λ · (weighted mean of the entries that agree with it).
    Ties,
    /// DARE's drop-and-rescale of each τᵢ, then task arithmetic.
    DareLinear,
    /// DARE's drop-and-rescale of each τᵢ, then TIES's sign election and disjoint mean.
    DareTies,
    /// Spherical interpolation of two models at `t` (of their task vectors, given a base).
    Slerp,
}

impl Combine {
    pub fn name(self) -> &'static str {
        match self {
            Combine::Linear => "linear",
            Combine::TaskArithmetic => "task-arithmetic",
            Combine::Ties => "ties",
            Combine::DareLinear => "dare-linear",
            Combine::DareTies => "dare-ties",
            Combine::Slerp => "slerp",
        }
    }

    /// Whether the method is defined only relative to a base.
    pub fn needs_base(self) -> bool {
        !matches!(self, Combine::Linear | Combine::Slerp)
    }

    fn elects_signs(self) -> bool {
        matches!(self, Combine::Ties | Combine::DareTies)
    }
}

#[derive(Clone, Debug)]
pub struct SameBaseOptions {
    pub combine: Combine,
    /// Per-model weights (`None`: 1 each; for `Linear`, normalised to sum 1).
    pub weights: Option<Vec<f64>>,
    /// Scale of the merged task vector.
    pub lambda: f64,
    /// TIES: fraction of each task vector kept (largest magnitudes); DARE: probability that an
    /// entry survives (p = 1 − density).
    pub density: f64,
    /// SLERP: 0 gives model 0, 1 gives model 1.
    pub t: f64,
    /// DARE's drop mask.
    pub seed: u64,
}

impl Default for SameBaseOptions {
    fn default() -> Self {
        SameBaseOptions {
            combine: Combine::TaskArithmetic,
            weights: None,
            lambda: 1.0,
            density: 0.2,
            t: 0.5,
            seed: 0,
        }
    }
}

/// What a same-base merge did.
#[derive(Clone, Debug, Serialize)]
pub struct SameBaseReport {
    pub method: Combine,
    pub models: Vec<String>,
    pub base: Option<String>,
    /// The weights used, per model (normalised for `linear`).
    pub weights: Vec<f64>,
    pub lambda: Option<f64>,
    pub density: Option<f64>,
    pub t: Option<f64>,
    pub seed: Option<u64>,
    /// Float initializers merged, and their entries.
    pub tensors_merged: usize,
    pub parameters_merged: usize,
    /// Float initializers equal in every model (and the base): copied unchanged.
    pub tensors_equal: usize,
    /// Integer, boolean and string initializers: model 0's.
    pub tensors_not_float: usize,
    /// Per model: mean correlation of its weights with the base's (with model 0's when there is
    /// no base; `null` for model 0 then) on the identity matching. Near 1: fine-tuned from one
    /// base; near 0: units in unrelated orders.
    pub identity_weight_correlation: Vec<Option<f64>>,
    /// TIES/DARE: fraction of the nonzero task-vector entries that survived trimming/dropping.
    pub kept_fraction: Option<f64>,
    /// TIES/DARE-TIES: fraction of merged parameters where surviving entries disagreed in sign.
    pub sign_conflicts: Option<f64>,
    /// The models were put in model 0's unit order by permutation matching first.
    pub aligned_first: bool,
    /// Statistics repair afterwards (`crate::merge::repair_merged`, with calibration data):
    /// layers corrected and BatchNorms reset.
    pub repaired_layers: usize,
    pub reset_batch_norms: usize,
    pub seconds: BTreeMap<String, f64>,
}

/// Merges `models` (fine-tunes of `base`, same architecture) into one with model 0's graph.
pub fn merge(
    models: &[Model],
    base: Option<&Model>,
    opts: &SameBaseOptions,
) -> Result<(Model, SameBaseReport)> {
    let clock = Instant::now();
    let weights = check(models, base, opts)?;
    for m in models.iter().chain(base) {
        same_architecture(&models[0], m)?;
    }
    let names: Vec<HashMap<String, String>> = models
        .iter()
        .chain(base)
        .map(|m| value_map(&models[0], m))
        .collect();
    let initializers: Vec<HashMap<&str, &TensorProto>> = models
        .iter()
        .chain(base)
        .map(|m| {
            m.graph()
                .initializer
                .iter()
                .filter_map(|t| Some((t.name.as_deref()?, t)))
                .collect()
        })
        .collect();
    let sources: Vec<&Model> = models.iter().chain(base).collect();
    let mut merged = models[0].clone();
    let mut tally = Tally::new(models.len());
    let graph = merged
        .proto
        .graph
        .as_mut()
        .expect("Model invariant: graph is checked at load");
    for t in &mut graph.initializer {
        let name = t.name.clone().unwrap_or_default();
        if !matches!(t.data_type, Some(1 | 10 | 11 | 16)) {
            tally.not_float += 1;
            continue;
        }
        let mut values = Vec::with_capacity(sources.len());
        for (k, m) in sources.iter().enumerate() {
            let other = names[k].get(&name).map_or(name.as_str(), String::as_str);
            let proto = initializers[k].get(other).ok_or_else(|| {
                Error::tensor(
                    &name,
                    format!("{} has no initializer '{other}'", m.display_name()),
                )
            })?;
            values.push(float_values(proto)?);
        }
        let shape = values[0].0.clone();
        for (k, (s, _)) in values.iter().enumerate().skip(1) {
            if *s != shape {
                return Err(Error::tensor(
                    &name,
                    format!(
                        "shape {s:?} in {} but {shape:?} in {}",
                        sources[k].display_name(),
                        sources[0].display_name()
                    ),
                ));
            }
        }
        let flat: Vec<Vec<f64>> = values.into_iter().map(|(_, v)| v).collect();
        if flat.iter().skip(1).all(|v| same_bits(v, &flat[0])) {
            tally.equal += 1;
            continue;
        }
        if let Some(k) = flat.iter().position(|v| v.iter().any(|x| !x.is_finite())) {
            return Err(Error::tensor(
                &name,
                format!(
                    "holds NaN or infinite values in {} and differs between the models: no \
                     arithmetic on it is meaningful",
                    sources[k].display_name()
                ),
            ));
        }
        let out = combine_tensor(&name, &flat, base.is_some(), &weights, opts, &mut tally);
        tally.merged += 1;
        tally.parameters += out.len();
        let value = ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&shape), out)
            .map_err(|e| Error::tensor(&name, e.to_string()))?;
        crate::merge::store_float(t, value);
    }
    let report = SameBaseReport {
        method: opts.combine,
        models: models.iter().map(Model::file_name).collect(),
        base: base.map(Model::file_name),
        weights,
        lambda: opts.combine.needs_base().then_some(opts.lambda),
        density: matches!(
            opts.combine,
            Combine::Ties | Combine::DareLinear | Combine::DareTies
        )
        .then_some(opts.density),
        t: (opts.combine == Combine::Slerp).then_some(opts.t),
        seed: matches!(opts.combine, Combine::DareLinear | Combine::DareTies).then_some(opts.seed),
        tensors_merged: tally.merged,
        parameters_merged: tally.parameters,
        tensors_equal: tally.equal,
        tensors_not_float: tally.not_float,
        identity_weight_correlation: tally
            .kinship
            .iter()
            .enumerate()
            .map(|(i, k)| {
                if i == 0 && base.is_none() {
                    None
                } else {
                    k.value()
                }
            })
            .collect(),
        kept_fraction: (tally.nonzero > 0).then(|| tally.kept as f64 / tally.nonzero as f64),
        sign_conflicts: opts
            .combine
            .elects_signs()
            .then(|| tally.conflicts as f64 / tally.parameters.max(1) as f64),
        aligned_first: false,
        repaired_layers: 0,
        reset_batch_norms: 0,
        seconds: BTreeMap::from([("merge".to_string(), clock.elapsed().as_secs_f64())]),
    };
    provenance(&mut merged, &report, models, base);
    Ok((merged, report))
}

/// The per-model weights, after checking the options against the models given.
fn check(models: &[Model], base: Option<&Model>, opts: &SameBaseOptions) -> Result<Vec<f64>> {
    let method = opts.combine.name();
    if models.len() < 2 {
        return Err(Error::Usage(format!(
            "--method {method} merges at least two models"
        )));
    }
    if opts.combine.needs_base() && base.is_none() {
        return Err(Error::Usage(format!(
            "--method {method} needs --base: the checkpoint the models were fine-tuned from"
        )));
    }
    if opts.combine == Combine::Slerp && models.len() != 2 {
        return Err(Error::Usage(format!(
            "--method slerp interpolates two models, not {}",
            models.len()
        )));
    }
    let finite = |what: &str, v: f64, ok: bool| {
        if v.is_finite() && ok {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "--{what} {v} is out of range for --method {method}"
            )))
        }
    };
    finite("lambda", opts.lambda, true)?;
    finite(
        "density",
        opts.density,
        opts.density > 0.0 && opts.density <= 1.0,
    )?;
    finite("t", opts.t, (0.0..=1.0).contains(&opts.t))?;
    let weights = match &opts.weights {
        None => vec![1.0; models.len()],
        Some(w) if w.len() != models.len() => {
            return Err(Error::Usage(format!(
                "--weights gives {} weights for {} models",
                w.len(),
                models.len()
            )))
        }
        Some(w) => w.clone(),
    };
    if weights.iter().any(|w| !w.is_finite()) {
        return Err(Error::Usage(format!(
            "--weights {weights:?}: not all finite"
        )));
    }
    match opts.combine {
        Combine::Linear => {
            let sum: f64 = weights.iter().sum();
            if sum <= 0.0 {
                return Err(Error::Usage(format!(
                    "--weights {weights:?} sum to {sum}: a weighted average needs a positive sum"
                )));
            }
            Ok(weights.iter().map(|w| w / sum).collect())
        }
        Combine::Slerp if opts.weights.is_some() => Err(Error::Usage(
            "--method slerp takes --t, not --weights".into(),
        )),
        _ => Ok(weights),
    }
}

/// Running totals over the tensors, for the report.
struct Tally {
    merged: usize,
    parameters: usize,
    equal: usize,
    not_float: usize,
    /// Per model (its identity-matching correlation with the base, or with model 0).
    kinship: Vec<Kinship>,
    /// Task-vector entries nonzero before and after TIES's trim or DARE's drop.
    nonzero: usize,
    kept: usize,
    conflicts: usize,
}

impl Tally {
    fn new(models: usize) -> Tally {
        Tally {
            merged: 0,
            parameters: 0,
            equal: 0,
            not_float: 0,
            kinship: vec![Kinship::default(); models],
            nonzero: 0,
            kept: 0,
            conflicts: 0,
        }
    }
}

/// One tensor's merge. `flat` holds the models' values, then the base's when `has_base`.
fn combine_tensor(
    name: &str,
    flat: &[Vec<f64>],
    has_base: bool,
    weights: &[f64],
    opts: &SameBaseOptions,
    tally: &mut Tally,
) -> Vec<f64> {
    let n_models = weights.len();
    let (models, base) = flat.split_at(n_models);
    let base = base.first().filter(|_| has_base);
    for (i, m) in models.iter().enumerate() {
        tally.kinship[i].add(m, base.unwrap_or(&models[0]));
    }
    let len = models[0].len();
    let mut out = vec![0.0; len];
    if opts.combine == Combine::Linear {
        for (m, w) in models.iter().zip(weights) {
            for (o, x) in out.iter_mut().zip(m) {
                *o += w * x;
            }
        }
        return out;
    }
    // Task vectors; entries equal to the base's are exactly 0 (no rounding of θ − θ).
    let taus: Vec<Vec<f64>> = match base {
        Some(b) => models
            .iter()
            .map(|m| {
                m.iter()
                    .zip(b)
                    .map(|(x, y)| if x == y { 0.0 } else { x - y })
                    .collect()
            })
            .collect(),
        None => models.to_vec(),
    };
    if opts.combine == Combine::Slerp {
        slerp::slerp(&taus[0], &taus[1], opts.t, &mut out);
        if let Some(b) = base {
            for (o, y) in out.iter_mut().zip(b) {
                *o += y;
            }
        }
        return out;
    }
    let mut taus = taus;
    for (i, tau) in taus.iter_mut().enumerate() {
        let before = tau.iter().filter(|v| **v != 0.0).count();
        let kept = match opts.combine {
            Combine::Ties => ties::trim(tau, opts.density),
            Combine::DareLinear | Combine::DareTies => {
                dare::drop_and_rescale(tau, opts.density, dare::key(opts.seed, i, name))
            }
            _ => before,
        };
        tally.nonzero += before;
        tally.kept += kept;
    }
    if opts.combine.elects_signs() {
        tally.conflicts += ties::elect_and_mean(&taus, weights, &mut out).conflicts;
    } else {
        for (tau, w) in taus.iter().zip(weights) {
            for (o, x) in out.iter_mut().zip(tau) {
                *o += w * x;
            }
        }
    }
    let base = base.expect("methods other than linear and slerp are checked to have a base");
    for (o, y) in out.iter_mut().zip(base) {
        *o = y + opts.lambda * *o;
    }
    out
}

/// A float initializer's shape and values in f64, in row-major order.
fn float_values(t: &TensorProto) -> Result<(Vec<usize>, Vec<f64>)> {
    let data = TensorData::from_proto(t)?;
    let shape = data.shape().to_vec();
    let values = crate::merge::float_array(&data)
        .map(|a| a.iter().copied().collect())
        .ok_or_else(|| Error::tensor(t.name.clone().unwrap_or_default(), "not a float tensor"))?;
    Ok((shape, values))
}

/// Bitwise equality (NaN equals itself, −0 differs from +0: only an exact copy counts).
fn same_bits(a: &[f64], b: &[f64]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The method, its parameters and the inputs, in the merged model's metadata.
fn provenance(model: &mut Model, report: &SameBaseReport, inputs: &[Model], base: Option<&Model>) {
    use crate::merge::provenance_name;
    let mut entries = vec![
        ("mudsc.method", report.method.name().to_string()),
        (
            "mudsc.models",
            inputs
                .iter()
                .map(provenance_name)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        ("mudsc.weights", format!("{:?}", report.weights)),
        ("mudsc.version", env!("CARGO_PKG_VERSION").to_string()),
    ];
    if let Some(b) = base {
        entries.push(("mudsc.base", provenance_name(b)));
    }
    for (k, v) in [
        ("mudsc.lambda", report.lambda),
        ("mudsc.density", report.density),
        ("mudsc.t", report.t),
    ] {
        if let Some(v) = v {
            entries.push((k, v.to_string()));
        }
    }
    if let Some(s) = report.seed {
        entries.push(("mudsc.seed", s.to_string()));
    }
    crate::merge::stamp_provenance(model, entries);
}
