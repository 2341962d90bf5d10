//! Calibration: run every model on the calibration data with the groups' taps as extra
//! outputs, and stream each group's moments over the concatenated units of all models
//! (model-major: model 0's units first). Every non-unit element of a tap is a sample.

use std::collections::HashMap;

use ndarray::{Array2, ArrayD, Axis};

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
            let mut columns = Vec::with_capacity(n);
            for (i, outs) in per_model.iter().enumerate() {
                let v = outs.get(&t.names[i]).ok_or_else(|| Error::Backend {
                    backend: backend.name(),
                    reason: format!("tap '{}' missing from the outputs", t.names[i]),
                })?;
                columns.push(units_as_columns(&v.to_f32(), t.axis, t.width, &t.names[i])?);
            }
            let views: Vec<_> = columns.iter().map(|c| c.view()).collect();
            let x = ndarray::concatenate(Axis(1), &views)
                .map_err(|e| Error::tensor(&t.names[0], e.to_string()))?;
            if let Some(m) = moments.get_mut(&t.group) {
                m.add(x.view());
            }
        }
        progress(end, total);
        start = end;
    }
    Ok(moments)
}

/// `[samples, width]`: the unit axis last, every other axis flattened into samples.
fn units_as_columns(v: &ArrayD<f32>, axis: usize, width: usize, name: &str) -> Result<Array2<f32>> {
    if v.shape().get(axis) != Some(&width) {
        return Err(Error::tensor(
            name,
            format!(
                "tap has shape {:?}, expected {width} units on axis {axis}",
                v.shape()
            ),
        ));
    }
    let rank = v.ndim();
    let order: Vec<usize> = (0..rank).filter(|&a| a != axis).chain([axis]).collect();
    let moved = v.view().permuted_axes(order);
    let samples = v.len() / width.max(1);
    moved
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((samples, width))
        .map_err(|e| Error::tensor(name, e.to_string()))
}
