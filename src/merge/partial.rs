//! Partial zip (ZipIt §4.3): merge the network only up to a cut and keep every model's own
//! remainder after it. Deep layers of models trained on different tasks share little, and
//! merging them costs accuracy; keeping them separate costs parameters instead.
//!
//! The trunk is the cut node and everything it depends on; every other node is the
//! remainder. Each model's remainder is copied with its own initializers (and its own
//! `Constant` values) and reads the trunk's values through that model's unmerge: a merged
//! unit feeds every unit of the model that was merged into it. Because an unmerge matrix is
//! 0/1 with one 1 per row, on every axis it is a `Gather` of merged units, so the result is
//! plain ONNX with no new matmuls. The merged model has one copy of every graph output per
//! model, named `<output>.m<i>`, in model order.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;

use ndarray::ArrayD;
use serde::Serialize;

use super::units::{Layout, Matchings, Role};
use crate::error::{Error, Result};
use crate::graph::{node_label, Graph, Source};
use crate::onnx::proto::{attribute_proto, AttributeProto, NodeProto, ValueInfoProto};
use crate::onnx::{Model, TensorData};
use crate::symmetry::slots::Slots;

/// Where the merged trunk ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cut {
    /// A node (by name) or the node producing a value (by name): it and everything it
    /// depends on are merged.
    Node(String),
    /// The first `k` weight layers (Conv, ConvTranspose, Gemm, MatMul with an initializer
    /// operand) in graph order when `k > 0`; all but the last `-k` of them when `k < 0`.
    Depth(i64),
}

impl FromStr for Cut {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cut> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Usage(
                "the cut is empty: give a node name or a depth".into(),
            ));
        }
        match s.parse::<i64>() {
            Ok(0) => Err(Error::Usage(
                "depth 0 merges nothing: give a positive depth, or a negative one to keep the \
                 last layers separate"
                    .into(),
            )),
            Ok(k) => Ok(Cut::Depth(k)),
            Err(_) => Ok(Cut::Node(s.to_string())),
        }
    }
}

/// The merged part of the graph.
#[derive(Clone, Debug, Serialize)]
pub struct Trunk {
    /// The node the trunk ends at.
    pub cut_node: String,
    /// Indices (in the graph's node list) of the trunk's nodes.
    #[serde(skip)]
    pub nodes: HashSet<usize>,
    /// Trunk values the remainder reads (each fed to every model through its unmerge).
    pub cut_values: Vec<String>,
    pub trunk_nodes: usize,
    pub remainder_nodes: usize,
}

/// The name of model `model`'s copy of remainder value (or node) `name`.
pub(super) fn copy_name(name: &str, model: usize) -> String {
    format!("{name}.m{model}")
}

/// Nodes that carry a layer's weights: what `Cut::Depth` counts.
fn weight_layers(graph: &Graph) -> Vec<usize> {
    graph
        .topological_order()
        .iter()
        .copied()
        .filter(|&n| {
            let node = graph.node(n);
            matches!(
                node.op_type.as_deref(),
                Some("Conv" | "ConvTranspose" | "Gemm" | "MatMul")
            ) && node.input.iter().any(|i| graph.initializer(i).is_some())
        })
        .collect()
}

/// Resolves the cut on `graph` into its trunk.
pub fn trunk(graph: &Graph, cut: &Cut) -> Result<Trunk> {
    let nodes = graph.nodes();
    let end = match cut {
        Cut::Node(name) => nodes
            .iter()
            .position(|n| n.name.as_deref() == Some(name.as_str()))
            .or_else(|| match graph.source(name) {
                Some(Source::Node { node, .. }) => Some(node),
                _ => None,
            })
            .ok_or_else(|| {
                Error::Usage(format!(
                    "--zip-until '{name}': no node, and no value produced by a node, has that \
                     name (`mudsc inspect` lists them)"
                ))
            })?,
        Cut::Depth(k) => {
            let layers = weight_layers(graph);
            let index = if *k > 0 {
                usize::try_from(*k - 1).ok()
            } else {
                (layers.len() as i64 + *k - 1).try_into().ok()
            };
            *index.and_then(|i| layers.get(i)).ok_or_else(|| {
                Error::Usage(format!(
                    "--zip-until {k}: the model has {} weight layers (Conv, Gemm, MatMul with \
                     weights); give a depth in 1..={} or -{}..=-1",
                    layers.len(),
                    layers.len(),
                    layers.len().saturating_sub(1)
                ))
            })?
        }
    };
    // The cut node and its ancestors.
    let mut inside = HashSet::new();
    let mut stack = vec![end];
    while let Some(n) = stack.pop() {
        if !inside.insert(n) {
            continue;
        }
        for value in &nodes[n].input {
            if let Some(Source::Node { node, .. }) = graph.source(value) {
                stack.push(node);
            }
        }
    }
    let mut cut_values = BTreeSet::new();
    for (n, node) in nodes.iter().enumerate() {
        if inside.contains(&n) {
            continue;
        }
        for value in &node.input {
            if let Some(Source::Node { node: p, .. }) = graph.source(value) {
                if inside.contains(&p) {
                    cut_values.insert(value.clone());
                }
            }
        }
    }
    Ok(Trunk {
        cut_node: node_label(&nodes[end], end),
        trunk_nodes: inside.len(),
        remainder_nodes: nodes.len() - inside.len(),
        nodes: inside,
        cut_values: cut_values.into_iter().collect(),
    })
}

