//! Statistics repair in one pass: the merged model with every layer repair corrects normalised
//! *inside the graph* to its goal statistics, batch by batch, and every BatchNormalization fed
//! its batch's own statistics (training mode). One run of that model measures each layer as
//! the sequential scheme would — after all the layers before it were corrected — because the
//! corrections happen in the forward pass itself, in graph order. The batch statistics come
//! back as extra outputs, are pooled over the batches, and are folded into the initializers.
//!
//! Built from core ops only (Reshape, ReduceMean, Sub, Mul, Sqrt, Max, Div, Greater, And,
//! Where, Add, Shape, Cast), in float32 whatever the model's float type, so both engines run it
//! and float16 models do not lose their statistics to rounding.

use ndarray::{Array1, ArrayD};

use crate::error::{Error, Result};
use crate::onnx::proto::{tensor_proto::DataType as Dt, AttributeProto, NodeProto, TensorProto};
use crate::onnx::{Model, TensorData};

/// A layer output to normalise in-graph: its producer node, its value, its float type, and the
/// goal mean and standard deviation per unit.
pub struct Normalise<'a> {
    pub node: usize,
    pub output: &'a str,
    pub dtype: i32,
    pub goal_mean: &'a Array1<f64>,
    pub goal_sd: &'a Array1<f64>,
    /// Units on the last axis ([B, N, D] of a token layer) rather than axis 1.
    pub units_last: bool,
}

/// A BatchNormalization to run on its batch statistics: the node and its float type.
pub struct TrainMode {
    pub node: usize,
    pub dtype: i32,
}

/// The names of the extra outputs holding one layer's batch mean and variance (per unit,
/// float32, biased).
pub struct Probe {
    pub mean: String,
    pub var: String,
}

/// Writes nodes into a list, naming values under one prefix no value of the model uses.
struct Builder {
    nodes: Vec<NodeProto>,
    consts: Vec<TensorProto>,
    prefix: String,
    count: usize,
    opset: i64,
}

impl Builder {
    fn fresh(&mut self, what: &str) -> String {
        self.count += 1;
        format!("{}{}_{what}", self.prefix, self.count)
    }

    fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(NodeProto {
            op_type: Some(op.into()),
            name: Some(out.clone()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            attribute: attrs,
            ..Default::default()
        });
        out
    }

    fn constant(&mut self, data: TensorData) -> String {
        let name = self.fresh("const");
        self.consts.push(data.to_proto(&name));
        name
    }

    fn f32s(&mut self, shape: &[usize], v: Vec<f32>) -> String {
        let a = ArrayD::from_shape_vec(shape.to_vec(), v).expect("shape matches");
        self.constant(TensorData::F32(a))
    }

    fn cast(&mut self, x: &str, to: i32) -> String {
        self.node("Cast", &[x], vec![int_attr("to", to as i64)])
    }

    /// Mean over axes 0 and 2 of a [N, C, L] value, kept as [1, C, 1].
    fn mean_nl(&mut self, x: &str) -> String {
        if self.opset >= 18 {
            let axes = self.constant(TensorData::I64(
                ArrayD::from_shape_vec(vec![2], vec![0, 2]).expect("2"),
            ));
            self.node("ReduceMean", &[x, &axes], vec![int_attr("keepdims", 1)])
        } else {
            self.node(
                "ReduceMean",
                &[x],
                vec![ints_attr("axes", &[0, 2]), int_attr("keepdims", 1)],
            )
        }
    }

    fn reshape(&mut self, x: &str, shape: &[i64]) -> String {
        let s = self.constant(TensorData::I64(
            ArrayD::from_shape_vec(vec![shape.len()], shape.to_vec()).expect("1-D"),
        ));
        self.node("Reshape", &[x, &s], vec![])
    }

    /// `x` as float32 [N, C, L] with its batch mean [1, C, 1], centred values and batch
    /// variance [1, C, 1]; the per-unit mean and variance become the probe.
    /// With `last` units (`Some(C)`), [.., C] is read as [N·L, C, 1].
    fn batch_stats(
        &mut self,
        x: &str,
        dtype: i32,
        last: Option<usize>,
    ) -> (String, String, String, String, Probe) {
        let x32 = if dtype == Dt::Float as i32 {
            x.to_string()
        } else {
            self.cast(x, Dt::Float as i32)
        };
        let r = match last {
            Some(c) => self.reshape(&x32, &[-1, c as i64, 1]),
            None => self.reshape(&x32, &[0, 0, -1]),
        };
        let m3 = self.mean_nl(&r);
        let d = self.node("Sub", &[&r, &m3], vec![]);
        let sq = self.node("Mul", &[&d, &d], vec![]);
        let v3 = self.mean_nl(&sq);
        let probe = Probe {
            mean: self.reshape(&m3, &[-1]),
            var: self.reshape(&v3, &[-1]),
        };
        (x32, d, v3, m3, probe)
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(2), // INT
        i: Some(v),
        ..Default::default()
    }
}

