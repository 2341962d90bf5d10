//! A model summary: what `mudsc inspect` prints.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::graph::{shapes_declared, Graph};
use crate::onnx::proto::ValueInfoProto;
use crate::onnx::{onnx_dtype_name, Model};

#[derive(Clone, Debug, Serialize)]
pub struct ValueSummary {
    pub name: String,
    pub dtype: String,
    /// Dimensions as declared; symbolic ones by name, unknown as `?`.
    pub shape: Option<Vec<String>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub path: String,
    pub ir_version: i64,
    /// (domain, version); the default domain is written `ai.onnx`.
    pub opsets: Vec<(String, i64)>,
    pub producer: String,
    pub inputs: Vec<ValueSummary>,
    pub outputs: Vec<ValueSummary>,
    pub nodes: usize,
    /// Op type (prefixed by its domain when not the default one) → count.
    pub ops: BTreeMap<String, usize>,
    pub initializers: usize,
    pub parameters: u64,
    pub parameter_bytes: u64,
    /// `node (op).attribute` for every subgraph-carrying attribute.
    pub subgraphs: Vec<String>,
    pub external_data_files: Vec<String>,
    pub metadata: Vec<(String, String)>,
}

pub fn summarize(model: &Model) -> Result<Summary> {
    let graph = Graph::new(model)?;
    let p = &model.proto;
    let mut ops = BTreeMap::new();
    for node in graph.nodes() {
        let op = node.op_type.clone().unwrap_or_default();
        let key = if node.domain_is_default() {
            op
        } else {
            format!("{}::{op}", node.domain.as_deref().unwrap_or(""))
        };
        *ops.entry(key).or_insert(0) += 1;
    }
    let (mut parameters, mut parameter_bytes) = (0u64, 0u64);
    for t in graph.initializers() {
        // Saturating: the dims are the file's word, and a corrupt file may claim 2^100.
        let count: u64 = t
            .dims
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d.max(0) as u64));
        parameters = parameters.saturating_add(count);
        parameter_bytes = parameter_bytes.saturating_add(
            match crate::onnx::DataType::from_onnx(t.data_type.unwrap_or(0)) {
                Some(d) => count.saturating_mul(d.size() as u64),
                None => t.raw_data.as_ref().map_or(0, |r| r.len() as u64),
            },
        );
    }
    Ok(Summary {
        path: model.display_name(),
        ir_version: p.ir_version.unwrap_or(0),
        opsets: p
            .opset_import
            .iter()
            .map(|o| {
                let d = o.domain.clone().unwrap_or_default();
                let d = if d.is_empty() { "ai.onnx".into() } else { d };
                (d, o.version.unwrap_or(0))
            })
            .collect(),
        producer: format!(
            "{} {}",
            p.producer_name.as_deref().unwrap_or("?"),
            p.producer_version.as_deref().unwrap_or("")
        )
        .trim()
        .to_string(),
        inputs: graph.inputs().into_iter().map(value_summary).collect(),
        outputs: graph.outputs().iter().map(value_summary).collect(),
        nodes: graph.nodes().len(),
        ops,
        initializers: graph.initializers().len(),
        parameters,
        parameter_bytes,
        subgraphs: graph
            .subgraphs()
            .iter()
            .map(|s| format!("{} ({}).{}", s.node_name, s.op_type, s.attribute))
            .collect(),
        external_data_files: model
            .data_files
            .iter()
            .map(|f| f.display().to_string())
            .collect(),
        metadata: p
            .metadata_props
            .iter()
            .map(|kv| {
                (
                    kv.key.clone().unwrap_or_default(),
                    kv.value.clone().unwrap_or_default(),
                )
            })
            .collect(),
    })
}

fn value_summary(vi: &ValueInfoProto) -> ValueSummary {
    let name = vi.name.clone().unwrap_or_default();
    match shapes_declared(vi) {
        Some((elem, dims)) => ValueSummary {
            name,
            dtype: onnx_dtype_name(elem),
            shape: dims.map(|d| d.iter().map(|x| x.to_string()).collect()),
        },
        None => ValueSummary {
            name,
            dtype: "non-tensor".into(),
            shape: None,
        },
    }
}
