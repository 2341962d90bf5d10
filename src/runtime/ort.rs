//! The ONNX Runtime backend, through the `ort` crate with `load-dynamic`.
//!
//! The library is loaded with `ort::init_from(path)`, which reports a missing or incompatible
//! library as an error (plain `ort::init()` panics on first use). Extra outputs are added by
//! appending their names to `graph.output` (ORT infers their types), the technique ORT's own
//! quantization calibration uses.

use std::sync::Mutex;

use ort::session::Session as OrtInner;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use prost::Message;

use super::{all_output_names, check_arity, graph_input_names, BackendOptions, Output, Session};
use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, ModelProto, ValueInfoProto};
use crate::onnx::{self, Model, TensorData};

/// Above this protobuf size the session is created from a file with external data.
const IN_MEMORY_LIMIT: usize = 1 << 30;

fn err(reason: impl Into<String>) -> Error {
    Error::Backend {
        backend: "ort",
        reason: reason.into(),
    }
}

/// The library is loaded once per process; later sessions share the environment.
static ENVIRONMENT: Mutex<Option<ort::environment::Environment>> = Mutex::new(None);

pub use super::ort_library::library_path;

fn environment(options: &BackendOptions) -> Result<ort::environment::Environment> {
    let mut slot = ENVIRONMENT
        .lock()
        .map_err(|_| err("environment lock poisoned"))?;
    if let Some(env) = slot.as_ref() {
        return Ok(env.clone());
    }
    let path = library_path(options);
    if !path.is_file() {
        return Err(err(format!(
            "ONNX Runtime library '{}' not found; pip install onnxruntime (mudsc finds the \
             library in the package), run scripts/fetch-onnxruntime.sh, or set ORT_DYLIB_PATH / \
             --ort-lib",
            path.display()
        )));
    }
    let threshold = log_threshold();
    let env = ort::init_from(&path)
        .map_err(|e| err(format!("cannot load '{}': {e}", path.display())))?
        .with_name("mudsc")
        .with_logger(std::sync::Arc::new(
            move |level: ort::logging::LogLevel,
                  _category: &str,
                  _id: &str,
                  _at: &str,
                  message: &str| {
                if level >= threshold {
                    eprintln!("onnxruntime: {message}");
                }
            },
        ))
        .build()
        .map_err(|e| err(format!("cannot start ONNX Runtime: {e}")))?;
    *slot = Some(env.clone());
    Ok(env)
}

/// The least severe ONNX Runtime message shown: errors, unless `MUDSC_ORT_LOG` asks for
/// `verbose`, `info` or `warning`. ORT's warnings (initializers listed as inputs, unused
/// nodes removed, ...) are about the model file, not the user's command, and flooded the
/// terminal on exported models.
fn log_threshold() -> ort::logging::LogLevel {
    use ort::logging::LogLevel;
    match std::env::var("MUDSC_ORT_LOG").as_deref() {
        Ok("verbose") => LogLevel::Verbose,
        Ok("info") => LogLevel::Info,
        Ok("warning") => LogLevel::Warning,
        Ok("fatal") => LogLevel::Fatal,
        _ => LogLevel::Error,
    }
}

/// Registers ONNX Runtime's CUDA execution provider on GPU `id`. A library built without it
/// (the CPU wheel's), or a machine without a usable GPU or CUDA libraries, leaves the session
/// on the CPU after a warning: the merge's result does not depend on the device.
fn with_cuda(
    mut builder: ort::session::builder::SessionBuilder,
    id: i32,
    options: &BackendOptions,
) -> Result<ort::session::builder::SessionBuilder> {
    use ort::ep::ExecutionProvider;
    let fallback = |why: String| {
        super::warn_once(&format!(
            "--device cuda:{id}: {why}; running on the CPU (use the onnxruntime-gpu wheel's \
             library with --ort-lib, and the CUDA 13 and cuDNN 9 libraries it needs on the loader path)"
        ))
    };
    let cuda = ort::ep::CUDA::default().with_device_id(id);
    match ort::ep::CUDA::is_available() {
        Ok(true) => match cuda.register(&mut builder) {
            Ok(()) => super::note_cuda_device(id),
            Err(e) => fallback(format!("the CUDA execution provider failed to start: {e}")),
        },
        Ok(false) => fallback(format!(
            "the ONNX Runtime library '{}' has no CUDA execution provider",
            library_path(options).display()
        )),
        Err(e) => fallback(format!("cannot query execution providers: {e}")),
    }
    Ok(builder)
}

pub struct OrtSession {
    session: OrtInner,
    display_name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    /// Keeps a spilled model file alive while the session may read it.
    _spill: Option<tempfile::TempDir>,
}

