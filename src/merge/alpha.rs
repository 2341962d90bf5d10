//! Choosing α (the weight-space share of the dual similarity) on held-out calibration data.
//! The paper picked α by hand per setting, and the best value differs by architecture (0.3 for
//! a BN ResNet, 0.7 for an MLP in the reference's Fashion-MNIST runs). Each α on a grid is
//! merged on the first part of the calibration data and scored on the rest: by accuracy when
//! labels are given, else by how often the merged model's top-1 agrees with each endpoint's
//! (averaged over endpoints), an unsupervised stand-in for "keeps what each model knew".

use serde::Serialize;

use super::{merge, MergeOptions};
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched};

#[derive(Clone, Debug, Serialize)]
pub struct AlphaPoint {
    pub alpha: f64,
    pub score: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AlphaChoice {
    pub alpha: f64,
    /// "accuracy" or "agreement".
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
    let n = crate::data::sample_count(calib);
    let held = (n / 5).max(1);
    if n < 10 {
        return Err(Error::Usage(format!(
            "--alpha auto needs at least 10 calibration samples, got {n}"
        )));
    }
    let split = n - held;
    let fit: Vec<TensorData> = calib.iter().map(|t| t.slice_rows(0, split)).collect();
    let test: Vec<TensorData> = calib.iter().map(|t| t.slice_rows(split, n)).collect();
    let top1 = |m: &Model| -> Result<Vec<usize>> {
        let mut s = open_session(opts.backend, m, &[], &opts.backend_options)?;
        let out = run_batched(s.as_mut(), &test, 64)?;
        let logits = out[0].to_f32();
        let classes = *logits.shape().last().unwrap_or(&1);
        Ok(logits
            .as_slice()
            .unwrap_or(&[])
            .chunks(classes.max(1))
            .map(|row| {
                row.iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0
            })
            .collect())
    };
    let endpoints: Vec<Vec<usize>> = match labels {
        Some(_) => vec![],
        None => models.iter().map(top1).collect::<Result<_>>()?,
    };
    let mut curve = Vec::new();
    for &alpha in grid {
        let (merged, _) = merge(
            models,
            &fit,
            &MergeOptions {
                alpha,
                ..opts.clone()
            },
            &mut |_, _, _| {},
        )?;
        let pred = top1(&merged)?;
        let score = match labels {
            Some(l) => {
                let l = &l[split..];
                pred.iter()
                    .zip(l)
                    .filter(|(p, y)| **p as i64 == **y)
                    .count() as f64
                    / l.len() as f64
            }
            None => {
                endpoints
                    .iter()
                    .map(|e| {
                        pred.iter().zip(e).filter(|(p, q)| p == q).count() as f64 / e.len() as f64
                    })
                    .sum::<f64>()
                    / endpoints.len() as f64
            }
        };
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
        criterion: if labels.is_some() {
            "accuracy"
        } else {
            "agreement"
        }
        .into(),
        curve,
        held_out: held,
    })
}
