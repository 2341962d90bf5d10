//! Symmetry discovery: which axes of which tensors must be permuted together for the network to
//! compute the same function, found from the graph alone.
//!
//! 1. Every axis of every tensor with a known shape becomes a slot ([`slots`]).
//! 2. One rule per op family ([`rules`]) relates the slots of a node's inputs and outputs.
//! 3. Relations resolve into components ([`structure`]); the free leaves with weights on them
//!    are the unit groups ([`groups`]).
//! 4. [`check`] proves the result on the model itself: random permutations of every group
//!    must leave the outputs unchanged.
//!
//! Soundness first: an op without a rule, a rule whose premise fails, graph inputs and outputs,
//! and everything read inside subgraphs are fixed, each with its reason.

pub mod check;
pub mod expect;
pub mod groups;
pub mod permute;
pub mod rules;
pub mod slots;
pub mod spec;
pub mod structure;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::Result;
use crate::graph::{node_label, Graph, ShapeMap};
use crate::onnx::proto::GraphProto;
use crate::onnx::{DataType, Model, TensorData};

pub use groups::{Group, GroupKind, Member};
use slots::{SlotKind, Slots};
use structure::Structure;

/// A weight axis that stays in place, and why.
#[derive(Clone, Debug, Serialize)]
pub struct FixedAxis {
    pub tensor: String,
    pub axis: usize,
    pub size: usize,
    pub reasons: Vec<String>,
}

/// The result of discovery on one model.
pub struct Discovery {
    pub groups: Vec<Group>,
    pub fixed: Vec<FixedAxis>,
    /// Op types without a rule (their axes are fixed), with counts.
    pub unknown_ops: BTreeMap<String, usize>,
    pub slots: Slots,
    pub structure: Structure,
}

/// Discovers the unit groups of `model`, given concrete shapes of its values (see
/// [`crate::graph::infer_shapes`]).
pub fn discover(model: &Model, shapes: &ShapeMap) -> Result<Discovery> {
    let graph = Graph::new(model)?;
    let mut slots = Slots::default();
    register_tensors(&graph, shapes, &mut slots);

    for vi in graph.inputs() {
        slots.fix_tensor(vi.name.as_deref().unwrap_or(""), "graph input");
    }
    for vi in graph.outputs() {
        slots.fix_tensor(vi.name.as_deref().unwrap_or(""), "graph output");
    }

    let mut unknown_ops = BTreeMap::new();
    let mut unstacked = rules::Unstacked::new();
    for &n in graph.topological_order() {
        let node = graph.node(n);
        let op = node.op_type.clone().unwrap_or_default();
        let rule = if node.domain_is_default() {
            rules::rule_for(&op)
        } else {
            None
        };
        let failure = match rule {
            Some(rule) => {
                let mut ctx = rules::Ctx {
                    slots: &mut slots,
                    graph: &graph,
                    shapes,
                    unstacked: &mut unstacked,
                };
                rule(&mut ctx, node).err()
            }
            None => {
                let qualified = match node.domain.as_deref() {
                    Some(d) if !node.domain_is_default() => format!("{d}::{op}"),
                    _ => op.clone(),
                };
                *unknown_ops.entry(qualified.clone()).or_insert(0) += 1;
                Some(format!("op {qualified} has no symmetry rule"))
            }
        };
        if let Some(reason) = failure {
            let reason = format!("node '{}' ({op}): {reason}", node_label(node, n));
            for v in node
                .input
                .iter()
                .chain(&node.output)
                .filter(|v| !v.is_empty())
            {
                slots.fix_tensor(v, &reason);
            }
        }
        for attr in &node.attribute {
            for g in attr.g.iter().chain(&attr.graphs) {
                let reason = format!("read inside a subgraph of node '{}'", node_label(node, n));
                for v in subgraph_reads(g) {
                    slots.fix_tensor(&v, &reason);
                }
            }
        }
    }

    fix_unrewritable_constants(&graph, &mut slots);
    let structure = structure::resolve(&mut slots);
    // Developer aid: MUDSC_DEBUG_STRUCTURE=1 prints every component (size, definition,
    // block, fixed reasons, first slots) to stderr, the quickest way to see why an axis is
    // fixed or two axes are (not) grouped.
    if std::env::var_os("MUDSC_DEBUG_STRUCTURE").is_some() {
        for (i, c) in structure.comps.iter().enumerate() {
            let names: Vec<String> = c
                .slots
                .iter()
                .take(6)
                .map(|&s| format!("{}:{:?}", slots.slots[s].tensor, slots.slots[s].axis))
                .collect();
            eprintln!(
                "c{i} size {} {:?} block_of {:?} fixed {:?} slots {}",
                c.size,
                c.def,
                c.block_of,
                c.fixed,
                names.join(" ")
            );
        }
    }
    let groups = groups::build(&structure, &slots, &graph);
    let fixed = fixed_weight_axes(&structure, &slots);
    Ok(Discovery {
        groups,
        fixed,
        unknown_ops,
        slots,
        structure,
    })
}

