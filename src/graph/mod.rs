//! A read-only graph view of an ONNX model: op nodes joined by value edges, with fast producer
//! and consumer lookup, initializers, `Constant` values, graph inputs and outputs, a topological
//! order, and the subgraphs (If/Loop/Scan bodies) that discovery must treat with care.

mod compare;
mod shapes;

use std::collections::HashMap;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{Error, Result};
use crate::onnx::proto::{GraphProto, NodeProto, TensorProto, ValueInfoProto};
use crate::onnx::Model;

pub use compare::{same_architecture, value_map};
pub use shapes::{
    declared as shapes_declared, infer_shapes, infer_shapes_with_weights,
    infer_shapes_without_weights, Dim, ShapeMap,
};

/// Where a value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A real graph input (fed at run time).
    Input,
    /// A stored weight.
    Initializer,
    /// Output `slot` of node `node` (index into the graph's node list).
    Node { node: usize, slot: usize },
}

/// A node attribute holding a subgraph.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subgraph {
    pub node: usize,
    pub node_name: String,
    pub op_type: String,
    pub attribute: String,
}

/// Graph view over a model's main graph. Indices are positions in `GraphProto.node`.
pub struct Graph<'m> {
    proto: &'m GraphProto,
    dag: DiGraph<usize, String>,
    sources: HashMap<&'m str, Source>,
    consumers: HashMap<&'m str, Vec<(usize, usize)>>,
    initializers: HashMap<&'m str, &'m TensorProto>,
    constants: HashMap<&'m str, &'m TensorProto>,
    value_infos: HashMap<&'m str, &'m ValueInfoProto>,
    order: Vec<usize>,
    subgraphs: Vec<Subgraph>,
}

impl<'m> Graph<'m> {
    /// Builds the view; errors name the node when the graph is not a DAG or a value is
    /// produced twice or consumed without a producer.
    pub fn new(model: &'m Model) -> Result<Graph<'m>> {
        let proto = model.graph();
        let node_err = |i: usize, reason: String| {
            let n = &proto.node[i];
            Error::Graph {
                path: model.path.clone().unwrap_or_else(|| "<memory>".into()),
                node: node_label(n, i),
                op: n.op_type.clone().unwrap_or_default(),
                reason,
            }
        };

        let initializers: HashMap<&str, &TensorProto> = proto
            .initializer
            .iter()
            .filter_map(|t| Some((t.name.as_deref()?, t)))
            .collect();
        let mut sources: HashMap<&str, Source> = HashMap::new();
        for name in initializers.keys() {
            sources.insert(name, Source::Initializer);
        }
        // Older exporters list initializers as graph inputs too: those stay initializers.
        for vi in &proto.input {
            if let Some(name) = vi.name.as_deref() {
                sources.entry(name).or_insert(Source::Input);
            }
        }

        let mut dag = DiGraph::with_capacity(proto.node.len(), proto.node.len() * 2);
        let ids: Vec<NodeIndex> = (0..proto.node.len()).map(|i| dag.add_node(i)).collect();
        let mut constants = HashMap::new();
        let mut subgraphs = Vec::new();
        for (i, node) in proto.node.iter().enumerate() {
            for (slot, out) in node.output.iter().enumerate() {
                if out.is_empty() {
                    continue; // optional output left unused
                }
                if let Some(Source::Node { node: other, .. }) =
                    sources.insert(out, Source::Node { node: i, slot })
                {
                    return Err(node_err(
                        i,
                        format!(
                            "value '{out}' is also produced by node '{}'",
                            node_label(&proto.node[other], other)
                        ),
                    ));
                }
            }
            if node.op_type.as_deref() == Some("Constant") && node.domain_is_default() {
                if let (Some(out), Some(t)) = (
                    node.output.first(),
                    node.attribute.iter().find_map(|a| a.t.as_ref()),
                ) {
                    constants.insert(out.as_str(), t);
                }
            }
            for attr in &node.attribute {
                if attr.g.is_some() || !attr.graphs.is_empty() {
                    subgraphs.push(Subgraph {
                        node: i,
                        node_name: node_label(node, i),
                        op_type: node.op_type.clone().unwrap_or_default(),
                        attribute: attr.name.clone().unwrap_or_default(),
                    });
                }
            }
        }

        let mut consumers: HashMap<&str, Vec<(usize, usize)>> = HashMap::new();
        for (i, node) in proto.node.iter().enumerate() {
            for (slot, inp) in node.input.iter().enumerate() {
                if inp.is_empty() {
                    continue; // optional input left out
                }
                match sources.get(inp.as_str()) {
                    Some(Source::Node { node: p, .. }) => {
                        dag.add_edge(ids[*p], ids[i], inp.clone());
                    }
                    Some(_) => {}
                    None if !subgraphs.is_empty() => {} // may be an outer-scope value
                    None => {
                        return Err(node_err(i, format!("input '{inp}' has no producer")));
                    }
                }
                consumers.entry(inp.as_str()).or_default().push((i, slot));
            }
        }

        for out in &proto.output {
            let name = out.name.as_deref().unwrap_or("");
            if !sources.contains_key(name) {
                return Err(Error::Unsupported {
                    path: model.path.clone().unwrap_or_else(|| "<memory>".into()),
                    reason: format!(
                        "graph output '{name}' is produced by no node, input or initializer"
                    ),
                });
            }
        }
        check_attributes(proto, &|node: &NodeProto, i: usize, reason: String| {
            Error::Graph {
                path: model.path.clone().unwrap_or_else(|| "<memory>".into()),
                node: node_label(node, i),
                op: node.op_type.clone().unwrap_or_default(),
                reason,
            }
        })?;

        let order = petgraph::algo::toposort(&dag, None)
            .map_err(|cycle| node_err(dag[cycle.node_id()], "the graph has a cycle".into()))?
            .into_iter()
            .map(|id| dag[id])
            .collect();

        let value_infos = proto
            .input
            .iter()
            .chain(&proto.output)
            .chain(&proto.value_info)
            .filter_map(|vi| Some((vi.name.as_deref()?, vi)))
            .collect();

        Ok(Graph {
            proto,
            dag,
            sources,
            consumers,
            initializers,
            constants,
            value_infos,
            order,
            subgraphs,
        })
    }

    pub fn nodes(&self) -> &'m [NodeProto] {
        &self.proto.node
    }

