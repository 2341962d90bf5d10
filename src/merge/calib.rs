//! Calibration: run every model on the calibration data with the groups' taps as extra
//! outputs, and stream each group's moments over the concatenated units of all models
//! (model-major: model 0's units first). Every non-unit element of a tap is a sample.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, BackendKind, BackendOptions};
use crate::stats::Moments;

/// Where a group is read in each model.
pub struct Tap {
    pub group: usize,
    /// The tap value's name in each model.
    pub names: Vec<String>,
    pub axis: usize,
    pub width: usize,
    /// Tap positions kept per calibration sample (0: all).
    pub positions: usize,
}

/// Moments per group id, and the number of calibration samples (inputs) used.
pub fn collect(
    models: &[Model],
    taps: &[Tap],
    inputs: &[TensorData],
    batch: usize,
    backend: BackendKind,
    options: &BackendOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<HashMap<usize, Moments>> {
    let n = models.len();
    let mut moments: HashMap<usize, Moments> = taps
        .iter()
        .map(|t| (t.group, Moments::new(n * t.width)))
        .collect();
    let mut sessions = Vec::new();
    for (i, m) in models.iter().enumerate() {
        let extra: Vec<String> = taps.iter().map(|t| t.names[i].clone()).collect();
        sessions.push(open_session(backend, m, &extra, options)?);
    }
    let total = crate::data::sample_count(inputs);
    let mut start = 0;
    while start < total {
        let end = (start + batch.max(1)).min(total);
        let slice: Vec<TensorData> = inputs.iter().map(|t| t.slice_rows(start, end)).collect();
        let mut per_model: Vec<HashMap<String, TensorData>> = Vec::new();
        for s in sessions.iter_mut() {
            let out = s.run(&slice)?;
            per_model.push(s.output_names().iter().cloned().zip(out).collect());
        }
        for t in taps {
            let mut values = Vec::with_capacity(n);
            for (i, outs) in per_model.iter().enumerate() {
                values.push(outs.get(&t.names[i]).ok_or_else(|| Error::Backend {
                    backend: backend.name(),
                    reason: format!("tap '{}' missing from the outputs", t.names[i]),
                })?);
            }
            if let Some(m) = moments.get_mut(&t.group) {
                super::taps::add_joint(m, &values, t.axis, t.width, &t.names, t.positions)?;
            }
        }
        progress(end, total);
        start = end;
    }
    Ok(moments)
}
