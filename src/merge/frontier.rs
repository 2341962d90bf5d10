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
use crate::runtime::prune::kept_nodes;
use crate::runtime::{open_session, BackendKind, BackendOptions};

/// Values computed once across the refit's layers, batch by batch.
pub struct Frontier {
    /// The calibration batches (sample ranges) every value is computed on.
    ranges: Vec<(usize, usize)>,
    /// Per node, whether it has been computed.
    done: Vec<bool>,
    /// Computed values that a node not yet computed reads, per batch.
    held: HashMap<String, Vec<TensorData>>,
    /// Most bytes `held` may take; past it the frontier gives up (`advance` returns false
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

    /// Computes the values of `target` in `model` on every batch (`inputs`: the model's
    /// graph inputs over all samples, in their order), running only the nodes no earlier call
    /// ran; `values(target)` then holds them. False, now and from then on, where it cannot: a
    /// node holding a subgraph (what it reads is not in its inputs), a value it needs that it
    /// no longer holds, a node reading the target already run (targets out of graph order),
    /// a step the engine cannot run, or more held values than its limit.
    pub fn advance(
        &mut self,
        model: &Model,
        target: &str,
        inputs: &[TensorData],
        backend: BackendKind,
        options: &BackendOptions,
    ) -> Result<bool> {
        if self.given_up || model.graph().node.len() != self.done.len() {
            return Ok(false);
        }
        let input_names = crate::runtime::graph_input_names(model)?;
        let step = (inputs.len() == input_names.len())
            .then(|| self.plan(model, target, &input_names))
            .flatten();
        let Some(step) = step else {
            self.give_up();
            return Ok(false);
        };
        let computed = match self.run(model, &step, inputs, &input_names, backend, options) {
            Ok(computed) => computed,
            // An engine that cannot run a step leaves the layers to their prefix passes, which
            // ask it only for a layer's input: tract, asked for a shape computation's result
            // that later nodes read, has no such output (its dimensions are symbolic).
            Err(_) => {
                self.give_up();
                return Ok(false);
            }
        };
        // Mark the step's nodes run; hold what later nodes read (and the target, for
        // `values`), past the limit give up.
        for (d, n) in self.done.iter_mut().zip(&step.new) {
            *d |= n;
        }
        let keep = |name: &str| step.later.contains(name) || name == target;
        self.held.retain(|name, _| keep(name));
        self.held
            .extend(computed.into_iter().filter(|(name, _)| keep(name)));
        let bytes: usize = self
            .held
            .values()
            .flatten()
            .map(|t| t.len() * t.dtype().size())
            .sum();
        if bytes > self.limit || !self.held.contains_key(target) {
            self.give_up();
        }
        Ok(!self.given_up)
    }

    /// The values of `target` on every batch, after an `advance` to it that returned true.
    pub fn values(&self, target: &str) -> Option<&[TensorData]> {
        self.held.get(target).map(Vec::as_slice)
    }