/// What the matchings and discovery say about the trunk's values.
pub struct Unmerge<'a> {
    pub layout: &'a Layout<'a>,
    pub slots: &'a Slots,
    pub m: &'a Matchings,
}

/// Replaces `merged`'s remainder (nodes outside `trunk`) by one copy per model, each with
/// that model's own initializers and `Constant`s, reading the trunk through its unmerge.
/// `models[i]`'s value names are found through `names[i]` (model-0 name → model i's).
pub fn split(
    merged: &mut Model,
    models: &[Model],
    names: &[HashMap<String, String>],
    trunk: &Trunk,
    unmerge: &Unmerge,
) -> Result<()> {
    if trunk.remainder_nodes == 0 {
        return Ok(());
    }
    let base = merged.clone();
    let graph = Graph::new(&base)?;
    let unsupported = |reason: String| Error::Unsupported {
        path: models[0]
            .path
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from("<memory>")),
        reason,
    };
    for sub in graph.subgraphs() {
        if !trunk.nodes.contains(&sub.node) {
            return Err(unsupported(format!(
                "partial zip cannot copy node '{}' ({}): it holds a subgraph; cut after it",
                sub.node_name, sub.op_type
            )));
        }
    }
    let remainder: Vec<usize> = graph
        .topological_order()
        .iter()
        .copied()
        .filter(|n| !trunk.nodes.contains(n))
        .collect();
    let produced_in_remainder: HashSet<&str> = remainder
        .iter()
        .flat_map(|&n| graph.node(n).output.iter().map(String::as_str))
        .collect();
    let read_by_trunk: HashSet<&str> = trunk
        .nodes
        .iter()
        .flat_map(|&n| graph.node(n).input.iter().map(String::as_str))
        .collect();
    let remainder_weights: BTreeSet<&str> = remainder
        .iter()
        .flat_map(|&n| graph.node(n).input.iter().map(String::as_str))
        .filter(|v| graph.initializer(v).is_some())
        .collect();
    let taken: HashSet<String> = base
        .graph()
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output).cloned())
        .chain(
            base.graph()
                .initializer
                .iter()
                .filter_map(|t| t.name.clone()),
        )
        .collect();
    let fresh = |name: String| -> Result<String> {
        if taken.contains(&name) {
            Err(unsupported(format!(
                "partial zip would name a new value '{name}', which the model already uses"
            )))
        } else {
            Ok(name)
        }
    };

    let mut new_nodes: Vec<NodeProto> = trunk_in_order(&graph, trunk);
    let mut new_inits: Vec<_> = base
        .graph()
        .initializer
        .iter()
        .filter(|t| {
            let n = t.name.as_deref().unwrap_or("");
            !remainder_weights.contains(n) || read_by_trunk.contains(n)
        })
        .cloned()
        .collect();
    let mut new_outputs: Vec<ValueInfoProto> = Vec::new();
    for (i, model) in models.iter().enumerate() {
        let own = |v: &str| names[i].get(v).cloned().unwrap_or(v.to_string());
        let mut rename: HashMap<String, String> = HashMap::new();
        // The trunk's values, in this model's coordinates.
        for value in &trunk.cut_values {
            let fed = unmerge_value(value, i, unmerge, &fresh, &mut new_nodes, &mut new_inits)?;
            rename.insert(value.clone(), fed);
        }
        for v in produced_in_remainder.iter().chain(&remainder_weights) {
            rename.insert(v.to_string(), fresh(copy_name(v, i))?);
        }
        let by_name: HashMap<&str, _> = model
            .graph()
            .initializer
            .iter()
            .filter_map(|t| Some((t.name.as_deref()?, t)))
            .collect();
        for w in &remainder_weights {
            let t = by_name.get(own(w).as_str()).ok_or_else(|| {
                Error::tensor(own(w), format!("missing from {}", model.display_name()))
            })?;
            let mut t = (*t).clone();
            t.name = Some(rename[*w].clone());
            new_inits.push(t);
        }
        for &n in &remainder {
            // The model's own node: its attributes (and Constant values) are its own.
            let mine = model.graph().node.get(n).unwrap_or(graph.node(n));
            let shape = graph.node(n);
            let map = |v: &String| rename.get(v).cloned().unwrap_or(v.clone());
            new_nodes.push(NodeProto {
                input: shape.input.iter().map(map).collect(),
                output: shape.output.iter().map(map).collect(),
                name: Some(copy_name(&node_label(shape, n), i)),
                ..mine.clone()
            });
        }
        for out in graph.outputs() {
            let name = out.name.clone().unwrap_or_default();
            match rename.get(&name) {
                // A remainder value, or a remainder weight that is itself a graph output:
                // one copy per model.
                Some(r)
                    if produced_in_remainder.contains(name.as_str())
                        || remainder_weights.contains(name.as_str()) =>
                {
                    new_outputs.push(ValueInfoProto {
                        name: Some(r.clone()),
                        ..out.clone()
                    })
                }
                // Computed in the trunk: the one merged value serves every model.
                _ if i == 0 => new_outputs.push(out.clone()),
                _ => {}
            }
        }
    }
    let renamed: HashSet<&str> = produced_in_remainder.iter().copied().collect();
    let Some(g) = merged.proto.graph.as_mut() else {
        return Ok(());
    };
    g.node = new_nodes;
    // Models of IR < 4 list initializers among the graph inputs too: the copies take the
    // place of the originals there, and an original no longer stored leaves the list.
    let stored: HashSet<String> = new_inits.iter().filter_map(|t| t.name.clone()).collect();
    let listed: Vec<ValueInfoProto> = std::mem::take(&mut g.input);
    for vi in listed {
        let name = vi.name.clone().unwrap_or_default();
        if remainder_weights.contains(name.as_str()) {
            for i in 0..models.len() {
                let copy = copy_name(&name, i);
                if stored.contains(&copy) {
                    g.input.push(ValueInfoProto {
                        name: Some(copy),
                        ..vi.clone()
                    });
                }
            }
            if stored.contains(&name) {
                g.input.push(vi);
            }
        } else {
            g.input.push(vi);
        }
    }
    // The same rule for the initializers the split adds (the unmerges' Gather indices): an
    // IR 3 model must list them among its inputs, or checkers and engines reject it.
    if merged.proto.ir_version.is_some_and(|v| v < 4) {
        let listed: HashSet<String> = g.input.iter().filter_map(|v| v.name.clone()).collect();
        let old: HashSet<&str> = base
            .graph()
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        for t in &new_inits {
            let name = t.name.clone().unwrap_or_default();
            if !listed.contains(&name) && !old.contains(name.as_str()) {
                g.input.push(crate::onnx::initializer_input(t));
            }
        }
    }
    g.initializer = new_inits;
    g.output = new_outputs;
    // Shapes recorded for values that now exist once per model would be stale.
    g.value_info
        .retain(|v| !renamed.contains(v.name.as_deref().unwrap_or("")));
    Ok(())
}

