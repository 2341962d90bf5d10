//! `--width`: which groups may keep more merged units than one model has. A wider group
//! changes the sizes of every tensor that holds its units, so every place the graph spells a
//! size must follow: a depthwise convolution's `group` attribute ([`set_depthwise_groups`]),
//! a Reshape's target, constant or read off another value's shape (a transformer's
//! `x.reshape(B, N, C)`: [`pin_reshapes`], from [`shape_flow`]). Widening is offered where the
//! units meet dense layers, added terms, BatchNorm, LayerNorm (which then normalises over the
//! merged units: like zipping through it, close to but not exactly the models' functions),
//! elementwise functions, and those reshapes; the other groups keep one model's width, and the
//! report says why.

use std::collections::{BTreeMap, BTreeSet};

use super::dense_use::{is_depthwise, DEPTHWISE};
use super::shape_flow::{self, Axes, Elem, Flow, Holds};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::proto::{GraphProto, TensorProto};
use crate::symmetry::rules::{attr_int, input, norm_axis};
use crate::symmetry::{Group, GroupKind};

/// Ops that read the shape of a value or slice it: a value of a widened group may reach them
/// only where [`reads_ok`] says so.
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

/// Per group: `Ok` when it may be widened, else why not; and the shape values that
/// [`pin_reshapes`] reads.
pub fn scope(
    groups: &[Group],
    graph: &Graph,
    axes: &Axes,
) -> (BTreeMap<usize, std::result::Result<(), String>>, Flow) {
    let candidates: BTreeSet<usize> = groups.iter().map(|g| g.id).collect();
    let flow = shape_flow::follow(graph, axes, &candidates);
    let mut scope: BTreeMap<usize, std::result::Result<(), String>> = groups
        .iter()
        .map(|g| (g.id, widenable(g, groups, graph, axes, &flow)))
        .collect();
    // Groups that share their heads' order widen together or not at all.
    for g in groups {
        let Some(b) = g.block else { continue };
        let kept = groups
            .iter()
            .find(|o| o.block == Some(b) && o.id != g.id && scope[&o.id].is_err());
        if let (Some(o), Ok(())) = (kept, &scope[&g.id]) {
            let why = format!(
                "shares its heads with group {}, which keeps its width",
                o.id
            );
            scope.insert(g.id, Err(why));
        }
    }
    (scope, flow)
}

fn widenable(
    g: &Group,
    groups: &[Group],
    graph: &Graph,
    axes: &Axes,
    flow: &Flow,
) -> std::result::Result<(), String> {
    let also = [
        "BatchNormalization",
        "LayerNormalization",
        "Expand",
        DEPTHWISE,
    ];
    super::dense_use::only_dense_use(g, graph, &also)?;
    if let Some(why) = flow.blocked.get(&g.id) {
        return Err(why.clone());
    }
    let members = g.members.iter().map(|m| (m.tensor.as_str(), Some(m.axis)));
    let taps = g.taps.iter().map(|t| {
        let rank = axes.shapes.get(t).map_or(0, Vec::len);
        (
            t.as_str(),
            (0..rank).find(|&a| axes.group_at(t, a) == Some(Holds::Units(g.id))),
        )
    });
    for (value, axis) in members.chain(taps) {
        for &(node, slot) in graph.consumers(value) {
            reads_ok(graph, node, slot, value, axis, axes, flow)?;
        }
    }
    // Every Reshape the width reaches must take constants from the merged shapes (tried with
    // one unit more, or one block: a head).
    let step = match g.kind {
        GroupKind::Blocked { block_size, .. } => block_size,
        GroupKind::Plain => 1,
    };
    let one_more: BTreeMap<usize, usize> = groups
        .iter()
        .filter(|o| o.id == g.id || (g.block.is_some() && o.block == g.block))
        .map(|o| (o.id, o.width + step))
        .collect();
    for n in graph
        .nodes()
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Reshape"))
    {
        shape_flow::pin(n, axes, flow, &one_more)?;
    }
    Ok(())
}

/// Whether node `node` may read `value` (whose units lie along `axis`) at input `slot` once
/// the units are more: shape readers only where they leave that axis alone.
fn reads_ok(
    graph: &Graph,
    node: usize,
    slot: usize,
    value: &str,
    axis: Option<usize>,
    axes: &Axes,
    flow: &Flow,
) -> std::result::Result<(), String> {
    let n = graph.node(node);
    let op = n.op_type.as_deref().unwrap_or("");
    if !SHAPE_READERS.contains(&op) {
        return Ok(());
    }
    let refuse = || Err(format!("'{value}' feeds {op}"));
    let (Some(axis), 0) = (axis, slot) else {
        return refuse();
    };
    let rank = axes.shapes.get(value).map_or(0, Vec::len);
    let ints = |i: usize| -> Option<Vec<Elem>> {
        let name = input(n, i)?;
        flow.values.get(name).cloned().or_else(|| {
            let t = graph.constant(name)?;
            let v = crate::onnx::TensorData::from_proto(t).ok()?.to_labels()?;
            Some(v.into_iter().map(Elem::Known).collect())
        })
    };
    let ok = match op {
        // Followed by the shape flow; pinned reshapes are checked in `widenable`.
        "Shape" | "Reshape" => true,
        "Gather" => norm_axis(attr_int(n, "axis").unwrap_or(0), rank).is_ok_and(|a| a != axis),
        "Slice" => ints(3).is_some_and(|sliced| {
            sliced.iter().all(|e| match e {
                Elem::Known(a) => norm_axis(*a, rank).is_ok_and(|a| a != axis),
                _ => false,
            })
        }),
        // Broadcast along the units: the target must leave that axis at 1.
        "Expand" => ints(1).is_some_and(|target| {
            let at = (target.len() + axis).checked_sub(rank);
            at.and_then(|i| target.get(i)) == Some(&Elem::Known(1))
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        refuse()
    }
}

/// After the rewrite: every Reshape that touches a widened group (`widths`: merged width of
/// each) gets a constant target from the merged shapes, in a new initializer; the shape
/// computations it read are left to the engine's dead-code removal.
pub fn pin_reshapes(
    original: &Graph,
    merged: &mut GraphProto,
    axes: &Axes,
    flow: &Flow,
    widths: &BTreeMap<usize, usize>,
) -> Result<()> {
    let mut pins = Vec::new();
    for (n, before) in original.nodes().iter().enumerate() {
        if before.op_type.as_deref() != Some("Reshape") {
            continue;
        }
        let pinned = shape_flow::pin(before, axes, flow, widths).map_err(|why| {
            Error::Usage(format!("--width: {why} (please report: scope admitted it)"))
        })?;
        if let Some(dims) = pinned {
            pins.push((n, dims));
        }
    }
    for (n, dims) in pins {
        let Some(node) = merged.node.get_mut(n) else {
            continue;
        };
        let name = format!(
            "{}.mudsc_width{n}",
            node.input.get(1).map_or("shape", String::as_str)
        );
        if let Some(target) = node.input.get_mut(1) {
            target.clone_from(&name);
        }
        merged.initializer.push(TensorProto {
            name: Some(name),
            dims: vec![dims.len() as i64],
            data_type: Some(crate::onnx::DataType::I64 as i32),
            int64_data: dims,
            ..Default::default()
        });
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
