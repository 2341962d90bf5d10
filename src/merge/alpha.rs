//! Choosing α (the weight-space share of the dual similarity) on held-out calibration data.
//! The paper picked α by hand per setting, and the best value differs by architecture (0.3 for
//! a BN ResNet, 0.7 for an MLP in the reference's Fashion-MNIST runs). Each α on a grid is
//! merged and scored as `held_out` does.

use serde::Serialize;

use super::held_out::HeldOut;
use super::MergeOptions;
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};

#[derive(Clone, Debug, Serialize)]
pub struct AlphaPoint {
    pub alpha: f64,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AlphaChoice {
    pub alpha: f64,
    /// What the score is (`HeldOut::criterion`): a log-likelihood of the labels or of the
    /// endpoints' ensemble.
    pub criterion: String,
    pub curve: Vec<AlphaPoint>,
    pub held_out: usize,
}

/// Scores every α of `grid` and returns the best (ties go to the smaller α).
pub fn choose_alpha(
    models: &[Model],
    calib: &[TensorData],
    labels: Option<&[i64]>,
    opts: &MergeOptions,
    grid: &[f64],
) -> Result<AlphaChoice> {
    let held = HeldOut::new(models, calib, labels, opts, "--alpha auto")?;
    let mut curve = Vec::new();
    for &alpha in grid {
        let (score, _) = held.score(&MergeOptions {
            alpha,
            ..opts.clone()
        })?;
        curve.push(AlphaPoint { alpha, score });
    }
    let best = curve
        .iter()
        .fold(None::<&AlphaPoint>, |b, p| match b {
            Some(b) if b.score >= p.score => Some(b),
            _ => Some(p),
        })
        .ok_or_else(|| Error::Usage("empty α grid".into()))?;
    Ok(AlphaChoice {
        alpha: best.alpha,
        criterion: held.criterion().into(),
        curve,
        held_out: held.held_out,
    })
}
