//! Inference backends behind one small interface: run a model on a batch and get its outputs
//! plus any named intermediate tensors ("taps", the calibration read points).
//!
//! tract is embedded and always available; ONNX Runtime is an optional feature, loaded from a
//! shared library at run time so that a missing library is an error, never a link failure.

#[cfg(feature = "ort")]
pub mod ort;
#[cfg(feature = "ort")]
pub mod ort_library;
pub mod output;
pub(crate) mod prune;
pub mod tract;

pub use output::Output;

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::onnx::{Model, TensorData};

/// Which engine runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// ONNX Runtime where its library is found, else tract (said once on stderr): ONNX Runtime
    /// runs the calibration passes of convolutional models 7–30× faster than tract.
    #[default]
    Auto,
    Tract,
    Ort,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Tract => "tract",
            BackendKind::Ort => "ort",
        }
    }

    /// The engine that will run: `Auto` resolved against the library `options` point to.
    pub fn resolve(self, options: &BackendOptions) -> BackendKind {
        match self {
            BackendKind::Auto => match ort_library_found(options) {
                Ok(()) => BackendKind::Ort,
                Err(why) => {
                    warn_once(&format!(
                        "{why}: running on tract, the embedded engine (slower; \
                         pip install onnxruntime, scripts/fetch-onnxruntime.sh, ORT_DYLIB_PATH or \
                         --ort-lib give ONNX Runtime)"
                    ));
                    BackendKind::Tract
                }
            },
            other => other,
        }
    }
}

/// Whether an ONNX Runtime library can be loaded, and if not, why.
#[cfg(feature = "ort")]
fn ort_library_found(options: &BackendOptions) -> std::result::Result<(), String> {
    let path = ort::library_path(options);
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("no ONNX Runtime library at '{}'", path.display()))
    }
}

#[cfg(not(feature = "ort"))]
fn ort_library_found(_: &BackendOptions) -> std::result::Result<(), String> {
    Err("this build of mudsc has no ONNX Runtime backend".into())
}

/// Settings shared by the backends.
#[derive(Clone, Debug, Default)]
pub struct BackendOptions {
    /// Path of `libonnxruntime.so` (ort backend); else `ORT_DYLIB_PATH`, else the library of an
    /// installed `onnxruntime` Python package, else the copy that `scripts/fetch-onnxruntime.sh`
    /// puts under `third_party/` (see [`ort_library`]).
    pub ort_library: Option<PathBuf>,
    /// Intra-op threads (0 = the backend's default).
    pub threads: usize,
    /// Where the model runs. Only ONNX Runtime can use a GPU; where it cannot, models run on
    /// the CPU after a warning on stderr (a merge should not fail for want of a GPU).
    pub device: Device,
}

/// Compute device for inference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// A CUDA GPU by index (ONNX Runtime's CUDA execution provider).
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Device> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| Error::Usage(format!("device '{s}': use cpu, cuda or cuda:N"))),
        }
    }
}

/// Prints `message` on stderr once per process (device fallbacks would repeat per session).
/// GPUs on which ONNX Runtime's CUDA execution provider started for some session, so that the
/// report names the device that actually ran (a failed start falls back to the CPU with only
/// a warning).
static CUDA_DEVICES: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());

