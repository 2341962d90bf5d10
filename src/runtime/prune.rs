//! A model cut down to the nodes its outputs need, for ONNX Runtime.
//!
//! ONNX Runtime runs every node of a session's graph, whatever outputs a run fetches
//! (microsoft/onnxruntime#16483; its `only_execute_path_to_fetches` serves training builds
//! only). A session asked for a value early in the graph ran the whole model: the output
//! refit's pass for each layer's inputs cost a full pass of the merged model, however early
//! the layer. tract prunes what no output needs when it optimises; this gives ONNX Runtime
//! the same graph. The output refit's frontier (`merge::frontier`) builds its step models from
//! the same walk and shell, on either engine.

use std::collections::{HashMap, HashSet};

use prost::encoding::{encode_key, encode_varint, message, WireType};
use prost::Message;

use crate::onnx::proto::{GraphProto, ModelProto, NodeProto};

/// `ModelProto.graph`'s and `GraphProto.initializer`'s field numbers (onnx.proto).
const MODEL_GRAPH: u32 = 7;
const GRAPH_INITIALIZER: u32 = 5;

/// Per node of `graph`, whether computing `outputs` needs it; `None` when every node is
/// needed (nothing to prune), or when a node holds a subgraph (`producers`).
#[cfg_attr(not(feature = "ort"), allow(dead_code))] // ONNX Runtime's sessions only
pub(crate) fn needed_nodes(graph: &GraphProto, outputs: &[String]) -> Option<Vec<bool>> {
    producers(graph, outputs).filter(|needed| !needed.iter().all(|&n| n))
}

/// Per node of `graph`, whether computing `outputs` needs it (every node included); `None`
/// when a node holds a subgraph (its body may read any outer value by name, so what it needs
/// is not in its inputs).
pub(crate) fn producers(graph: &GraphProto, outputs: &[String]) -> Option<Vec<bool>> {
    if graph.node.iter().any(has_subgraph) {
        return None;
    }
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(k, n)| n.output.iter().map(move |o| (o.as_str(), k)))
        .collect();
    let mut needed = vec![false; graph.node.len()];
    let mut pending: Vec<&str> = outputs.iter().map(String::as_str).collect();
    while let Some(name) = pending.pop() {
        let Some(&k) = producer.get(name) else {
            continue; // a graph input or an initializer
        };
        if !needed[k] {
            needed[k] = true;
            pending.extend(graph.node[k].input.iter().map(String::as_str));
        }
    }
    Some(needed)
}

/// The nodes of `graph` that `keep` marks, in order.
pub(crate) fn kept_nodes<'g>(
    graph: &'g GraphProto,
    keep: &'g [bool],
) -> impl Iterator<Item = &'g NodeProto> {
    graph.node.iter().zip(keep).filter(|p| *p.1).map(|p| p.0)
}

fn has_subgraph(node: &NodeProto) -> bool {
    node.attribute
        .iter()
        .any(|a| a.g.is_some() || !a.graphs.is_empty())
}

/// The initializers a pruned graph keeps: those its `keep` nodes read, those the graph lists
/// as inputs (they would otherwise become inputs to feed) and those asked for as `outputs`.
#[cfg_attr(not(feature = "ort"), allow(dead_code))] // ONNX Runtime's sessions only
fn kept_initializers(graph: &GraphProto, keep: &[bool], outputs: &[String]) -> HashSet<String> {
    kept_nodes(graph, keep)
        .flat_map(|n| n.input.iter())
        .chain(graph.input.iter().filter_map(|i| i.name.as_ref()))
        .chain(outputs)
        .cloned()
        .collect()
}

/// `model` encoded with only the `keep` nodes and their initializers (`kept_initializers`,
/// for `outputs`). The initializers are encoded one by one after the rest, as further
/// occurrences of the graph field that a protobuf parser merges into one graph: no copy of
/// the weights is made.
#[cfg_attr(not(feature = "ort"), allow(dead_code))] // ONNX Runtime's sessions only
pub(crate) fn encode_pruned(model: &ModelProto, keep: &[bool], outputs: &[String]) -> Vec<u8> {
    let Some(graph) = model.graph.as_ref() else {
        return model.encode_to_vec();
    };
    let nodes: Vec<NodeProto> = kept_nodes(graph, keep).cloned().collect();
    let read = kept_initializers(graph, keep, outputs);
    let shell = with_graph(
        model,
        GraphProto {
            node: nodes,
            initializer: Vec::new(),
            ..graph_fields(graph)
        },
    );
    let mut bytes = shell.encode_to_vec();
    for t in &graph.initializer {
        if t.name.as_deref().is_some_and(|n| read.contains(n)) {
            encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut bytes);
            encode_varint(
                message::encoded_len(GRAPH_INITIALIZER, t) as u64,
                &mut bytes,
            );
            message::encode(GRAPH_INITIALIZER, t, &mut bytes);
        }
    }
    bytes
}

