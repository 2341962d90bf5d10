//! Are two models the same architecture? Decided by structure, never by names: exporters name
//! folded weights `onnx::Conv_123` with counters that differ between two exports of the same
//! network. Nodes are compared in file order (an exporter writes one architecture the same
//! way): op type, domain, attributes, and where every input comes from (a graph input, an
//! initializer of a given shape and type, or output k of node j).

use std::path::PathBuf;

use super::{node_label, Graph, Source};
use crate::error::{Error, Result};
use crate::onnx::proto::AttributeProto;
use crate::onnx::Model;

/// Errors with the first differing node when `a` and `b` are not the same architecture.
pub fn same_architecture(a: &Model, b: &Model) -> Result<()> {
    let (ga, gb) = (Graph::new(a)?, Graph::new(b)?);
    let mismatch = |node: String, reason: String| Error::Mismatch {
        a: a.path.clone().unwrap_or_else(|| PathBuf::from("<memory>")),
        b: b.path.clone().unwrap_or_else(|| PathBuf::from("<memory>")),
        node,
        reason,
    };
    let opsets = |m: &Model| {
        let mut o: Vec<(String, i64)> = m
            .proto
            .opset_import
            .iter()
            .map(|o| (o.domain.clone().unwrap_or_default(), o.version.unwrap_or(0)))
            .map(|(d, v)| (if d == "ai.onnx" { String::new() } else { d }, v))
            .collect();
        o.sort();
        o
    };
    if opsets(a) != opsets(b) {
        return Err(mismatch(
            "(model)".into(),
            format!("opset imports differ: {:?} vs {:?}", opsets(a), opsets(b)),
        ));
    }
    if ga.inputs().len() != gb.inputs().len() || ga.outputs().len() != gb.outputs().len() {
        return Err(mismatch(
            "(graph)".into(),
            "different numbers of graph inputs or outputs".into(),
        ));
    }
    let (na, nb) = (ga.nodes(), gb.nodes());
    for i in 0..na.len().max(nb.len()) {
        let (Some(x), Some(y)) = (na.get(i), nb.get(i)) else {
            let label = na
                .get(i)
                .or(nb.get(i))
                .map(|n| node_label(n, i))
                .unwrap_or_default();
            return Err(mismatch(
                label,
                format!("{} nodes vs {}", na.len(), nb.len()),
            ));
        };
        let label = node_label(x, i);
        if x.op_type != y.op_type
            || x.domain.as_deref().unwrap_or("") != y.domain.as_deref().unwrap_or("")
        {
            return Err(mismatch(
                label,
                format!(
                    "op {} vs {}",
                    x.op_type.as_deref().unwrap_or("?"),
                    y.op_type.as_deref().unwrap_or("?")
                ),
            ));
        }
        if x.input.len() != y.input.len() || x.output.len() != y.output.len() {
            return Err(mismatch(
                label,
                "different numbers of inputs or outputs".into(),
            ));
        }
        for (k, (p, q)) in x.input.iter().zip(&y.input).enumerate() {
            let (sp, sq) = (origin(&ga, p), origin(&gb, q));
            if sp != sq {
                // Names are not compared, but they say which tensor to look at.
                let named = |g: &Graph, v: &str, s: String| match g.initializer(v) {
                    Some(_) => format!("{s} ('{v}')"),
                    None => s,
                };
                return Err(mismatch(
                    label,
                    format!(
                        "input {k} comes from {} vs {}",
                        named(&ga, p, sp),
                        named(&gb, q, sq)
                    ),
                ));
            }
        }
        let attrs = |n: &crate::onnx::proto::NodeProto| {
            let mut v: Vec<AttributeProto> = n.attribute.clone();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            for attr in &mut v {
                // Float Constant values are weights (compared by shape); integer ones are
                // shapes and axes, part of the architecture.
                let float = |t: &crate::onnx::proto::TensorProto| {
                    matches!(t.data_type, Some(1 | 10 | 11 | 16))
                };
                if let Some(t) = attr.t.as_mut().filter(|t| float(t)) {
                    t.raw_data = None;
                    t.float_data.clear();
                    t.int32_data.clear();
                    t.int64_data.clear();
                    t.double_data.clear();
                    t.name = None;
                }
                attr.g = None;
                attr.graphs.clear();
            }
            v
        };
        if attrs(x) != attrs(y) {
            return Err(mismatch(label, "attributes differ".into()));
        }
    }
    Ok(())
}

/// Where a value comes from, without names.
fn origin(g: &Graph, value: &str) -> String {
    if value.is_empty() {
        return "nothing".into();
    }
    match g.source(value) {
        Some(Source::Input) => {
            let i = g
                .inputs()
                .iter()
                .position(|v| v.name.as_deref() == Some(value));
            format!("graph input {}", i.unwrap_or(usize::MAX))
        }
        Some(Source::Initializer) => {
            let t = g.initializer(value);
            let dims = t.map(|t| t.dims.clone()).unwrap_or_default();
            let dtype = t.and_then(|t| t.data_type).unwrap_or(0);
            format!("an initializer {dims:?} of type {dtype}")
        }
        Some(Source::Node { node, slot }) => format!("output {slot} of node #{node}"),
        None => "an outer scope".into(),
    }
}

/// For models of the same architecture: each value name of `a` → the name of the value in the
/// same place of `b` (node inputs and outputs by position, graph inputs and outputs by order).
pub fn value_map(a: &Model, b: &Model) -> std::collections::HashMap<String, String> {
    let (ga, gb) = (a.graph(), b.graph());
    let mut map = std::collections::HashMap::new();
    let pairs = ga
        .input
        .iter()
        .zip(&gb.input)
        .chain(ga.output.iter().zip(&gb.output))
        .filter_map(|(x, y)| Some((x.name.clone()?, y.name.clone()?)));
    map.extend(pairs);
    for (x, y) in ga.node.iter().zip(&gb.node) {
        for (p, q) in x
            .input
            .iter()
            .zip(&y.input)
            .chain(x.output.iter().zip(&y.output))
        {
            if !p.is_empty() {
                map.entry(p.clone()).or_insert_with(|| q.clone());
            }
        }
    }
    map
}
