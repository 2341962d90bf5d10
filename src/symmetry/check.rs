//! The proof of discovery on a concrete model: permute every group at random (respecting
//! blocks), rewrite the weights, run both models, compare. A wrong group shows up as a
//! difference; a missing group does not (it only costs merge quality).

use serde::Serialize;

use super::permute::{random_assignment, Assignment};
use super::Discovery;
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched, BackendKind, BackendOptions};

/// The floor of the tolerance: rtol 1e-4 of the output's scale, atol 1e-5 (onnxsim's check).
/// On deep models float32 rounding alone exceeds a fixed atol, so the verdict's tolerance also
/// grows with the measured noise floor (see [`CheckReport`]).
pub const RTOL: f32 = 1e-4;
pub const ATOL: f32 = 1e-5;
/// How many times the float32 noise floor a permuted model may differ by.
pub const NOISE_FACTOR: f32 = 10.0;
/// A negative control must differ by at least this many tolerances for the check to tell a
/// wrong permutation from rounding.
pub const CONTROL_MARGIN: f32 = 100.0;

#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub seed: u64,
    pub max_abs_diff: f32,
    pub max_rel_diff: f32,
    /// Largest difference in units of its output's tolerance (≤ 1 passes).
    pub ratio: f32,
    /// Every element within its output's tolerance.
    pub passed: bool,
}

/// What a deliberately wrong permutation does: every group permuted, but one member tensor
/// left as it was, which breaks its group's coupling.
#[derive(Clone, Debug, Serialize)]
pub struct Control {
    pub tensor: String,
    pub max_abs_diff: f32,
    /// In units of the tolerance: it must be ≥ [`CONTROL_MARGIN`].
    pub ratio: f32,
}

/// The verdict and the numbers it rests on.
#[derive(Clone, Debug, Serialize)]
pub struct CheckReport {
    pub trials: Vec<Trial>,
    /// Largest |output| (all outputs).
    pub scale: f32,
    /// Float32 noise of the original model: the larger of the difference between two runs in
    /// different batchings (different summation orders) and ε·scale·√nodes.
    pub noise_floor: f32,
    /// max(ATOL, RTOL·scale, NOISE_FACTOR·noise floor), per output (largest shown).
    pub tolerance: f32,
    pub control: Option<Control>,
}

/// The format tag of `mudsc check --json`.
pub const FORMAT: &str = "mudsc-check/1";

/// The machine-readable verdict (`mudsc check --json`, `mudsc.check()` in Python): what CI
/// gates on, with every number the verdict rests on and the constants of the tolerance rule.
#[derive(Clone, Debug, Serialize)]
pub struct CheckDocument {
    pub format: &'static str,
    pub model: String,
    /// `pass`, `fail` (a trial beyond the tolerance: exit 1), or `inconclusive` (every trial
    /// passed but the negative control stayed under [`CONTROL_MARGIN`] tolerances: exit 0
    /// with a warning).
    pub verdict: &'static str,
    pub passed: bool,
    pub discriminates: bool,
    pub groups: usize,
    pub atol: f32,
    pub rtol: f32,
    pub noise_factor: f32,
    pub control_margin: f32,
    #[serde(flatten)]
    pub report: CheckReport,
}

impl CheckReport {
    /// The document for `model` (as the user named it) with `groups` groups permuted.
    pub fn document(self, model: &str, groups: usize) -> CheckDocument {
        let verdict = match (self.passed(), self.discriminates()) {
            (false, _) => "fail",
            (true, false) => "inconclusive",
            (true, true) => "pass",
        };
        CheckDocument {
            format: FORMAT,
            model: model.to_string(),
            verdict,
            passed: self.passed(),
            discriminates: self.discriminates(),
            groups,
            atol: ATOL,
            rtol: RTOL,
            noise_factor: NOISE_FACTOR,
            control_margin: CONTROL_MARGIN,
            report: self,
        }
    }

    pub fn passed(&self) -> bool {
        self.trials.iter().all(|t| t.passed)
    }

    /// Whether the negative control shows that a wrong permutation would have been seen.
    pub fn discriminates(&self) -> bool {
        self.control
            .as_ref()
            .is_none_or(|c| c.ratio >= CONTROL_MARGIN)
    }
}

/// `model` with every initializer moved by `assignment`.
pub fn permuted_model(model: &Model, d: &Discovery, assignment: &Assignment) -> Result<Model> {
    let mut out = model.clone();
    if let Some(graph) = out.proto.graph.as_mut() {
        for t in &mut graph.initializer {
            let name = t.name.clone().unwrap_or_default();
            let Some(axes) = d.slots.of(&name) else {
                continue;
            };
            if !d.structure.touches(axes, assignment) {
                continue;
            }
            let data = TensorData::from_proto(t)?;
            let moved = d.structure.permute(axes, &data, assignment);
            t.raw_data = Some(moved.to_raw_bytes().into());
            t.float_data.clear();
            t.double_data.clear();
            t.int32_data.clear();
        }
    }
    Ok(out)
}

