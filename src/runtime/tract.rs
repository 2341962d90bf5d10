//! The embedded tract backend (pure Rust, the default).
//!
//! Extra outputs are selected on the `InferenceModel` before optimisation, while the ONNX tensor
//! names still label the outlets (fusion would otherwise remove them). A plan is optimised for
//! concrete input shapes and cached per shape, so models with symbolic dimensions of any kind
//! run, at the cost of one optimisation per distinct batch shape (usually two: full and last).

use std::collections::HashMap;

use prost::Message;
use tract_onnx::prelude::*;

use super::{all_output_names, check_arity, graph_input_names, Session};
use crate::error::{Error, Result};
use crate::onnx::{DataType, Model, TensorData};

type Plan = Arc<TypedSimplePlan>;

fn err(model: &Model, what: &str, e: impl std::fmt::Display) -> Error {
    Error::Backend {
        backend: "tract",
        reason: format!("{what} {}: {e}", model.display_name()),
    }
}

/// Parses the model into tract's inference representation.
///
/// Declared shapes of intermediate values and outputs are dropped: they are hints written by
/// the exporter with symbolic batch names (`N`, `s0`, ...), and tract would refuse to unify them
/// with the concrete batch shape each plan is optimised for.
pub fn inference_model(model: &Model) -> Result<InferenceModel> {
    // Our own structural checks first: tract panics or loops on some malformed graphs.
    crate::graph::Graph::new(model)?;
    parse(model, model.proto.clone())
}

/// Float initializers over this many bytes reach shape inference without their values
/// (`shape_model`). Shape-carrying constants (Reshape targets, Slice bounds, Resize scales)
/// are integers or a few floats, far below it.
const SHAPE_ONLY_BYTES: u64 = 1 << 16;

/// `inference_model` for shape inference alone: every float initializer over
/// `SHAPE_ONLY_BYTES` becomes a graph input of its type and shape, after the model's own
/// inputs (whose facts are set by position), so its values are neither copied nor parsed.
/// Parsing the whole model for its shapes copied every weight four times over (our clone, its
/// encoding, tract's parse, tract's tensors): 12 s of a merge of two 2.2 GB models. A shape
/// that depended on such a weight's values would be left unknown, not wrong:
/// `graph::infer_shapes` takes these shapes only when every value got one. `None` when no
/// initializer is that large.
pub fn shape_model(model: &Model) -> Option<Result<InferenceModel>> {
    use crate::onnx::proto::{GraphProto, TensorProto};
    let g = model.graph();
    let large = |t: &TensorProto| {
        let float = matches!(
            DataType::from_onnx(t.data_type.unwrap_or(0)),
            Some(DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16)
        );
        float && crate::onnx::expected_bytes(t).is_some_and(|b| b > SHAPE_ONLY_BYTES)
    };
    let (moved, kept): (Vec<&TensorProto>, Vec<&TensorProto>) =
        g.initializer.iter().partition(|t| large(t));
    if moved.is_empty() {
        return None;
    }
    let names: std::collections::HashSet<&str> =
        moved.iter().filter_map(|t| t.name.as_deref()).collect();
    // The model's own inputs first, in their order (their facts are set by position).
    let mut input: Vec<_> = g
        .input
        .iter()
        .filter(|i| !names.contains(i.name.as_deref().unwrap_or("")))
        .cloned()
        .collect();
    input.extend(moved.into_iter().map(crate::onnx::initializer_input));
    let proto = super::prune::with_graph(
        &model.proto,
        GraphProto {
            node: g.node.clone(),
            input,
            initializer: kept.into_iter().cloned().collect(),
            ..super::prune::graph_fields(g)
        },
    );
    Some(crate::graph::Graph::new(model).and_then(|_| parse(model, proto)))
}