impl OrtSession {
    pub fn new(
        model: &Model,
        extra_outputs: &[String],
        options: &BackendOptions,
    ) -> Result<OrtSession> {
        // mudsc's own graph checks first, so a malformed model gets the same error (naming
        // the file and node, exit 2) whichever engine runs it.
        crate::graph::Graph::new(model)?;
        let env = environment(options)?;
        let outputs = all_output_names(model, extra_outputs);
        let inputs = graph_input_names(model)?;
        let declared: Vec<String> = model
            .graph()
            .output
            .iter()
            .map(|o| o.name.clone().unwrap_or_default())
            .collect();
        // A graph input asked for as an output is served from the feed (`run`): ONNX Runtime
        // returns such an output as a view of the fed buffer, which is gone after the run.
        let added: Vec<ValueInfoProto> = outputs
            .iter()
            .filter(|n| !declared.contains(n) && !inputs.contains(n))
            .map(|name| ValueInfoProto {
                name: Some(name.clone()),
                ..Default::default()
            })
            .collect();
        // No spinning: between runs mudsc computes statistics on the same cores, and ONNX
        // Runtime's idle workers spinning for work took them (71 % of a calibration's CPU
        // time on the bundled ResNet-20 pair).
        let mut builder = OrtInner::builder(&env)
            .map_err(|e| err(e.to_string()))?
            .with_intra_op_spinning(false)
            .map_err(|e| err(e.to_string()))?
            .with_inter_op_spinning(false)
            .map_err(|e| err(e.to_string()))?
            // Prepacking kept a second, packed copy of every MatMul weight beside the
            // model's: a ViT-B engine held 550 MB for 330 MB of weights, and 350 MB without
            // it, at the same speed (ViT-B 2.47 images/s either way, ResNet-50 11.9 and 12.3,
            // ResNet-18 26.6 and 26.7, one thread).
            .with_prepacking(false)
            .map_err(|e| err(e.to_string()))?;
        if options.threads > 0 {
            builder = builder
                .with_intra_threads(options.threads)
                .map_err(|e| err(e.to_string()))?;
        }
        if let super::Device::Cuda(id) = options.device {
            builder = with_cuda(builder, id, options)?;
        }
        let display_name = model.display_name();
        let load_err = |e: ort::Error| err(format!("cannot load {display_name}: {e}"));
        // Only the nodes the outputs need (`prune`): ONNX Runtime would run them all.
        let keep = super::prune::needed_nodes(model.graph(), &outputs);
        let (session, spill) = if model.proto.encoded_len() > IN_MEMORY_LIMIT {
            let mut proto = model.proto.clone();
            if let Some(graph) = proto.graph.as_mut() {
                graph.output.extend(added);
                if let Some(keep) = &keep {
                    super::prune::retain(graph, keep, &outputs);
                }
            }
            let dir = tempfile::tempdir().map_err(|e| Error::io(std::env::temp_dir(), e))?;
            let path = dir.path().join("model.onnx");
            let opts = onnx::SaveOptions {
                external_data: onnx::ExternalData::Always(None),
                protect: vec![],
            };
            onnx::save(&proto, &path, &opts)?;
            drop(proto);
            (
                builder.commit_from_file(&path).map_err(load_err)?,
                Some(dir),
            )
        } else {
            // The model's bytes followed by a model holding only the extra outputs: a
            // protobuf parser merges concatenated messages (embedded messages merged,
            // repeated fields appended), so ONNX Runtime reads the model with those outputs
            // declared, and no clone of the model (its weights: 330 MB on a ViT-B) is made.
            let mut bytes = match &keep {
                Some(keep) => super::prune::encode_pruned(&model.proto, keep, &outputs),
                None => model.proto.encode_to_vec(),
            };
            let outputs = ModelProto {
                graph: Some(GraphProto {
                    output: added,
                    ..Default::default()
                }),
                ..Default::default()
            };
            outputs
                .encode(&mut bytes)
                .map_err(|e| err(format!("encoding {display_name}: {e}")))?;
            (builder.commit_from_memory(&bytes).map_err(load_err)?, None)
        };
        Ok(OrtSession {
            session,
            display_name,
            inputs,
            outputs,
            _spill: spill,
        })
    }
}

impl Session for OrtSession {
    fn input_names(&self) -> &[String] {
        &self.inputs
    }

    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, inputs: &[TensorData]) -> Result<Vec<TensorData>> {
        Ok(self
            .run_lent(inputs)?
            .into_iter()
            .map(|o| match o {
                Output::Tensor(t) => t,
                lent => lent.to_tensor(),
            })
            .collect())
    }

    fn run_lent(&mut self, inputs: &[TensorData]) -> Result<Vec<Output>> {
        check_arity("ort", &self.inputs, inputs.len())?;
        // The fed values live as long as any output read in place: ONNX Runtime may hand
        // back an output that is a view of an input's buffer (a graph input asked for as an
        // output is one), which the input's drop would free under the reader.
        let fed: std::sync::Arc<Vec<(String, DynValue)>> = std::sync::Arc::new(
            self.inputs
                .iter()
                .zip(inputs)
                .map(|(name, t)| Ok((name.clone(), to_ort(t)?)))
                .collect::<Result<_>>()?,
        );
        let feed: Vec<(&str, &DynValue)> = fed.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let name = &self.display_name;
        let mut outputs = self
            .session
            .run(feed)
            .map_err(|e| err(format!("running {name}: {e}")))?;
        let mut out: Vec<Output> = Vec::with_capacity(self.outputs.len());
        for (k, o) in self.outputs.iter().enumerate() {
            if let Some(i) = self.inputs.iter().position(|n| n == o) {
                out.push(Output::Tensor(inputs[i].clone()));
                continue;
            }
            // A name declared twice is taken once and copied.
            if let Some(first) = self.outputs[..k].iter().position(|n| n == o) {
                let copy = out[first].to_tensor();
                out.push(Output::Tensor(copy));
                continue;
            }
            let v = outputs
                .remove(o)
                .ok_or_else(|| err(format!("{name}: output '{o}' missing")))?;
            out.push(match LentF32::new(v, &fed) {
                Ok(lent) => Output::Lent(lent),
                Err(v) => Output::Tensor(from_ort(o, &v)?),
            });
        }
        Ok(out)
    }
}

