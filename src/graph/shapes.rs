//! Static shapes: what the file declares, and what tract's type inference derives for a given
//! input shape. Discovery needs concrete channel counts, head counts and reshape targets.

use std::collections::HashMap;

use tract_onnx::prelude::*;

use crate::error::{Error, Result};
use crate::onnx::proto::{type_proto, ValueInfoProto};
use crate::onnx::{DataType, Model};
use crate::runtime::tract as tract_backend;

/// One declared dimension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Known(usize),
    /// A named symbolic dimension such as a batch size `N`.
    Param(String),
    Unknown,
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(d) => write!(f, "{d}"),
            Dim::Param(p) => write!(f, "{p}"),
            Dim::Unknown => write!(f, "?"),
        }
    }
}

/// Concrete shapes of values, by name.
pub type ShapeMap = HashMap<String, Vec<usize>>;

/// Element type and declared shape of a tensor-typed value; `None` for non-tensor types.
pub fn declared(vi: &ValueInfoProto) -> Option<(i32, Option<Vec<Dim>>)> {
    let Some(type_proto::Value::TensorType(t)) = vi.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    let dims = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(crate::onnx::proto::tensor_shape_proto::dimension::Value::DimValue(v))
                    if *v >= 0 =>
                {
                    Dim::Known(*v as usize)
                }
                Some(crate::onnx::proto::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                    Dim::Param(p.clone())
                }
                _ => Dim::Unknown,
            })
            .collect()
    });
    Some((t.elem_type.unwrap_or(0), dims))
}

/// Above this many nodes, shape inference skips tract's typed translation (see
/// [`infer_shapes`]). Typed facts can be richer (constant-folded shape computations): a
/// value the analysis leaves without a shape has its axes fixed by discovery, which costs
/// merge quality, never correctness. Every bundled model is far below the limit.
pub const TYPED_NODE_LIMIT: usize = 10_000;

/// Infers the concrete shape of every named value for the given input shapes (graph inputs
/// not listed must be fully static in the file).
pub fn infer_shapes(model: &Model, inputs: &HashMap<String, Vec<usize>>) -> Result<ShapeMap> {
    // First without the large weights' values; those shapes are taken only when every value
    // got one, since a value left without one there might have had one from the weights.
    if let Some(Ok(shapes)) = infer_shapes_without_weights(model, inputs) {
        let every_value = model
            .graph()
            .node
            .iter()
            .flat_map(|n| &n.output)
            .all(|o| o.is_empty() || shapes.contains_key(o));
        if every_value {
            return Ok(shapes);
        }
    }
    infer_shapes_with_weights(model, inputs)
}

/// `infer_shapes` with every float initializer over 64 KiB given to tract as an input of its
/// shape, without its values (`tract::shape_model`); `None` when the model has none.
pub fn infer_shapes_without_weights(
    model: &Model,
    inputs: &HashMap<String, Vec<usize>>,
) -> Option<Result<ShapeMap>> {
    let tm = tract_backend::shape_model(model)?;
    Some(tm.and_then(|tm| shapes_of(tm, model, inputs)))
}

/// `infer_shapes` from the whole model, every weight's values included: the reference the
/// shapes without them are tested against, and the fallback where those are not complete.
pub fn infer_shapes_with_weights(
    model: &Model,
    inputs: &HashMap<String, Vec<usize>>,
) -> Result<ShapeMap> {
    shapes_of(tract_backend::inference_model(model)?, model, inputs)
}