/// tract's inference model of `proto` (`model`'s, or a lighter copy), without the declared
/// shapes of intermediate values.
fn parse(model: &Model, mut proto: crate::onnx::proto::ModelProto) -> Result<InferenceModel> {
    if let Some(g) = proto.graph.as_mut() {
        g.value_info.clear();
    }
    let bytes = proto.encode_to_vec();
    guarded(&model.display_name(), "loading", || {
        tract_onnx::onnx()
            .with_ignore_output_shapes(true)
            .model_for_read(&mut bytes.as_slice())
            .map_err(|e| model_fault(format!("cannot load {}: {e:#}", model.display_name())))
    })
}

/// A tract refusal of a model: the model's fault (exit 2) unless tract says that it lacks
/// the op (exit 1: valid ONNX that this engine cannot run).
pub(crate) fn model_fault(reason: String) -> Error {
    let lower = reason.to_lowercase();
    if [
        "unimplemented",
        "not implemented",
        "unsupported",
        "not supported",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        Error::Backend {
            backend: "tract",
            reason,
        }
    } else {
        Error::BadModel {
            backend: "tract",
            reason,
        }
    }
}

/// Runs a tract call, turning a panic inside tract (it has some on malformed models) into an
/// error that names the model. The panic's own report (`thread 'main' panicked at ...` and a
/// backtrace hint) is silenced for calls made here: the error says it once.
pub(crate) fn guarded<T>(model: &str, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    install_quiet_hook();
    let was = IN_GUARD.with(|g| g.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    IN_GUARD.with(|g| g.set(was));
    result.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(Error::BadModel {
            backend: "tract",
            reason: format!(
                "internal error while {what} {model} ({msg}); the model is probably malformed"
            ),
        })
    })
}

thread_local! {
    /// Whether this thread is inside [`guarded`], whose panics are caught and reported.
    static IN_GUARD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Wraps the panic hook once: panics inside [`guarded`] print nothing, every other panic
/// reports as before (a per-thread flag, so that threads running unguarded code are unaffected).
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !IN_GUARD.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
}

/// tract's element type for an ONNX dtype.
pub fn datum_type(dtype: DataType) -> Result<DatumType> {
    Ok(match dtype {
        DataType::F32 => DatumType::F32,
        DataType::F64 => DatumType::F64,
        DataType::F16 => DatumType::F16,
        DataType::I8 => DatumType::I8,
        DataType::I16 => DatumType::I16,
        DataType::I32 => DatumType::I32,
        DataType::I64 => DatumType::I64,
        DataType::U8 => DatumType::U8,
        DataType::U16 => DatumType::U16,
        DataType::U32 => DatumType::U32,
        DataType::U64 => DatumType::U64,
        DataType::Bool => DatumType::Bool,
        DataType::BF16 => return Err(bf16_unsupported()),
    })
}

fn bf16_unsupported() -> Error {
    Error::Backend {
        backend: "tract",
        reason: "bfloat16 tensors are not supported by tract; use --backend ort".into(),
    }
}

pub struct TractSession {
    model: InferenceModel,
    display_name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    plans: HashMap<Vec<Vec<usize>>, Plan>,
}

impl TractSession {
    pub fn new(model: &Model, extra_outputs: &[String]) -> Result<TractSession> {
        let mut tm = inference_model(model)?;
        let outputs = all_output_names(model, extra_outputs);
        tm.select_outputs_by_name(&outputs)
            .map_err(|e| err(model, "cannot expose outputs of", format!("{e:#}")))?;
        Ok(TractSession {
            model: tm,
            display_name: model.display_name(),
            inputs: graph_input_names(model)?,
            outputs,
            plans: HashMap::new(),
        })
    }