    /// The step to `target`: the nodes it needs that have not run, the values they read from
    /// outside themselves, and what of theirs later nodes read. `None` where the frontier
    /// cannot give the target (see `advance`).
    fn plan(&self, model: &Model, target: &str, input_names: &[String]) -> Option<Step> {
        let graph = model.graph();
        // A node that reads the target and has already run ran before the layer that reads
        // it was refitted (layers out of graph order): what it gave may be stale.
        let stale = graph
            .node
            .iter()
            .zip(&self.done)
            .any(|(n, &done)| done && n.input.iter().any(|i| i == target));
        if stale {
            return None;
        }
        let needed = crate::runtime::prune::producers(graph, &[target.to_string()])?;
        let new: Vec<bool> = needed
            .iter()
            .zip(&self.done)
            .map(|(&n, &d)| n && !d)
            .collect();
        let initializers: HashSet<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        let produced: HashSet<&str> = kept_nodes(graph, &new)
            .flat_map(|n| n.output.iter().map(String::as_str))
            .collect();
        let available =
            |name: &str| self.held.contains_key(name) || input_names.iter().any(|i| i == name);
        let mut feeds: Vec<String> = Vec::new();
        for name in kept_nodes(graph, &new).flat_map(|n| n.input.iter()) {
            let outside = !name.is_empty()
                && !produced.contains(name.as_str())
                && !initializers.contains(name.as_str());
            if outside && !feeds.contains(name) {
                if !available(name) {
                    return None;
                }
                feeds.push(name.clone());
            }
        }
        if !produced.contains(target) && !available(target) {
            return None;
        }
        let later: HashSet<String> = graph
            .node
            .iter()
            .zip(new.iter().zip(&self.done))
            .filter(|(_, (&n, &d))| !n && !d)
            .flat_map(|(node, _)| node.input.iter().cloned())
            .collect();
        let mut wanted: Vec<String> = produced
            .iter()
            .filter(|&&v| later.contains(v) || v == target)
            .map(|v| v.to_string())
            .collect();
        wanted.sort();
        Some(Step {
            target: target.to_string(),
            new,
            feeds,
            wanted,
            later,
        })
    }

    /// Runs `step` on every batch: its wanted values by name, the target's too where no node
    /// had to run for it (a graph input, or a value held).
    fn run(
        &self,
        model: &Model,
        step: &Step,
        inputs: &[TensorData],
        input_names: &[String],
        backend: BackendKind,
        options: &BackendOptions,
    ) -> Result<HashMap<String, Vec<TensorData>>> {
        // A value read from outside the step: held, else a graph input's slice.
        let outside = |name: &str, b: usize, (start, end): (usize, usize)| match self.held.get(name)
        {
            Some(batches) => batches[b].clone(),
            None => {
                let at = input_names.iter().position(|i| i == name);
                inputs[at.expect("planned from the held values and the graph inputs")]
                    .slice_rows(start, end)
            }
        };
        let mut computed: HashMap<String, Vec<TensorData>> = HashMap::new();
        if !step.new.contains(&true) {
            if !self.held.contains_key(&step.target) {
                let batches = (self.ranges.iter().enumerate())
                    .map(|(b, &r)| outside(&step.target, b, r))
                    .collect();
                computed.insert(step.target.clone(), batches);
            }
            return Ok(computed);
        }
        let feeds: Vec<&str> = step.feeds.iter().map(String::as_str).collect();
        let model = step_model(
            model,
            &step.new,
            &feeds,
            &step.wanted,
            &self.held,
            input_names,
        );
        let mut session = open_session(backend, &model, &[], options)?;
        let names = session.output_names().to_vec();
        for (b, &range) in self.ranges.iter().enumerate() {
            let fed: Vec<TensorData> = feeds.iter().map(|f| outside(f, b, range)).collect();
            for (name, value) in names.iter().zip(session.run(&fed)?) {
                computed.entry(name.clone()).or_default().push(value);
            }
        }
        Ok(computed)
    }

    /// From now on `advance` returns false, and nothing is held.
    fn give_up(&mut self) {
        self.given_up = true;
        self.held.clear();
    }
}