/// The shapes tract infers on `tm` (parsed from `model` or from its lighter copy).
fn shapes_of(
    mut tm: InferenceModel,
    model: &Model,
    inputs: &HashMap<String, Vec<usize>>,
) -> Result<ShapeMap> {
    let err = |reason: String| {
        tract_backend::model_fault(format!(
            "shape inference on {}: {reason}",
            model.display_name()
        ))
    };
    let graph = crate::graph::Graph::new(model)?;
    let mut input_shapes = ShapeMap::new();
    for (i, vi) in graph.inputs().iter().enumerate() {
        let name = vi.name.clone().unwrap_or_default();
        let (elem, dims) =
            declared(vi).ok_or_else(|| err(format!("input '{name}' is not a tensor")))?;
        let shape = match inputs.get(&name) {
            Some(s) => s.clone(),
            None => dims
                .unwrap_or_default()
                .iter()
                .map(|d| match d {
                    Dim::Known(v) => Ok(*v),
                    _ => Err(Error::Usage(format!(
                        "input '{name}' has a symbolic dimension; give its shape"
                    ))),
                })
                .collect::<Result<Vec<_>>>()?,
        };
        let dt = DataType::from_onnx(elem)
            .map(tract_backend::datum_type)
            .transpose()?
            .ok_or_else(|| err(format!("input '{name}' has an unsupported element type")))?;
        tm.set_input_fact(i, InferenceFact::dt_shape(dt, &shape))
            .map_err(|e| err(format!("{e:#}")))?;
        input_shapes.insert(name, shape);
    }
    let mut shapes = input_shapes;
    let name = model.display_name();
    // tract's typed translation checks every new node's name against all nodes before it:
    // quadratic (87 s for a 100,000-node chain). Large graphs take their shapes from the
    // inference analysis alone, which is a work list over the edges, linear in practice.
    let typed = if model.graph().node.len() <= TYPED_NODE_LIMIT {
        tract_backend::guarded(&name, "inferring the shapes of", || {
            Ok(tm.clone().into_typed())
        })?
    } else {
        Err(TractError::msg("graph too large for the typed translation"))
    };
    // An op tract cannot type (a custom op, say): the analysis alone (below) gives what it
    // can. Values downstream of it stay without a shape, and discovery fixes what touches
    // them.
    if let Ok(typed) = typed {
        for node in typed.nodes() {
            for slot in 0..node.outputs.len() {
                let outlet = OutletId::new(node.id, slot);
                if let (Some(label), Some(shape)) = (
                    typed.outlet_label(outlet),
                    node.outputs[slot].fact.shape.as_concrete(),
                ) {
                    shapes.insert(label.to_string(), shape.to_vec());
                }
            }
        }
    }
    // The typed translation folds values computed from shapes alone (an attention scale
    // `1/sqrt(head_dim)` made from `Shape`) into constants and drops their names; a value
    // without a shape fixes every axis of the nodes that read it. The inference analysis keeps
    // every name: fill in what the typed model lost.
    let missing = model
        .graph()
        .node
        .iter()
        .flat_map(|n| &n.output)
        .any(|o| !o.is_empty() && !shapes.contains_key(o));
    if missing {
        tract_backend::guarded(&name, "inferring the shapes of", || {
            let _ = tm.analyse(true);
            Ok(())
        })?;
        for node in tm.nodes() {
            for slot in 0..node.outputs.len() {
                let outlet = OutletId::new(node.id, slot);
                let shape = node.outputs[slot].fact.shape.as_concrete_finite();
                if let (Some(label), Ok(Some(shape))) = (tm.outlet_label(outlet), shape) {
                    shapes
                        .entry(label.to_string())
                        .or_insert_with(|| shape.to_vec());
                }
            }
        }
    }
    // Constant nodes are folded away by tract, their labels with them: read their dims.
    for node in &model.graph().node {
        if node.op_type.as_deref() == Some("Constant") {
            if let (Some(out), Some(t)) = (
                node.output.first(),
                node.attribute.iter().find_map(|a| a.t.as_ref()),
            ) {
                shapes.insert(
                    out.clone(),
                    t.dims.iter().map(|&d| d.max(0) as usize).collect(),
                );
            }
        }
    }
    for t in model.graph().initializer.iter() {
        if let Some(name) = &t.name {
            shapes.insert(
                name.clone(),
                t.dims.iter().map(|&d| d.max(0) as usize).collect(),
            );
        }
    }
    Ok(shapes)
}
