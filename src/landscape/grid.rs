//! Evaluating the loss at many points of the plane, in parallel.
//!
//! Every point is a different model (new initializer values), so every point gets its own
//! session; what runs in parallel is points, one worker thread per core pulling the next point
//! from a shared counter (rows would leave a core idle when the grid has fewer rows than the
//! last row takes). Within a point the data runs in batches, one engine thread per worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use ndarray::Ix2;

use super::loss::{cross_entropy, LossSpec};
use super::params::ParamSpace;
use super::plane::Plane;
use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, run_batched, BackendKind, BackendOptions};

/// How to run the models.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub backend: BackendKind,
    pub backend_options: BackendOptions,
    pub batch: usize,
    /// Worker threads (0 = one per available core).
    pub threads: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            backend: BackendKind::Tract,
            backend_options: BackendOptions::default(),
            batch: 256,
            threads: 0,
        }
    }
}

/// The labelled data the losses are measured on.
pub struct Data<'a> {
    pub inputs: &'a [TensorData],
    pub labels: &'a [i64],
    pub spec: &'a LossSpec,
}

/// Width of `model`'s first output (its classes), from a run on the first sample.
pub fn output_width(model: &Model, inputs: &[TensorData], opts: &EvalOptions) -> Result<usize> {
    let mut session = open_session(opts.backend, model, &[], &opts.backend_options)?;
    let one: Vec<TensorData> = inputs.iter().map(|t| t.slice_rows(0, 1)).collect();
    let outputs = session.run(&one)?;
    match outputs.first().map(|t| t.shape().to_vec()) {
        Some(s) if s.len() == 2 => Ok(s[1]),
        other => Err(Error::tensor(
            session.output_names().first().cloned().unwrap_or_default(),
            format!(
                "has shape {:?}; the landscape needs logits [samples, classes]",
                other.unwrap_or_default()
            ),
        )),
    }
}

/// Losses (per task, then joint) of one model on the data.
pub fn model_losses(model: &Model, data: &Data, opts: &EvalOptions) -> Result<Vec<f64>> {
    let mut session = open_session(opts.backend, model, &[], &opts.backend_options)?;
    let outputs = run_batched(session.as_mut(), data.inputs, opts.batch)?;
    let name = session.output_names().first().cloned().unwrap_or_default();
    let Some(first) = outputs.first() else {
        return Err(Error::Usage(format!(
            "{} has no outputs",
            model.display_name()
        )));
    };
    let logits = first.to_f32().into_dimensionality::<Ix2>().map_err(|_| {
        Error::tensor(
            &name,
            format!(
                "has shape {:?}; the landscape needs logits [samples, classes]",
                first.shape()
            ),
        )
    })?;
    cross_entropy(logits.view(), data.labels, data.spec)
}

/// Losses at each of `points` (plane coordinates), in order. `progress` is called once per
/// finished point, from the worker threads. The first error stops the other workers.
pub fn evaluate(
    space: &ParamSpace,
    plane: &Plane,
    points: &[(f64, f64)],
    data: &Data,
    opts: &EvalOptions,
    progress: &(dyn Fn() + Sync),
) -> Result<Vec<Vec<f64>>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = match opts.threads {
        0 => cores,
        t => t,
    }
    .clamp(1, points.len().max(1));
    let mut opts = opts.clone();
    if workers > 1 && opts.backend_options.threads == 0 {
        // One engine thread per worker: the parallelism is across points.
        opts.backend_options.threads = 1;
    }
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<Vec<f64>>>> = Mutex::new(vec![None; points.len()]);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let work = || loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(x, y)) = points.get(i) else {
            return;
        };
        let losses = space
            .model_at(&plane.theta_at(x, y))
            .and_then(|m| model_losses(&m, data, &opts));
        match losses {
            Ok(l) => {
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(l);
                }
                progress();
            }
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                if let Ok(mut slot) = first_error.lock() {
                    slot.get_or_insert(e);
                }
                return;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..workers {
            s.spawn(work);
        }
        work();
    });
    if let Some(e) = first_error.into_inner().ok().flatten() {
        return Err(e);
    }
    let results = results
        .into_inner()
        .map_err(|_| Error::Usage("a landscape worker panicked".into()))?;
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.ok_or_else(|| Error::Usage(format!("grid point {i} was not evaluated"))))
        .collect()
}