/// One `advance`: the nodes to run (`new`), the values they read from outside themselves
/// (`feeds`), the values of theirs to return (`wanted`: what `later` nodes read, and the
/// target), and every value a node neither run nor to run reads (`later`).
struct Step {
    target: String,
    new: Vec<bool>,
    feeds: Vec<String>,
    wanted: Vec<String>,
    later: HashSet<String>,
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
    let read: HashSet<&str> = kept_nodes(graph, new)
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
            node: kept_nodes(graph, new).cloned().collect(),
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
            let fed = std::slice::from_ref(&x);
            assert!(f.advance(&m, "x", fed, kind, &options).unwrap());
            let want: Vec<TensorData> = ranges.iter().map(|&(a, b)| x.slice_rows(a, b)).collect();
            assert_close(f.values("x").expect("the graph input"), &want, "x");
            set_weight(&mut m, "W1", 2.1);
            assert!(f.advance(&m, "h1", fed, kind, &options).unwrap());
            let want = whole(&m, "h1", &x, &ranges, kind);
            assert_close(f.values("h1").expect("h1"), &want, "h1");
            set_weight(&mut m, "W2", -0.9);
            let reference = m.clone();
            set_weight(&mut m, "W1", f32::NAN);
            assert!(f.advance(&m, "y", fed, kind, &options).unwrap());
            let want = whole(&reference, "y", &x, &ranges, kind);
            assert_close(f.values("y").expect("y"), &want, "y");
        }
    }

    /// A step the engine cannot run gives up instead of failing the merge: tract does not
    /// return a shape computation's result (a `Shape` read again by a later `Reshape`), which
    /// ONNX Runtime returns like any value.
    #[test]
    fn a_step_the_engine_cannot_run_gives_up() {
        let mut m = model();
        let graph = m.proto.graph.as_mut().expect("a graph");
        // h1 = Reshape(Relu(a1), Shape(x)) and y = Reshape(h2 + h1, Shape(x)): the shape is
        // computed for h1 and read again for y.
        graph.node[1] = node("Relu", &["a1"], "r1");
        graph.node.insert(0, node("Shape", &["x"], "s"));
        graph.node.insert(3, node("Reshape", &["r1", "s"], "h1"));
        graph.node[6] = node("Add", &["h2", "h1"], "sum");
        graph.node.insert(7, node("Reshape", &["sum", "s"], "y"));
        let x = TensorData::F32(ArrayD::from_elem(vec![5, 4], 0.5f32));
        let fed = std::slice::from_ref(&x);
        let options = BackendOptions::default();
        let mut f = Frontier::new(&m, vec![(0, 5)], 1 << 20);
        let tract = f.advance(&m, "h1", fed, BackendKind::Tract, &options);
        assert!(!tract.expect("no error"), "tract gives up");
        assert!(!f
            .advance(&m, "y", fed, BackendKind::Tract, &options)
            .unwrap());
        if cfg!(feature = "ort") {
            let mut f = Frontier::new(&m, vec![(0, 5)], 1 << 20);
            assert!(f
                .advance(&m, "h1", fed, BackendKind::Ort, &options)
                .unwrap());
            assert!(f.advance(&m, "y", fed, BackendKind::Ort, &options).unwrap());
            let want = whole(&m, "y", &x, &[(0, 5)], BackendKind::Ort);
            assert_close(f.values("y").expect("y"), &want, "y");
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
            .unwrap());
        assert!(!f
            .advance(&m, "h1", fed, BackendKind::Tract, &options)
            .unwrap());
        assert!(!f
            .advance(&m, "y", fed, BackendKind::Tract, &options)
            .unwrap());
        assert!(f.values("y").is_none(), "nothing held once given up");
    }

    /// Past its byte limit the frontier gives up: the call that would hold more returns false,
    /// as every later call does (the refit then runs prefixes again), and nothing is held.
    #[test]
    fn past_its_limit_the_frontier_gives_up() {
        let x = TensorData::F32(ArrayD::from_elem(vec![5, 4], 0.5f32));
        let m = model();
        let options = BackendOptions::default();
        let fed = std::slice::from_ref(&x);
        // h1 over 5 samples is 80 bytes.
        let mut f = Frontier::new(&m, vec![(0, 5)], 100);
        assert!(f
            .advance(&m, "h1", fed, BackendKind::Tract, &options)
            .unwrap());
        let mut f = Frontier::new(&m, vec![(0, 5)], 79);
        assert!(!f
            .advance(&m, "h1", fed, BackendKind::Tract, &options)
            .unwrap());
        assert!(f.values("h1").is_none());
        assert!(!f
            .advance(&m, "y", fed, BackendKind::Tract, &options)
            .unwrap());
    }
}
