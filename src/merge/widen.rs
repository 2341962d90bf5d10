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
use super::shape_flow::{self, Axes, Elem, Flow};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto};
use crate::symmetry::rules::{attr_int, attr_mut, input, norm_axis};
use crate::symmetry::{Group, GroupKind};

/// Ops that read the shape of a value or slice it: a value whose sizes widen may reach them
/// only where [`reads_ok`] (or, for Reshape, [`shape_flow::pin`]) says so.
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
    // A per-unit scale (`Mul`: a GroupNorm export's γ, a layer scale) widens with its units,
    // as BatchNorm's and LayerNorm's do; a linear map of the units' basis (CCA) would not
    // pass through it, so only `--width` allows it.
    let also = [
        "BatchNormalization",
        "LayerNormalization",
        "Expand",
        "Mul",
        "GroupNormalization",
        // Per channel of its input: a GroupNorm export's per-group ones and zeros, when they
        // are initializers (weights of the group's blocks, merged with them).
        "InstanceNormalization",
        DEPTHWISE,
    ];
    super::dense_use::only_dense_use(g, graph, &also)?;
    if let Some(why) = flow.blocked.get(&g.id) {
        return Err(why.clone());
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
    for (value, why) in resized_constants(groups, graph, axes, &one_more) {
        why.map_err(|why| format!("'{value}' {why}"))?;
    }
    for n in graph.nodes() {
        group_norm_groups(n, axes, &one_more)?;
    }
    for (i, n) in graph.nodes().iter().enumerate() {
        match n.op_type.as_deref() {
            Some("Reshape") => {
                shape_flow::pin(n, axes, flow, &one_more)?;
            }
            Some(op) if SHAPE_READERS.contains(&op) && op != "Shape" => {
                reads_ok(graph, i, axes, flow, &one_more)?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Whether shape reader `node` (not Shape, not Reshape) still reads its data input right
/// once `widths` change some of its axes: a Gather, Slice or broadcasting Expand that leaves
/// those axes alone. Every value counts, not only the group's own: a concatenation of
/// widened ranges (a packed projection's output) changes size too.
fn reads_ok(
    graph: &Graph,
    node: usize,
    axes: &Axes,
    flow: &Flow,
    widths: &BTreeMap<usize, usize>,
) -> std::result::Result<(), String> {
    let n = graph.node(node);
    let op = n.op_type.as_deref().unwrap_or("");
    let Some(value) = input(n, 0) else {
        return Ok(());
    };
    let shape = axes.shapes.get(value).cloned().unwrap_or_default();
    let rank = shape.len();
    let changed: Vec<usize> = (0..rank)
        .filter(|&a| axes.merged_size(value, a, widths) != shape[a])
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let ints = |i: usize| flow.ints(graph, input(n, i)?);
    let leaves = |axis: i64| norm_axis(axis, rank).is_ok_and(|a| !changed.contains(&a));
    let ok = match op {
        "Gather" => leaves(attr_int(n, "axis").unwrap_or(0)),
        "Slice" => ints(3).is_some_and(|sliced| {
            sliced.iter().all(|e| match e {
                Elem::Known(a) => leaves(*a),
                _ => false,
            })
        }),
        // Broadcast along the changed axes: the target must leave them at 1.
        "Expand" => ints(1).is_some_and(|target| {
            changed.iter().all(|&axis| {
                let at = (target.len() + axis).checked_sub(rank);
                at.and_then(|i| target.get(i)) == Some(&Elem::Known(1))
            })
        }),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        let name = n.name.as_deref().unwrap_or("");
        Err(format!("'{value}' feeds {op} '{name}'"))
    }
}

/// After the rewrite: every Reshape that touches a widened group (`widths`: merged width of
/// each) gets a constant target from the merged shapes, in a new initializer; the shape
/// computations it read are left to the engine's dead-code removal.
pub fn pin_reshapes(
    path: &std::path::Path,
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
        let pinned = shape_flow::pin(before, axes, flow, widths).map_err(|why| Error::Graph {
            path: path.to_path_buf(),
            node: before.name.clone().unwrap_or_default(),
            op: "Reshape".into(),
            reason: format!("--width: {why} (the check before the merge passed it: a bug)"),
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

/// The `num_groups` a GroupNormalization node takes at the merged widths (`None`: another op,
/// or its channels keep their count), or why none fits: its channels per group stay as they
/// were (a widened group gains whole GroupNorm groups), one group over all channels stays one.
fn group_norm_groups(
    n: &NodeProto,
    axes: &Axes,
    widths: &BTreeMap<usize, usize>,
) -> std::result::Result<Option<i64>, String> {
    if n.op_type.as_deref() != Some("GroupNormalization") {
        return Ok(None);
    }
    let name = n.name.as_deref().unwrap_or("");
    let (Some(x), Some(groups)) = (input(n, 0), attr_int(n, "num_groups")) else {
        return Err(format!(
            "GroupNormalization '{name}' without input or num_groups"
        ));
    };
    let Some(&channels) = axes.shapes.get(x).and_then(|s| s.get(1)) else {
        return Err(format!(
            "GroupNormalization '{name}': channels of '{x}' unknown"
        ));
    };
    let merged = axes.merged_size(x, 1, widths);
    if merged == channels || groups == 1 {
        return Ok(None);
    }
    let per_group = channels / usize::try_from(groups).unwrap_or(1).max(1);
    if per_group == 0 || !merged.is_multiple_of(per_group) {
        return Err(format!(
            "GroupNormalization '{name}': {merged} channels do not split into groups of {per_group}"
        ));
    }
    Ok(Some((merged / per_group) as i64))
}

/// After the rewrite: every GroupNormalization over widened channels takes the merged number
/// of groups ([`group_norm_groups`]).
pub fn set_group_norm_groups(
    path: &std::path::Path,
    original: &Graph,
    merged: &mut GraphProto,
    axes: &Axes,
    widths: &BTreeMap<usize, usize>,
) -> Result<()> {
    for (i, before) in original.nodes().iter().enumerate() {
        let groups = group_norm_groups(before, axes, widths).map_err(|why| Error::Graph {
            path: path.to_path_buf(),
            node: before.name.clone().unwrap_or_default(),
            op: "GroupNormalization".into(),
            reason: format!("--width: {why} (the check before the merge passed it: a bug)"),
        })?;
        let (Some(groups), Some(node)) = (groups, merged.node.get_mut(i)) else {
            continue;
        };
        if let Some(a) = attr_mut(node, "num_groups") {
            a.i = Some(groups);
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
        if let Some(a) = attr_mut(node, "group") {
            a.i = Some(now);
        }
    }
}

/// Constants that hold widened units or blocks but are no group's weights — a GroupNorm
/// export's InstanceNormalization scale and bias, ones and zeros over the groups — with their
/// merged shape (`widths`), or why they cannot follow: one value everywhere is repeated to the
/// merged size, anything else would need a merge of its own.
fn resized_constants(
    groups: &[Group],
    graph: &Graph,
    axes: &Axes,
    widths: &BTreeMap<usize, usize>,
) -> Vec<(String, std::result::Result<Vec<usize>, &'static str>)> {
    let members: BTreeSet<&str> = groups
        .iter()
        .flat_map(|g| g.members.iter().map(|m| m.tensor.as_str()))
        .collect();
    let constant_nodes = graph
        .nodes()
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("Constant"))
        .filter_map(|n| n.output.first());
    let initializers = graph.initializers().iter().filter_map(|t| t.name.as_ref());
    let mut out = Vec::new();
    for name in constant_nodes.chain(initializers) {
        if members.contains(name.as_str()) {
            continue;
        }
        let Some(t) = graph.constant(name) else {
            continue;
        };
        let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
        let merged: Vec<usize> = (0..dims.len())
            .map(|a| axes.merged_size(name, a, widths))
            .collect();
        if merged == dims {
            continue;
        }
        let uniform = crate::onnx::TensorData::from_proto(t)
            .is_ok_and(|d| crate::with_array!(&d, a => a.iter().all(|v| a.first() == Some(v))));
        let why = if uniform {
            Ok(merged)
        } else {
            Err("holds its units and is not one value throughout")
        };
        out.push((name.clone(), why));
    }
    out
}

/// After the rewrite: every constant that [`resized_constants`] widens (a GroupNorm export's
/// per-group ones and zeros) takes its merged shape, filled with its one value.
pub fn resize_constants(
    groups: &[Group],
    original: &Graph,
    merged: &mut GraphProto,
    axes: &Axes,
    widths: &BTreeMap<usize, usize>,
) -> Result<()> {
    for (name, shape) in resized_constants(groups, original, axes, widths) {
        let Ok(shape) = shape else { continue };
        let Some(t) = original.constant(&name) else {
            continue;
        };
        let data = crate::onnx::TensorData::from_proto(t)?;
        let wide = crate::with_array!(&data, a => {
            let Some(&v) = a.first() else { continue };
            crate::onnx::IntoTensorData::into_tensor_data(ndarray::ArrayD::from_elem(shape, v))
        });
        let proto = wide.to_proto(&name);
        if let Some(init) = merged
            .initializer
            .iter_mut()
            .find(|i| i.name.as_deref() == Some(name.as_str()))
        {
            *init = proto;
            continue;
        }
        let node = merged
            .node
            .iter_mut()
            .find(|n| n.op_type.as_deref() == Some("Constant") && n.output.first() == Some(&name));
        if let Some(a) = node.and_then(|n| attr_mut(n, "value")) {
            a.t = Some(proto);
        }
    }
    Ok(())
}