/// Slots for every value with a shape, in graph order so that ids are deterministic.
fn register_tensors(graph: &Graph, shapes: &ShapeMap, slots: &mut Slots) {
    let mut add = |name: &str, kind: SlotKind| {
        if let Some(shape) = shapes.get(name) {
            slots.add_tensor(name, shape, kind);
        }
    };
    for vi in graph.inputs() {
        add(vi.name.as_deref().unwrap_or(""), SlotKind::Activation);
    }
    for t in graph.initializers() {
        let float = matches!(
            DataType::from_onnx(t.data_type.unwrap_or(0)),
            Some(DataType::F32 | DataType::F64 | DataType::F16 | DataType::BF16)
        );
        let kind = if float {
            SlotKind::Weight
        } else {
            SlotKind::Constant
        };
        add(t.name.as_deref().unwrap_or(""), kind);
    }
    for &n in graph.topological_order() {
        let node = graph.node(n);
        let kind = if node.op_type.as_deref() == Some("Constant") {
            SlotKind::Constant
        } else {
            SlotKind::Activation
        };
        for o in node.output.iter().filter(|o| !o.is_empty()) {
            add(o, kind);
        }
    }
}

/// Constants that are not rewritten (Constant nodes, integer initializers) may only sit on a
/// permuted axis if they hold the same values all along it (GroupNorm's exported all-ones
/// scale, a zero bias): then every permutation leaves them unchanged.
fn fix_unrewritable_constants(graph: &Graph, slots: &mut Slots) {
    let constants: Vec<(usize, String, usize)> = slots
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == SlotKind::Constant)
        .filter_map(|(i, s)| Some((i, s.tensor.clone(), s.axis?)))
        .collect();
    for (s, tensor, axis) in constants {
        let uniform = graph
            .constant(&tensor)
            .and_then(|t| TensorData::from_proto(t).ok())
            .is_some_and(|t| uniform_along(&t.to_f32(), axis));
        if !uniform {
            slots.fix(
                s,
                &format!("'{tensor}' is a constant that is not rewritten"),
            );
        }
    }
}

fn uniform_along(a: &ndarray::ArrayD<f32>, axis: usize) -> bool {
    use ndarray::Axis;
    if axis >= a.ndim() || a.len_of(Axis(axis)) < 2 {
        return true;
    }
    let first = a.index_axis(Axis(axis), 0);
    a.axis_iter(Axis(axis)).all(|lane| {
        lane.iter()
            .zip(first.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
    })
}

/// Every value name a subgraph reads (recursively), including outer-scope ones.
fn subgraph_reads(g: &GraphProto) -> Vec<String> {
    let mut out = Vec::new();
    for node in &g.node {
        out.extend(node.input.iter().filter(|i| !i.is_empty()).cloned());
        for attr in &node.attribute {
            for sub in attr.g.iter().chain(&attr.graphs) {
                out.extend(subgraph_reads(sub));
            }
        }
    }
    out
}

fn fixed_weight_axes(st: &Structure, slots: &Slots) -> Vec<FixedAxis> {
    slots
        .slots
        .iter()
        .enumerate()
        .filter(|(_, s)| s.kind == SlotKind::Weight)
        .filter_map(|(i, s)| {
            let comp = &st.comps[st.comp_of[i]];
            comp.is_fixed().then(|| FixedAxis {
                tensor: s.tensor.clone(),
                axis: s.axis.unwrap_or(0),
                size: s.size,
                reasons: comp.fixed.clone(),
            })
        })
        .collect()
}

impl Discovery {
    /// The leaves `check` and matching permute: `(leaf, block component)` per group.
    pub fn leaves(&self) -> Vec<(structure::CompId, Option<structure::CompId>)> {
        self.groups.iter().map(|g| (g.leaf, g.block)).collect()
    }
}