/// The trunk's nodes in their original order.
fn trunk_in_order(graph: &Graph, trunk: &Trunk) -> Vec<NodeProto> {
    (0..graph.nodes().len())
        .filter(|n| trunk.nodes.contains(n))
        .map(|n| graph.node(n).clone())
        .collect()
}

/// Adds `Gather`s that take `value` from merged units to model `model`'s units on every
/// grouped axis; returns the name the model's remainder reads (the value itself when no
/// axis moves).
fn unmerge_value(
    value: &str,
    model: usize,
    u: &Unmerge,
    fresh: &dyn Fn(String) -> Result<String>,
    nodes: &mut Vec<NodeProto>,
    inits: &mut Vec<crate::onnx::proto::TensorProto>,
) -> Result<String> {
    let Some(axes) = u.slots.of(value) else {
        return Ok(value.to_string());
    };
    let mut current = value.to_string();
    for (axis, slot) in axes.iter().enumerate() {
        let Some(slot) = slot else { continue };
        let Some(r) = u
            .layout
            .axis_map(u.layout.st.comp_of[*slot], u.m, model, Role::Unmerge)
        else {
            continue;
        };
        // Row k of the unmerge is model unit k; its single 1 is the merged unit it reads.
        let index: Vec<i64> = r
            .to_dense()
            .rows()
            .into_iter()
            .enumerate()
            .map(|(k, row)| {
                let ones: Vec<usize> = (0..row.len()).filter(|&j| row[j] > 0.5).collect();
                match ones.as_slice() {
                    [j] => Ok(*j as i64),
                    _ => Err(Error::tensor(
                        value,
                        format!(
                            "unit {k} on axis {axis} does not come from exactly one merged unit"
                        ),
                    )),
                }
            })
            .collect::<Result<_>>()?;
        if index.iter().enumerate().all(|(k, &j)| j == k as i64) {
            continue;
        }
        let indices = fresh(format!("{value}.unmerge{model}.axis{axis}.index"))?;
        let out = fresh(format!("{value}.unmerge{model}.axis{axis}"))?;
        let len = index.len();
        inits.push(
            TensorData::I64(
                ArrayD::from_shape_vec(vec![len], index)
                    .map_err(|e| Error::tensor(value, e.to_string()))?,
            )
            .to_proto(&indices),
        );
        nodes.push(NodeProto {
            input: vec![current, indices],
            output: vec![out.clone()],
            name: Some(out.clone()),
            op_type: Some("Gather".into()),
            attribute: vec![AttributeProto {
                name: Some("axis".into()),
                i: Some(axis as i64),
                r#type: Some(attribute_proto::AttributeType::Int as i32),
                ..Default::default()
            }],
            ..Default::default()
        });
        current = out;
    }
    Ok(current)
}