/// Runs `trials` random permutations of all groups and compares outputs with the original.
pub fn check(
    model: &Model,
    d: &Discovery,
    inputs: &[TensorData],
    trials: usize,
    seed: u64,
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<Vec<Trial>> {
    Ok(check_report(model, d, inputs, trials, seed, backend, options)?.trials)
}

/// [`check`] with its tolerance, noise floor and negative control.
pub fn check_report(
    model: &Model,
    d: &Discovery,
    inputs: &[TensorData],
    trials: usize,
    seed: u64,
    backend: BackendKind,
    options: &BackendOptions,
) -> Result<CheckReport> {
    if trials == 0 {
        return Err(Error::Usage(
            "--trials must be at least 1: no trial proves nothing".into(),
        ));
    }
    let mut reference = open_session(backend, model, &[], options)?;
    let want = run_batched(reference.as_mut(), inputs, 64)?;
    // The same model in another batching: per-sample results in another summation order.
    let head: Vec<TensorData> = inputs
        .iter()
        .map(|t| t.slice_rows(0, t.shape()[0].min(8)))
        .collect();
    let again = run_batched(reference.as_mut(), &head, 3)?;
    let nodes = model.graph().node.len().max(1) as f32;
    let mut tolerances = Vec::new();
    let (mut scale_all, mut noise_all) = (0f32, 0f32);
    for (w, a) in want.iter().zip(&again) {
        let w = w.to_f32();
        let scale = w
            .iter()
            .filter(|v| v.is_finite())
            .fold(0f32, |m, v| m.max(v.abs()));
        let a = a.to_f32();
        let measured = w
            .iter()
            .zip(a.iter())
            .map(|(x, y)| (x - y).abs())
            .filter(|v| v.is_finite())
            .fold(0f32, f32::max);
        let noise = measured.max(f32::EPSILON * scale * nodes.sqrt());
        tolerances.push(ATOL.max(RTOL * scale).max(NOISE_FACTOR * noise));
        scale_all = scale_all.max(scale);
        noise_all = noise_all.max(noise);
    }
    let compare = |got: &[TensorData]| {
        let (mut max_abs, mut max_rel, mut ratio) = (0f32, 0f32, 0f32);
        for ((a, b), tol) in got.iter().zip(&want).zip(&tolerances) {
            let (a, b) = (a.to_f32(), b.to_f32());
            for (x, y) in a.iter().zip(b.iter()) {
                if x.is_nan() && y.is_nan() {
                    continue;
                }
                let diff = (x - y).abs();
                if diff.is_nan() {
                    ratio = f32::INFINITY;
                    continue;
                }
                max_abs = max_abs.max(diff);
                max_rel = max_rel.max(diff / y.abs().max(1e-12));
                ratio = ratio.max(diff / (tol + RTOL * y.abs()));
            }
        }
        (max_abs, max_rel, ratio)
    };
    let leaves = d.leaves();
    let mut results = Vec::new();
    for t in 0..trials {
        let trial_seed = seed.wrapping_add(t as u64);
        let assignment = random_assignment(&d.structure, &leaves, trial_seed);
        let permuted = permuted_model(model, d, &assignment)?;
        let mut s = open_session(backend, &permuted, &[], options)?;
        let got = run_batched(s.as_mut(), inputs, 64)?;
        let (max_abs, max_rel, ratio) = compare(&got);
        results.push(Trial {
            seed: trial_seed,
            max_abs_diff: max_abs,
            max_rel_diff: max_rel,
            ratio,
            passed: ratio <= 1.0,
        });
    }
    // Negative control: the first trial's permutation with its largest moved tensor put back.
    let assignment = random_assignment(&d.structure, &leaves, seed);
    let permuted = permuted_model(model, d, &assignment)?;
    let moved = model
        .graph()
        .initializer
        .iter()
        .zip(&permuted.graph().initializer)
        .filter(|(a, b)| a.raw_data != b.raw_data)
        .max_by_key(|(a, _)| a.dims.iter().product::<i64>());
    let control = match moved {
        Some((original, _)) => {
            let name = original.name.clone().unwrap_or_default();
            let mut broken = permuted.clone();
            if let Some(g) = broken.proto.graph.as_mut() {
                for t in &mut g.initializer {
                    if t.name.as_deref() == Some(name.as_str()) {
                        *t = original.clone();
                    }
                }
            }
            let mut s = open_session(backend, &broken, &[], options)?;
            let got = run_batched(s.as_mut(), inputs, 64)?;
            let (max_abs, _, ratio) = compare(&got);
            Some(Control {
                tensor: name,
                max_abs_diff: max_abs,
                ratio,
            })
        }
        None => None,
    };
    Ok(CheckReport {
        trials: results,
        scale: scale_all,
        noise_floor: noise_all,
        tolerance: tolerances.iter().copied().fold(0f32, f32::max),
        control,
    })
}