fn ints_attr(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(7), // INTS
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// `merged` instrumented as the module doc says; the probes come targets first, then norms.
pub fn instrument(
    merged: &Model,
    targets: &[Normalise],
    norms: &[TrainMode],
) -> Result<(Model, Vec<Probe>)> {
    let mut model = merged.clone();
    let opset = model
        .proto
        .opset_import
        .iter()
        .find(|o| o.domain.as_deref().unwrap_or("").is_empty())
        .and_then(|o| o.version)
        .unwrap_or(1);
    if opset < 9 {
        return Err(Error::Usage(format!(
            "statistics repair in one pass needs opset ≥ 9 (the model has {opset}); use \
             --repair-passes 0"
        )));
    }
    let graph = model
        .proto
        .graph
        .as_mut()
        .ok_or_else(|| Error::Usage("model has no graph".into()))?;
    let mut b = Builder {
        nodes: Vec::new(),
        consts: Vec::new(),
        prefix: unused_prefix(graph),
        count: 0,
        opset,
    };
    // New nodes go right after the node they instrument (targets) or right before it (norms),
    // so that the node list stays topologically sorted.
    let mut after: Vec<Vec<NodeProto>> = vec![Vec::new(); graph.node.len()];
    let mut before: Vec<Vec<NodeProto>> = vec![Vec::new(); graph.node.len()];
    let mut probes = Vec::new();
    for t in targets {
        let raw = b.fresh("raw");
        let Some(node) = graph.node.get_mut(t.node) else {
            return Err(Error::tensor(t.output, "no such node to repair"));
        };
        if node.output.first().map(String::as_str) != Some(t.output) {
            return Err(Error::tensor(
                t.output,
                "not the output of the node to repair",
            ));
        }
        node.output[0] = raw.clone();
        let c = t.goal_mean.len();
        let (x32, d, v3, _, probe) = b.batch_stats(&raw, t.dtype, t.units_last.then_some(c));
        let sd3 = b.node("Sqrt", &[&v3], vec![]);
        let eps = b.f32s(&[1], vec![1e-8]);
        let one = b.f32s(&[1], vec![1.0]);
        let goal_sd = b.f32s(&[1, c, 1], t.goal_sd.iter().map(|&v| v as f32).collect());
        let goal_mean = b.f32s(&[1, c, 1], t.goal_mean.iter().map(|&v| v as f32).collect());
        let positive = b.constant(TensorData::Bool(
            ArrayD::from_shape_vec(vec![1, c, 1], t.goal_sd.iter().map(|&v| v > 0.0).collect())
                .expect("c"),
        ));
        let live = b.node("Greater", &[&sd3, &eps], vec![]);
        let ok = b.node("And", &[&live, &positive], vec![]);
        let floor = b.node("Max", &[&sd3, &eps], vec![]);
        let ratio = b.node("Div", &[&goal_sd, &floor], vec![]);
        let s3 = b.node("Where", &[&ok, &ratio, &one], vec![]);
        let scaled = b.node("Mul", &[&d, &s3], vec![]);
        let y3 = b.node("Add", &[&scaled, &goal_mean], vec![]);
        let shape = b.node("Shape", &[&x32], vec![]);
        let y = b.node("Reshape", &[&y3, &shape], vec![]);
        if t.dtype != Dt::Float as i32 {
            b.cast(&y, t.dtype);
        }
        // The last node writes the layer's own output name.
        if let Some(last) = b.nodes.last_mut() {
            last.output[0] = t.output.to_string();
        }
        after[t.node].append(&mut b.nodes);
        probes.push(probe);
    }
    for n in norms {
        let Some(x) = graph
            .node
            .get(n.node)
            .and_then(|x| x.input.first())
            .cloned()
        else {
            return Err(Error::Usage(format!(
                "no BatchNormalization at node {}",
                n.node
            )));
        };
        let (_, _, _, _, probe) = b.batch_stats(&x, n.dtype, None);
        let (mut mean, mut var) = (probe.mean.clone(), probe.var.clone());
        if n.dtype != Dt::Float as i32 {
            mean = b.cast(&mean, n.dtype);
            var = b.cast(&var, n.dtype);
        }
        let node = &mut graph.node[n.node];
        if node.input.len() < 5 {
            return Err(Error::Usage(format!(
                "BatchNormalization node {} has no running statistics",
                n.node
            )));
        }
        node.input[3] = mean;
        node.input[4] = var;
        before[n.node].append(&mut b.nodes);
        probes.push(probe);
    }
    let old = std::mem::take(&mut graph.node);
    for (k, node) in old.into_iter().enumerate() {
        graph.node.append(&mut before[k]);
        graph.node.push(node);
        graph.node.append(&mut after[k]);
    }
    graph.initializer.append(&mut b.consts);
    Ok((model, probes))
}

/// A value-name prefix that no value, initializer or input of `graph` starts with.
fn unused_prefix(graph: &crate::onnx::proto::GraphProto) -> String {
    let names: Vec<&str> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().chain(&n.output).map(String::as_str))
        .chain(graph.initializer.iter().filter_map(|t| t.name.as_deref()))
        .collect();
    (0..)
        .map(|k| format!("mudsc_repair{k}_"))
        .find(|p| !names.iter().any(|n| n.starts_with(p.as_str())))
        .expect("a free prefix")
}