/// `model` with `graph` as its graph: every other field as it is, in an exhaustive literal,
/// so that a field added to onnx.proto is not dropped unseen.
pub(crate) fn with_graph(model: &ModelProto, graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: model.ir_version,
        opset_import: model.opset_import.clone(),
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        metadata_props: model.metadata_props.clone(),
        training_info: model.training_info.clone(),
        functions: model.functions.clone(),
        configuration: model.configuration.clone(),
        graph: Some(graph),
    }
}

/// `graph`'s fields but its nodes and initializers (left empty), in an exhaustive literal.
pub(crate) fn graph_fields(graph: &GraphProto) -> GraphProto {
    GraphProto {
        node: Vec::new(),
        name: graph.name.clone(),
        initializer: Vec::new(),
        sparse_initializer: graph.sparse_initializer.clone(),
        doc_string: graph.doc_string.clone(),
        input: graph.input.clone(),
        output: graph.output.clone(),
        value_info: graph.value_info.clone(),
        quantization_annotation: graph.quantization_annotation.clone(),
        metadata_props: graph.metadata_props.clone(),
    }
}

/// `graph` with only the `keep` nodes and their initializers (`kept_initializers`, for
/// `outputs`), in place.
#[cfg_attr(not(feature = "ort"), allow(dead_code))] // ONNX Runtime's sessions only
pub(crate) fn retain(graph: &mut GraphProto, keep: &[bool], outputs: &[String]) {
    let read = kept_initializers(graph, keep, outputs);
    let mut flags = keep.iter();
    graph.node.retain(|_| flags.next().copied().unwrap_or(true));
    graph
        .initializer
        .retain(|t| t.name.as_ref().is_some_and(|n| read.contains(n)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{AttributeProto, TensorProto, ValueInfoProto};

    fn node(name: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            name: Some(name.into()),
            op_type: Some("Add".into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn tensor(name: &str, values: &[f32]) -> TensorProto {
        TensorProto {
            name: Some(name.into()),
            dims: vec![values.len() as i64],
            data_type: Some(1),
            float_data: values.to_vec(),
            ..Default::default()
        }
    }

    fn value(name: &str) -> ValueInfoProto {
        ValueInfoProto {
            name: Some(name.into()),
            ..Default::default()
        }
    }

    /// x → a (+ wa) → b (+ wb) → out, and a side branch a → side (+ ws); nodes out of
    /// graph order, so that the walk must follow producers, not positions.
    fn model() -> ModelProto {
        ModelProto {
            ir_version: Some(8),
            graph: Some(GraphProto {
                node: vec![
                    node("n_b", &["a", "wb"], "b"),
                    node("n_a", &["x", "wa"], "a"),
                    node("n_side", &["a", "ws"], "side"),
                    node("n_out", &["b", "b"], "out"),
                ],
                initializer: vec![
                    tensor("wa", &[1.0]),
                    tensor("wb", &[2.0, 3.0]),
                    tensor("ws", &[4.0]),
                    tensor("listed", &[5.0]),
                ],
                input: vec![value("x"), value("listed")],
                output: vec![value("out"), value("side")],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_the_producers_of_the_outputs_are_needed() {
        let m = model();
        let g = m.graph.as_ref().unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            needed_nodes(g, &names(&["b"])),
            Some(vec![true, true, false, false])
        );
        assert_eq!(
            needed_nodes(g, &names(&["side"])),
            Some(vec![false, true, true, false])
        );
        assert_eq!(needed_nodes(g, &names(&["x"])), Some(vec![false; 4]));
        assert_eq!(needed_nodes(g, &names(&["out", "side"])), None);
        // A node with a subgraph: nothing is pruned.
        let mut with_body = m.clone();
        with_body.graph.as_mut().unwrap().node[2]
            .attribute
            .push(AttributeProto {
                name: Some("body".into()),
                g: Some(GraphProto::default()),
                ..Default::default()
            });
        assert_eq!(
            needed_nodes(with_body.graph.as_ref().unwrap(), &names(&["b"])),
            None
        );
    }

    /// The pruned bytes parse to the model pruned in place: the kept nodes in their order,
    /// the initializers they read and those listed as inputs, every other field untouched.
    #[test]
    fn pruned_bytes_parse_to_the_model_pruned_in_place() {
        let m = model();
        let keep = vec![true, true, false, false];
        // An initializer asked for as an output stays, though no kept node reads it.
        let outputs = ["b".to_string(), "ws".to_string()];
        let parsed = ModelProto::decode(encode_pruned(&m, &keep, &outputs).as_slice()).unwrap();
        let mut pruned = m.clone();
        retain(pruned.graph.as_mut().unwrap(), &keep, &outputs);
        assert_eq!(parsed, pruned);
        let g = pruned.graph.as_ref().unwrap();
        let kept: Vec<_> = g.node.iter().map(|n| n.name.clone().unwrap()).collect();
        assert_eq!(kept, ["n_b", "n_a"]);
        let inits: Vec<_> = g
            .initializer
            .iter()
            .map(|t| t.name.clone().unwrap())
            .collect();
        assert_eq!(inits, ["wa", "wb", "ws", "listed"]);
        assert_eq!(g.output, m.graph.as_ref().unwrap().output);
    }
}
