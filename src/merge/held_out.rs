//! Scoring merges on held-out calibration data, for the choices a user would otherwise tune by
//! hand (`--alpha auto`, `--zip-until auto`): each candidate is merged on the first four fifths
//! of the calibration data and scored on the last fifth, by accuracy when labels are given,
//! else by how often the merged model's top-1 agrees with each endpoint's (averaged over the
//! endpoints), an unsupervised stand-in for "keeps what each model knew".

use super::{merge, MergeOptions, MergeReport};
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched};

pub struct HeldOut<'a> {
    models: &'a [Model],
    fit: Vec<TensorData>,
    test: Vec<TensorData>,
    /// Labels of the held-out samples, or the endpoints' top-1 on them.
    labels: Option<Vec<i64>>,
    endpoints: Vec<Vec<usize>>,
    pub held_out: usize,
}

impl<'a> HeldOut<'a> {
    /// Splits `calib` (and `labels`) and runs the endpoints on the held-out part.
    pub fn new(
        models: &'a [Model],
        calib: &[TensorData],
        labels: Option<&[i64]>,
        opts: &MergeOptions,
        what: &str,
    ) -> Result<HeldOut<'a>> {
        let n = crate::data::sample_count(calib);
        if n < 10 {
            return Err(Error::Usage(format!(
                "{what} needs at least 10 calibration samples, got {n}"
            )));
        }
        let held = (n / 5).max(1);
        let split = n - held;
        let mut h = HeldOut {
            models,
            fit: calib.iter().map(|t| t.slice_rows(0, split)).collect(),
            test: calib.iter().map(|t| t.slice_rows(split, n)).collect(),
            labels: labels.map(|l| l[split.min(l.len())..].to_vec()),
            endpoints: Vec::new(),
            held_out: held,
        };
        if h.labels.is_none() {
            h.endpoints = models
                .iter()
                .map(|m| h.top1(m, opts))
                .collect::<Result<_>>()?;
        }
        Ok(h)
    }

    pub fn criterion(&self) -> &'static str {
        if self.labels.is_some() {
            "accuracy"
        } else {
            "agreement"
        }
    }

    /// Merges on the fit part with `opts` and scores the merge on the held-out part.
    pub fn score(&self, opts: &MergeOptions) -> Result<(f64, MergeReport)> {
        let (merged, report) = merge(self.models, &self.fit, opts, &mut |_, _, _| {})?;
        let pred = self.top1(&merged, opts)?;
        let agree = |want: &mut dyn Iterator<Item = bool>| {
            let (hit, all) = want.fold((0, 0), |(h, a), ok| (h + usize::from(ok), a + 1));
            hit as f64 / all.max(1) as f64
        };
        let score = match &self.labels {
            Some(l) => agree(&mut pred.iter().zip(l).map(|(p, y)| *p as i64 == *y)),
            None => {
                self.endpoints
                    .iter()
                    .map(|e| agree(&mut pred.iter().zip(e).map(|(p, q)| p == q)))
                    .sum::<f64>()
                    / self.endpoints.len() as f64
            }
        };
        Ok((score, report))
    }

    /// Top-1 class per held-out sample. A partially zipped model has one head per model
    /// (outputs shaped like the first): they are summed, as `eval` does.
    fn top1(&self, m: &Model, opts: &MergeOptions) -> Result<Vec<usize>> {
        let mut s = open_session(opts.backend, m, &[], &opts.backend_options)?;
        let out = run_batched(s.as_mut(), &self.test, 64)?;
        let mut logits = out[0].to_f32();
        for o in &out[1..] {
            let o = o.to_f32();
            if o.shape() == logits.shape() {
                logits = logits + o;
            }
        }
        let classes = *logits.shape().last().unwrap_or(&1);
        let logits = logits.as_standard_layout().into_owned();
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
    }
}