/// An f32 output of ONNX Runtime, read in place (`Output::Lent`) and freed by its allocator
/// when dropped.
pub struct LentF32 {
    _value: DynValue,
    /// The run's fed values, which the value may view.
    _fed: std::sync::Arc<Vec<(String, DynValue)>>,
    data: std::ptr::NonNull<f32>,
    shape: Vec<usize>,
}

// SAFETY: the values are Send and Sync (the `ort` crate's own impls), `data` points into
// memory they keep alive, and `LentF32` only ever reads it.
unsafe impl Send for LentF32 {}
unsafe impl Sync for LentF32 {}

impl LentF32 {
    /// The value where it is an f32 tensor in standard layout, else the value back.
    fn new(
        value: DynValue,
        fed: &std::sync::Arc<Vec<(String, DynValue)>>,
    ) -> std::result::Result<LentF32, DynValue> {
        let Ok(view) = value.try_extract_array::<f32>() else {
            return Err(value);
        };
        if !view.is_standard_layout() {
            return Err(value);
        }
        let shape = view.shape().to_vec();
        // An empty tensor's pointer may be null: any aligned pointer reads no element.
        let data = std::ptr::NonNull::new(view.as_ptr().cast_mut())
            .filter(|_| !view.is_empty())
            .unwrap_or(std::ptr::NonNull::dangling());
        Ok(LentF32 {
            _value: value,
            _fed: fed.clone(),
            data,
            shape,
        })
    }

    pub fn view(&self) -> ndarray::ArrayViewD<'_, f32> {
        // SAFETY: `data` is where the held value's `shape` f32s lie, in standard layout (or
        // dangling for none); ONNX Runtime wrote them before `new` and nothing writes them
        // while `self` holds the value and the fed values it may view, which keep the memory
        // alive for the view's lifetime.
        unsafe {
            ndarray::ArrayViewD::from_shape_ptr(ndarray::IxDyn(&self.shape), self.data.as_ptr())
        }
    }
}

fn to_ort(t: &TensorData) -> Result<DynValue> {
    fn tensor<T: ort::value::PrimitiveTensorElementType + std::fmt::Debug + Clone + 'static>(
        a: &ndarray::ArrayD<T>,
    ) -> Result<DynValue> {
        Ok(Tensor::from_array(a.clone())
            .map_err(|e| err(e.to_string()))?
            .into_dyn())
    }
    match t {
        TensorData::F32(a) => tensor(a),
        TensorData::F64(a) => tensor(a),
        TensorData::F16(a) => tensor(a),
        TensorData::BF16(a) => tensor(a),
        TensorData::I8(a) => tensor(a),
        TensorData::I16(a) => tensor(a),
        TensorData::I32(a) => tensor(a),
        TensorData::I64(a) => tensor(a),
        TensorData::U8(a) => tensor(a),
        TensorData::U16(a) => tensor(a),
        TensorData::U32(a) => tensor(a),
        TensorData::U64(a) => tensor(a),
        TensorData::Bool(a) => tensor(a),
    }
}

fn from_ort(name: &str, v: &DynValue) -> Result<TensorData> {
    let e = |x: ort::Error| err(format!("reading output '{name}': {x}"));
    let ValueType::Tensor { ty, .. } = v.dtype() else {
        return Err(err(format!("output '{name}' is not a tensor")));
    };
    macro_rules! get {
        ($t:ty, $v:ident) => {
            TensorData::$v(v.try_extract_array::<$t>().map_err(e)?.to_owned())
        };
    }
    Ok(match ty {
        TensorElementType::Float32 => get!(f32, F32),
        TensorElementType::Float64 => get!(f64, F64),
        TensorElementType::Float16 => get!(half::f16, F16),
        TensorElementType::Bfloat16 => get!(half::bf16, BF16),
        TensorElementType::Int8 => get!(i8, I8),
        TensorElementType::Int16 => get!(i16, I16),
        TensorElementType::Int32 => get!(i32, I32),
        TensorElementType::Int64 => get!(i64, I64),
        TensorElementType::Uint8 => get!(u8, U8),
        TensorElementType::Uint16 => get!(u16, U16),
        TensorElementType::Uint32 => get!(u32, U32),
        TensorElementType::Uint64 => get!(u64, U64),
        TensorElementType::Bool => get!(bool, Bool),
        other => {
            return Err(err(format!(
                "output '{name}' has unsupported type {other:?}"
            )))
        }
    })
}
