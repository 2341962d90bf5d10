//! The merged model's values for the every-layer refit, each node computed once.
//!
//! The refit fits its layers in graph order, each on the merged model as the layers before
//! it left it. It used to run the merged model from its inputs up to each layer's input, a
//! prefix pass per layer: on the bundled ViT pair 25 prefixes over 1,000 images cost 1.2 s,
//! thirteen times one whole pass. Refitting a layer changes only its own node (and a
//! BatchNormalization right after it), which lies past the layer's input and so past every
//! value computed for it or for the layers before it: those values stay valid. So each
//! layer's pass computes only the nodes not yet computed, from the values already held that
//! they read, and holds what later nodes will read.

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::onnx::proto::{
    tensor_shape_proto, type_proto, GraphProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::onnx::{Model, TensorData};
use crate::runtime::{open_session, BackendKind, BackendOptions};

/// Values computed once across the refit's layers, batch by batch.
pub struct Frontier {
    /// The calibration batches (sample ranges) every value is computed on.
    ranges: Vec<(usize, usize)>,
    /// Per node, whether it has been computed.
    done: Vec<bool>,
    /// Computed values that a node not yet computed reads, per batch.
    held: HashMap<String, Vec<TensorData>>,
    /// Most bytes `held` may take; past it the frontier gives up (`advance` returns `None`
    /// from then on) and the refit runs prefixes again.
    limit: usize,
    given_up: bool,
}

impl Frontier {
    /// A frontier over `model`'s nodes, on the batches `ranges`.
    pub fn new(model: &Model, ranges: Vec<(usize, usize)>, limit: usize) -> Frontier {
        Frontier {
            ranges,
            done: vec![false; model.graph().node.len()],
            held: HashMap::new(),
            limit,
            given_up: false,
        }
    }

    /// The batches its values are computed on.
    pub fn ranges(&self) -> &[(usize, usize)] {
        &self.ranges
    }

    /// Whether its batches hold the first `samples` samples.
    pub fn covers(&self, samples: usize) -> bool {
        self.ranges.last().map_or(0, |r| r.1) >= samples
    }

    /// The values of `target` in `model` on every batch (`inputs`: the model's graph inputs
    /// over all samples, in their order), computing only the nodes no earlier call computed.
    /// `None`, now and from then on, where it cannot: a node holding a subgraph (what it
    /// reads is not in its inputs), a value it needs that it no longer holds, a node reading
    /// the target already computed (targets out of graph order), or more held values than
    /// its limit.
    pub fn advance(
        &mut self,
        model: &Model,
        target: &str,
        inputs: &[TensorData],
        backend: BackendKind,
        options: &BackendOptions,
    ) -> Result<Option<Vec<TensorData>>> {
        let graph = model.graph();
        if self.given_up || graph.node.len() != self.done.len() {
            return Ok(None);
        }
        // A node that reads the target and was already computed ran before the layer that
        // reads it was refitted (layers out of graph order): what it gave may be stale.
        let stale = graph
            .node
            .iter()
            .zip(&self.done)
            .any(|(n, &done)| done && n.input.iter().any(|i| i == target));
        let Some(needed) = needed_nodes(graph, target).filter(|_| !stale) else {
            self.give_up();
            return Ok(None);
        };
        let new: Vec<bool> = needed
            .iter()
            .zip(&self.done)
            .map(|(&n, &d)| n && !d)
            .collect();
        let input_names: Vec<String> = crate::runtime::graph_input_names(model)?;
        let initializers: HashSet<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        // What the new nodes read from outside themselves, and what of theirs is still read
        // after them (by nodes neither done nor new) or asked for.
        let produced: HashSet<&str> = nodes(graph, &new)
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let mut feeds: Vec<&str> = Vec::new();
        for name in nodes(graph, &new).flat_map(|n| n.input.iter().map(String::as_str)) {
            if name.is_empty()
                || produced.contains(name)
                || initializers.contains(name)
                || feeds.contains(&name)
            {
                continue;
            }
            if !self.held.contains_key(name) && !input_names.iter().any(|i| i == name) {
                self.give_up();
                return Ok(None);
            }
            feeds.push(name);
        }
        let later: HashSet<&str> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(k, _)| !new[*k] && !self.done[*k])
            .flat_map(|(_, n)| n.input.iter().map(String::as_str))
            .collect();
        let mut wanted: Vec<String> = produced
            .iter()
            .filter(|&&v| later.contains(v))
            .map(|v| v.to_string())
            .collect();
        wanted.sort();
        if !wanted.iter().any(|w| w == target) {
            wanted.push(target.to_string());
        }
        // The target without a node to run: a graph input, or a value already held.
        let from_feed =
            |name: &str, b: usize, (start, end): (usize, usize)| match self.held.get(name) {
                Some(batches) => batches[b].clone(),
                None => {
                    let at = input_names.iter().position(|i| i == name).unwrap_or(0);
                    inputs[at].slice_rows(start, end)
                }
            };
        let mut out: HashMap<String, Vec<TensorData>> = HashMap::new();
        if new.contains(&true) {
            let step = step_model(model, &new, &feeds, &wanted, &self.held, &input_names);
            let mut session = open_session(backend, &step, &[], options)?;
            let names = session.output_names().to_vec();
            for (b, &range) in self.ranges.iter().enumerate() {
                let fed: Vec<TensorData> = feeds.iter().map(|f| from_feed(f, b, range)).collect();
                for (name, value) in names.iter().zip(session.run(&fed)?) {
                    out.entry(name.clone()).or_default().push(value);
                }
            }
        } else if produced.is_empty() && !self.held.contains_key(target) {
            let batches = self
                .ranges
                .iter()
                .enumerate()
                .map(|(b, &r)| from_feed(target, b, r))
                .collect();
            out.insert(target.to_string(), batches);
        }
        let result = match out.get(target).or(self.held.get(target)) {
            Some(v) => v.clone(),
            None => {
                self.give_up();
                return Ok(None);
            }
        };
        // Mark the new nodes done, hold what later nodes read, drop what none reads now.
        for (d, n) in self.done.iter_mut().zip(&new) {
            *d |= n;
        }
        for (name, batches) in out {
            // Graph inputs are sliced from `inputs` when read, never held.
            if later.contains(name.as_str()) && !input_names.contains(&name) {
                self.held.insert(name, batches);
            }
        }
        self.held.retain(|name, _| later.contains(name.as_str()));
        let bytes: usize = self
            .held
            .values()
            .flatten()
            .map(|t| t.len() * t.dtype().size())
            .sum();
        if bytes > self.limit {
            self.give_up();
        }
        Ok(Some(result))
    }

    /// From now on `advance` returns `None`, and nothing is held.
    fn give_up(&mut self) {
        self.given_up = true;
        self.held.clear();
    }
}