#[cfg_attr(not(feature = "ort"), allow(dead_code))]
pub(crate) fn note_cuda_device(id: i32) {
    if let Ok(mut ids) = CUDA_DEVICES.lock() {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
}

/// The engine's name for reports: the backend, with the CUDA devices it ran on if any
/// (`ort`, `ort on cuda:0`, `tract`).
pub fn engine_name(kind: BackendKind) -> String {
    let ids = CUDA_DEVICES
        .lock()
        .map(|ids| ids.clone())
        .unwrap_or_default();
    if ids.is_empty() {
        return kind.name().to_string();
    }
    let devices: Vec<String> = ids.iter().map(|id| format!("cuda:{id}")).collect();
    format!("{} on {}", kind.name(), devices.join(", "))
}

pub(crate) fn warn_once(message: &str) {
    static SAID: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if let Ok(mut said) = SAID.lock() {
        if !said.iter().any(|m| m == message) {
            eprintln!("warning: {message}");
            said.push(message.to_string());
        }
    }
}

/// A model prepared for repeated runs.
pub trait Session: Send {
    /// Graph inputs, in the order `run` expects them.
    fn input_names(&self) -> &[String];
    /// The graph outputs followed by the requested extra outputs, in the order `run` returns.
    fn output_names(&self) -> &[String];
    /// Runs one batch.
    fn run(&mut self, inputs: &[TensorData]) -> Result<Vec<TensorData>>;
    /// `run`, its outputs read where the engine left them when it lends them (`Output`): for
    /// outputs read once and dropped with the batch.
    fn run_lent(&mut self, inputs: &[TensorData]) -> Result<Vec<Output>> {
        Ok(self.run(inputs)?.into_iter().map(Output::Tensor).collect())
    }
}

/// Prepares `model` on the chosen backend, with `extra_outputs` (names of intermediate values)
/// returned after the graph outputs.
pub fn open_session(
    kind: BackendKind,
    model: &Model,
    extra_outputs: &[String],
    options: &BackendOptions,
) -> Result<Box<dyn Session>> {
    let session: Box<dyn Session> = match kind.resolve(options) {
        BackendKind::Tract | BackendKind::Auto => {
            if options.device != Device::Cpu {
                warn_once("tract runs on the CPU only (--device cuda needs --backend ort)");
            }
            Box::new(tract::TractSession::new(model, extra_outputs)?)
        }
        BackendKind::Ort => open_ort(model, extra_outputs, options)?,
    };
    // Both engines copy the weights they were given: the model's mapped pages, every one of
    // which opening it read, need not stay resident beside that copy.
    crate::onnx::mapped::release();
    Ok(session)
}

#[cfg(feature = "ort")]
fn open_ort(
    model: &Model,
    extra_outputs: &[String],
    options: &BackendOptions,
) -> Result<Box<dyn Session>> {
    Ok(Box::new(ort::OrtSession::new(
        model,
        extra_outputs,
        options,
    )?))
}

#[cfg(not(feature = "ort"))]
fn open_ort(_: &Model, _: &[String], _: &BackendOptions) -> Result<Box<dyn Session>> {
    Err(Error::Backend {
        backend: "ort",
        reason: "this build of mudsc has no ONNX Runtime backend (rebuild with --features ort)"
            .into(),
    })
}

/// Names of the graph inputs fed at run time, in graph order.
pub(crate) fn graph_input_names(model: &Model) -> Result<Vec<String>> {
    let graph = crate::graph::Graph::new(model)?;
    Ok(graph
        .inputs()
        .iter()
        .map(|vi| vi.name.clone().unwrap_or_default())
        .collect())
}

/// Graph output names followed by the extra outputs (duplicates dropped).
pub(crate) fn all_output_names(model: &Model, extra_outputs: &[String]) -> Vec<String> {
    let mut names: Vec<String> = model
        .graph()
        .output
        .iter()
        .map(|vi| vi.name.clone().unwrap_or_default())
        .collect();
    for extra in extra_outputs {
        if !names.contains(extra) {
            names.push(extra.clone());
        }
    }
    names
}

/// Checks that a batch matches the session's inputs in count.
pub(crate) fn check_arity(backend: &'static str, expected: &[String], got: usize) -> Result<()> {
    if expected.len() != got {
        return Err(Error::Backend {
            backend,
            reason: format!(
                "model takes {} inputs ({}), {} given",
                expected.len(),
                expected.join(", "),
                got
            ),
        });
    }
    Ok(())
}

/// Runs `inputs` through the session in batches of `batch` samples, handing `f` each batch's
/// sample count and outputs (streamed: nothing is kept between batches).
pub fn for_each_batch(
    session: &mut dyn Session,
    inputs: &[TensorData],
    batch: usize,
    mut f: impl FnMut(usize, Vec<TensorData>) -> Result<()>,
) -> Result<()> {
    let n = crate::data::sample_count(inputs);
    let mut start = 0;
    while start < n {
        let end = (start + batch.max(1)).min(n);
        let slice: Vec<TensorData> = inputs.iter().map(|t| t.slice_rows(start, end)).collect();
        f(end - start, session.run(&slice)?)?;
        start = end;
    }
    Ok(())
}

/// Runs `inputs` through the session in batches of `batch` samples and concatenates each
/// output along axis 0.
pub fn run_batched(
    session: &mut dyn Session,
    inputs: &[TensorData],
    batch: usize,
) -> Result<Vec<TensorData>> {
    // A model without inputs (all constants) runs once; it has no samples to batch.
    if inputs.is_empty() {
        return session.run(inputs);
    }
    let n = crate::data::sample_count(inputs);
    if n == 0 {
        return Err(Error::Usage(
            "the input data holds no samples (axis 0 has length 0)".into(),
        ));
    }
    let mut parts: Vec<Vec<TensorData>> = vec![Vec::new(); session.output_names().len()];
    for_each_batch(session, inputs, batch, |_, outs| {
        for (part, out) in parts.iter_mut().zip(outs) {
            part.push(out);
        }
        Ok(())
    })?;
    parts
        .into_iter()
        .zip(session.output_names())
        .map(|(p, name)| {
            TensorData::concat_rows(&p)
                .map_err(|e| Error::tensor(name, format!("joining the output's batches: {e}")))
        })
        .collect()
}