    fn plan(&mut self, inputs: &[TensorData]) -> Result<&Plan> {
        let key: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        if !self.plans.contains_key(&key) {
            // Preparing for concrete shapes is where tract checks the graph's consistency
            // (ranks, volumes, axes): its refusals are the model's fault.
            let e = |what: &str, x: TractError| {
                model_fault(format!("{what} {}: {x:#}", self.display_name))
            };
            let mut tm = self.model.clone();
            for (i, t) in inputs.iter().enumerate() {
                let fact = InferenceFact::dt_shape(datum_type(t.dtype())?, t.shape());
                tm.set_input_fact(i, fact)
                    .map_err(|x| e("input shape rejected by", x))?;
            }
            let plan = guarded(&self.display_name, "preparing", || {
                tm.into_optimized()
                    .and_then(|m| m.into_runnable())
                    .map_err(|x| e("cannot prepare", x))
            })?;
            self.plans.insert(key.clone(), plan);
        }
        Ok(&self.plans[&key])
    }
}

impl Session for TractSession {
    fn input_names(&self) -> &[String] {
        &self.inputs
    }

    fn output_names(&self) -> &[String] {
        &self.outputs
    }

    fn run(&mut self, inputs: &[TensorData]) -> Result<Vec<TensorData>> {
        check_arity("tract", &self.inputs, inputs.len())?;
        let name = self.display_name.clone();
        let plan = self.plan(inputs)?;
        let values: TVec<TValue> = inputs
            .iter()
            .map(|t| to_tract(t).map(TValue::from))
            .collect::<Result<_>>()?;
        let outputs = guarded(&name, "running", || {
            plan.run(values).map_err(|e| Error::Backend {
                backend: "tract",
                reason: format!("running {name}: {e:#}"),
            })
        })?;
        outputs
            .into_iter()
            .map(|v| from_tract(v.into_tensor()))
            .collect()
    }
}

fn to_tract(t: &TensorData) -> Result<Tensor> {
    Ok(match t {
        TensorData::BF16(_) => return Err(bf16_unsupported()),
        TensorData::F32(a) => a.clone().into_tensor(),
        TensorData::F64(a) => a.clone().into_tensor(),
        TensorData::F16(a) => a.clone().into_tensor(),
        TensorData::I8(a) => a.clone().into_tensor(),
        TensorData::I16(a) => a.clone().into_tensor(),
        TensorData::I32(a) => a.clone().into_tensor(),
        TensorData::I64(a) => a.clone().into_tensor(),
        TensorData::U8(a) => a.clone().into_tensor(),
        TensorData::U16(a) => a.clone().into_tensor(),
        TensorData::U32(a) => a.clone().into_tensor(),
        TensorData::U64(a) => a.clone().into_tensor(),
        TensorData::Bool(a) => a.clone().into_tensor(),
    })
}

fn from_tract(t: Tensor) -> Result<TensorData> {
    let e = |x: TractError| Error::Backend {
        backend: "tract",
        reason: format!("reading an output: {x:#}"),
    };
    Ok(match t.datum_type() {
        DatumType::F32 => TensorData::F32(t.into_plain_array().map_err(e)?),
        DatumType::F64 => TensorData::F64(t.into_plain_array().map_err(e)?),
        DatumType::F16 => TensorData::F16(t.into_plain_array().map_err(e)?),
        DatumType::I8 => TensorData::I8(t.into_plain_array().map_err(e)?),
        DatumType::I16 => TensorData::I16(t.into_plain_array().map_err(e)?),
        DatumType::I32 => TensorData::I32(t.into_plain_array().map_err(e)?),
        DatumType::I64 => TensorData::I64(t.into_plain_array().map_err(e)?),
        DatumType::U8 => TensorData::U8(t.into_plain_array().map_err(e)?),
        DatumType::U16 => TensorData::U16(t.into_plain_array().map_err(e)?),
        DatumType::U32 => TensorData::U32(t.into_plain_array().map_err(e)?),
        DatumType::U64 => TensorData::U64(t.into_plain_array().map_err(e)?),
        DatumType::Bool => TensorData::Bool(t.into_plain_array().map_err(e)?),
        other => {
            return Err(Error::Backend {
                backend: "tract",
                reason: format!("output of unsupported type {other:?}"),
            })
        }
    })
}