    pub fn node(&self, index: usize) -> &'m NodeProto {
        &self.proto.node[index]
    }

    /// Node indices in a topological order.
    pub fn topological_order(&self) -> &[usize] {
        &self.order
    }

    /// The petgraph DAG (node weights are node indices, edge weights value names).
    pub fn dag(&self) -> &DiGraph<usize, String> {
        &self.dag
    }

    pub fn source(&self, value: &str) -> Option<Source> {
        self.sources.get(value).copied()
    }

    /// The node producing `value`, if any.
    pub fn producer(&self, value: &str) -> Option<&'m NodeProto> {
        match self.source(value)? {
            Source::Node { node, .. } => Some(&self.proto.node[node]),
            _ => None,
        }
    }

    /// `(node, input slot)` pairs that read `value`.
    pub fn consumers(&self, value: &str) -> &[(usize, usize)] {
        self.consumers.get(value).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn initializer(&self, name: &str) -> Option<&'m TensorProto> {
        self.initializers.get(name).copied()
    }

    pub fn initializers(&self) -> &'m [TensorProto] {
        &self.proto.initializer
    }

    /// A constant value: an initializer or the output of a `Constant` node.
    pub fn constant(&self, name: &str) -> Option<&'m TensorProto> {
        self.initializer(name)
            .or_else(|| self.constants.get(name).copied())
    }

    /// Integer contents of a constant value (initializer or `Constant` node output); `None`
    /// for a float tensor, whose data is not decoded (a shape reader's scan meets every
    /// weight).
    pub fn const_ints(&self, name: &str) -> Option<Vec<i64>> {
        let t = self.constant(name)?;
        let integer = crate::onnx::DataType::from_onnx(t.data_type.unwrap_or(0))
            .is_some_and(crate::onnx::DataType::is_integer);
        if !integer {
            return None;
        }
        crate::onnx::TensorData::from_proto(t).ok()?.to_labels()
    }

    /// Graph inputs fed at run time (initializers listed as inputs excluded).
    pub fn inputs(&self) -> Vec<&'m ValueInfoProto> {
        self.proto
            .input
            .iter()
            .filter(|vi| {
                vi.name
                    .as_deref()
                    .is_some_and(|n| self.sources.get(n) == Some(&Source::Input))
            })
            .collect()
    }

    pub fn outputs(&self) -> &'m [ValueInfoProto] {
        &self.proto.output
    }

    /// Declared type information for a value (graph input/output or `value_info`).
    pub fn value_info(&self, name: &str) -> Option<&'m ValueInfoProto> {
        self.value_infos.get(name).copied()
    }

    /// Nodes whose attributes hold subgraphs.
    pub fn subgraphs(&self) -> &[Subgraph] {
        &self.subgraphs
    }
}

impl NodeProto {
    /// Whether the node is in the default ONNX operator domain.
    pub fn domain_is_default(&self) -> bool {
        matches!(self.domain.as_deref(), None | Some("") | Some("ai.onnx"))
    }
}

/// Attribute values that no valid model holds and that the inference engines do not survive
/// (tract loops without end on a `Transpose` whose `perm` repeats an axis), checked in the
/// graph and every subgraph.
fn check_attributes(
    graph: &GraphProto,
    err: &dyn Fn(&NodeProto, usize, String) -> Error,
) -> Result<()> {
    for (i, node) in graph.node.iter().enumerate() {
        for attr in &node.attribute {
            if node.op_type.as_deref() == Some("Transpose")
                && node.domain_is_default()
                && attr.name.as_deref() == Some("perm")
            {
                let mut seen = vec![false; attr.ints.len()];
                for &axis in &attr.ints {
                    match usize::try_from(axis).ok().and_then(|a| seen.get_mut(a)) {
                        Some(s) if !*s => *s = true,
                        _ => {
                            return Err(err(
                                node,
                                i,
                                format!("perm {:?} is not a permutation of its axes", attr.ints),
                            ))
                        }
                    }
                }
            }
            for g in attr.g.iter().chain(&attr.graphs) {
                check_attributes(g, err)?;
            }
        }
    }
    Ok(())
}

/// A node's name for messages; unnamed nodes get `#index`.
pub fn node_label(node: &NodeProto, index: usize) -> String {
    match node.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => format!("#{index}"),
    }
}