/// Per node, whether `target` needs it (all of them included); `None` where a node holds a
/// subgraph.
fn needed_nodes(graph: &GraphProto, target: &str) -> Option<Vec<bool>> {
    if graph.node.iter().any(crate::runtime::prune::has_subgraph) {
        return None;
    }
    Some(
        crate::runtime::prune::needed_nodes(graph, &[target.to_string()])
            .unwrap_or_else(|| vec![true; graph.node.len()]),
    )
}

fn nodes<'g>(
    graph: &'g GraphProto,
    keep: &'g [bool],
) -> impl Iterator<Item = &'g crate::onnx::proto::NodeProto> {
    graph.node.iter().zip(keep).filter(|p| *p.1).map(|p| p.0)
}

/// The model of one step: the `new` nodes and the initializers they read, the values they
/// read from outside (`feeds`: graph inputs as declared, held values by their element type)
/// as its inputs, `wanted` as its outputs.
fn step_model(
    model: &Model,
    new: &[bool],
    feeds: &[&str],
    wanted: &[String],
    held: &HashMap<String, Vec<TensorData>>,
    input_names: &[String],
) -> Model {
    let graph = model.graph();
    let read: HashSet<&str> = nodes(graph, new)
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let input = feeds
        .iter()
        .map(|&name| {
            let declared = graph
                .input
                .iter()
                .find(|vi| vi.name.as_deref() == Some(name))
                .filter(|_| input_names.iter().any(|i| i == name));
            match (declared, held.get(name).and_then(|b| b.first())) {
                (Some(vi), _) => vi.clone(),
                (None, Some(value)) => value_info(name, value),
                (None, None) => ValueInfoProto {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
            }
        })
        .collect();
    let fields = crate::runtime::prune::graph_fields(graph);
    let proto = crate::runtime::prune::with_graph(
        &model.proto,
        GraphProto {
            node: nodes(graph, new).cloned().collect(),
            initializer: graph
                .initializer
                .iter()
                .filter(|t| t.name.as_deref().is_some_and(|n| read.contains(n)))
                .cloned()
                .collect(),
            input,
            output: wanted
                .iter()
                .map(|w| ValueInfoProto {
                    name: Some(w.clone()),
                    ..Default::default()
                })
                .collect(),
            // Shapes recorded for values that are now inputs would be stale hints.
            value_info: fields
                .value_info
                .iter()
                .filter(|v| !feeds.contains(&v.name.as_deref().unwrap_or("")))
                .cloned()
                .collect(),
            ..fields
        },
    );
    Model {
        proto,
        path: model.path.clone(),
        data_files: Vec::new(),
    }
}

/// A graph input for a held value: its element type and rank, every dimension unknown (the
/// last batch is shorter).
fn value_info(name: &str, value: &TensorData) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(value.dtype() as i32),
                shape: Some(TensorShapeProto {
                    dim: vec![tensor_shape_proto::Dimension::default(); value.shape().len()],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{NodeProto, OperatorSetIdProto, TensorProto};
    use ndarray::ArrayD;

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            name: Some(output.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn weight(name: &str, seed: f32) -> TensorProto {
        let w = ArrayD::from_shape_fn(vec![4, 4], |ix| ((ix[0] * 4 + ix[1]) as f32 * seed).sin());
        TensorData::F32(w).to_proto(name)
    }

    /// x → MatMul W1 → Relu = h1 → MatMul W2 → Relu = h2; y = h2 + h1 → MatMul W3 = z: three
    /// layers whose inputs are x, h1 and y (a residual one).
    fn model() -> Model {
        let input = ValueInfoProto {
            name: Some("x".into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(1),
                    shape: Some(TensorShapeProto {
                        dim: vec![
                            tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimParam(
                                    "N".into(),
                                )),
                                ..Default::default()
                            },
                            tensor_shape_proto::Dimension {
                                value: Some(tensor_shape_proto::dimension::Value::DimValue(4)),
                                ..Default::default()
                            },
                        ],
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        let graph = GraphProto {
            node: vec![
                node("MatMul", &["x", "W1"], "a1"),
                node("Relu", &["a1"], "h1"),
                node("MatMul", &["h1", "W2"], "a2"),
                node("Relu", &["a2"], "h2"),
                node("Add", &["h2", "h1"], "y"),
                node("MatMul", &["y", "W3"], "z"),
            ],
            name: Some("frontier".into()),
            initializer: vec![weight("W1", 0.7), weight("W2", 1.3), weight("W3", 0.4)],
            input: vec![input],
            output: vec![ValueInfoProto {
                name: Some("z".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        Model {
            proto: crate::onnx::proto::ModelProto {
                ir_version: Some(8),
                opset_import: vec![OperatorSetIdProto {
                    domain: Some(String::new()),
                    version: Some(13),
                }],
                graph: Some(graph),
                ..Default::default()
            },
            path: None,
            data_files: Vec::new(),
        }
    }

    fn set_weight(m: &mut Model, name: &str, seed: f32) {
        let graph = m.proto.graph.as_mut().expect("a graph");
        let at = graph
            .initializer
            .iter()
            .position(|t| t.name.as_deref() == Some(name))
            .expect("the weight");
        graph.initializer[at] = weight(name, seed);
    }

    /// `value` of the whole `model` on each batch of `x`.
    fn whole(
        m: &Model,
        value: &str,
        x: &TensorData,
        ranges: &[(usize, usize)],
        kind: BackendKind,
    ) -> Vec<TensorData> {
        let mut s = open_session(kind, m, &[value.to_string()], &BackendOptions::default())
            .expect("the model opens");
        ranges
            .iter()
            .map(|&(a, b)| s.run(&[x.slice_rows(a, b)]).expect("it runs").remove(1))
            .collect()
    }

    fn assert_close(got: &[TensorData], want: &[TensorData], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: batches");
        for (g, w) in got.iter().zip(want) {
            assert_eq!(g.shape(), w.shape(), "{what}");
            let (g, w) = (g.to_f32(), w.to_f32());
            // Written so that a NaN fails it.
            let close = (&g - &w).iter().all(|d| d.abs() <= 1e-5);
            assert!(close, "{what}: {g:?} against {w:?}");
        }
    }

    /// Each layer's input from the frontier equals the whole model's value as the refits
    /// before it left the model, on both engines, and no node is computed twice: the first
    /// layer's weight turned to NaN once its outputs are held does not reach the third
    /// layer's input (a frontier that ran it again would give NaN there).
    #[test]
    fn each_value_equals_the_whole_models_and_no_node_runs_twice() {
        let x = TensorData::F32(ArrayD::from_shape_fn(vec![5, 4], |ix| {
            (ix[0] as f32 - 2.0) * 0.5 + ix[1] as f32 * 0.25
        }));
        let ranges = vec![(0, 3), (3, 5)];
        let kinds: &[BackendKind] = if cfg!(feature = "ort") {
            &[BackendKind::Tract, BackendKind::Ort]
        } else {
            &[BackendKind::Tract]
        };
        for &kind in kinds {
            let options = BackendOptions::default();
            let mut m = model();
            let mut f = Frontier::new(&m, ranges.clone(), 1 << 20);
            let xs = f
                .advance(&m, "x", std::slice::from_ref(&x), kind, &options)
                .unwrap();
            let want: Vec<TensorData> = ranges.iter().map(|&(a, b)| x.slice_rows(a, b)).collect();
            assert_close(&xs.expect("the graph input"), &want, "x");
            set_weight(&mut m, "W1", 2.1);
            let h1 = f
                .advance(&m, "h1", std::slice::from_ref(&x), kind, &options)
                .unwrap();
            assert_close(&h1.expect("h1"), &whole(&m, "h1", &x, &ranges, kind), "h1");
            set_weight(&mut m, "W2", -0.9);
            let reference = m.clone();
            set_weight(&mut m, "W1", f32::NAN);
            let y = f
                .advance(&m, "y", std::slice::from_ref(&x), kind, &options)
                .unwrap();
            assert_close(
                &y.expect("y"),
                &whole(&reference, "y", &x, &ranges, kind),
                "y",
            );
        }
    }

    /// Targets out of graph order: once `y` is computed, `h1`'s reader (the second layer's
    /// node) has run with the weights it had then, so the frontier gives up rather than hold
    /// values a refit of that layer would make stale.
    #[test]
    fn targets_out_of_order_give_up() {
        let x = TensorData::F32(ArrayD::from_elem(vec![5, 4], 0.5f32));
        let m = model();
        let options = BackendOptions::default();
        let mut f = Frontier::new(&m, vec![(0, 5)], 1 << 20);
        let fed = std::slice::from_ref(&x);
        assert!(f
            .advance(&m, "y", fed, BackendKind::Tract, &options)
            .unwrap()
            .is_some());
        assert!(f
            .advance(&m, "h1", fed, BackendKind::Tract, &options)
            .unwrap()
            .is_none());
        assert!(f
            .advance(&m, "y", fed, BackendKind::Tract, &options)
            .unwrap()
            .is_none());
    }

    /// Past its byte limit the frontier gives up: the values of that call come back, and every
    /// later call returns `None` (the refit then runs prefixes again).
    #[test]
    fn past_its_limit_the_frontier_gives_up() {
        let x = TensorData::F32(ArrayD::from_elem(vec![5, 4], 0.5f32));
        let m = model();
        let options = BackendOptions::default();
        let mut f = Frontier::new(&m, vec![(0, 5)], 16);
        let h1 = f.advance(
            &m,
            "h1",
            std::slice::from_ref(&x),
            BackendKind::Tract,
            &options,
        );
        assert!(h1.unwrap().is_some(), "the call that goes past the limit");
        let y = f.advance(
            &m,
            "y",
            std::slice::from_ref(&x),
            BackendKind::Tract,
            &options,
        );
        assert!(y.unwrap().is_none(), "given up");
    }
}
