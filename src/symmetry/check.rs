//! The proof of discovery on a concrete model: permute every group at random (respecting
//! blocks), rewrite the weights, run both models, compare. A wrong group shows up as a
//! difference; a missing group does not (it only costs merge quality).

use serde::Serialize;

use super::permute::{random_assignment, Assignment};
use super::Discovery;
use crate::error::Result;
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched, BackendKind, BackendOptions};

/// Tolerance of "the same outputs": rtol 1e-4, atol 1e-5 (onnxsim's check).
pub const RTOL: f32 = 1e-4;
pub const ATOL: f32 = 1e-5;

#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub seed: u64,
    pub max_abs_diff: f32,
    pub max_rel_diff: f32,
    /// Every element within `ATOL + RTOL·|reference|`.
    pub passed: bool,
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
    let mut reference = open_session(backend, model, &[], options)?;
    let want = run_batched(reference.as_mut(), inputs, 64)?;
    let leaves = d.leaves();
    let mut results = Vec::new();
    for t in 0..trials {
        let trial_seed = seed.wrapping_add(t as u64);
        let assignment = random_assignment(&d.structure, &leaves, trial_seed);
        let permuted = permuted_model(model, d, &assignment)?;
        let mut s = open_session(backend, &permuted, &[], options)?;
        let got = run_batched(s.as_mut(), inputs, 64)?;
        let (mut max_abs, mut max_rel, mut passed) = (0f32, 0f32, true);
        for (a, b) in got.iter().zip(&want) {
            let (a, b) = (a.to_f32(), b.to_f32());
            for (x, y) in a.iter().zip(b.iter()) {
                if x.is_nan() && y.is_nan() {
                    continue;
                }
                let diff = (x - y).abs();
                max_abs = max_abs.max(diff);
                max_rel = max_rel.max(diff / y.abs().max(1e-12));
                if diff.is_nan() || diff > ATOL + RTOL * y.abs() {
                    passed = false;
                }
            }
        }
        results.push(Trial {
            seed: trial_seed,
            max_abs_diff: max_abs,
            max_rel_diff: max_rel,
            passed,
        });
    }
    Ok(results)
}
