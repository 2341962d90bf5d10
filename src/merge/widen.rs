//! `--width`: which groups may keep more merged units than one model has. A wider group
//! changes the sizes of every tensor that holds its units, so the graph must not carry those
//! sizes anywhere but in the tensors themselves: a Reshape whose target is read off another
//! value's shape (a transformer's `x.reshape(B, N, C)`), a grouped convolution's `group`
//! attribute, a Split's sizes. Widening is offered only where the units meet nothing but
//! dense layers, added terms, BatchNorm and elementwise functions; the other groups keep one
//! model's width, and the report says which.

use std::collections::BTreeMap;

use super::dense_use::{is_depthwise, DEPTHWISE};
use crate::graph::Graph;
use crate::onnx::proto::GraphProto;
use crate::symmetry::{Group, GroupKind};

/// Ops that read the shape of a value (or slice it by constants): a value of a widened group
/// may not reach them.
const SHAPE_READERS: &[&str] = &[
    "Shape",
    "Reshape",
    "Split",
    "Slice",
    "Expand",
    "Tile",
    "Size",
    "ConstantOfShape",
    "Gather",
];

/// Per group: `Ok` when it may be widened, else why not.
pub fn scope(groups: &[Group], graph: &Graph) -> BTreeMap<usize, Result<(), String>> {
    groups.iter().map(|g| (g.id, widenable(g, graph))).collect()
}

fn widenable(g: &Group, graph: &Graph) -> Result<(), String> {
    if !matches!(g.kind, GroupKind::Plain) {
        return Err("blocked group (heads or norm groups)".into());
    }
    super::dense_use::only_dense_use(g, graph, &["BatchNormalization", DEPTHWISE])?;
    for value in &g.taps {
        for &(node, _) in graph.consumers(value) {
            let op = graph.node(node).op_type.as_deref().unwrap_or("");
            if SHAPE_READERS.contains(&op) {
                return Err(format!("'{value}' feeds {op}"));
            }
        }
    }
    Ok(())
}

/// After the rewrite: every depthwise convolution of `original` whose weight now has another
/// channel count in `merged` (its group was widened) gets that count as its `group`.
pub fn set_depthwise_groups(original: &Graph, merged: &mut GraphProto) {
    let channels: BTreeMap<String, i64> = merged
        .initializer
        .iter()
        .filter_map(|t| Some((t.name.clone()?, *t.dims.first()?)))
        .collect();
    for (n, node) in merged.node.iter_mut().enumerate() {
        let Some(before) = original.nodes().get(n) else {
            continue;
        };
        if node.op_type.as_deref() != Some("Conv") || !is_depthwise(before, original) {
            continue;
        }
        let Some(&now) = node.input.get(1).and_then(|w| channels.get(w)) else {
            continue;
        };
        if let Some(a) = node
            .attribute
            .iter_mut()
            .find(|a| a.name.as_deref() == Some("group"))
        {
            a.i = Some(now);
        }
    }
}
