//! Discovery speed on large synthetic graphs: residual MLP stacks of 5 nodes per block
//! (MatMul, Add bias, Relu, MatMul, Add residual), from 500 to 10,000 nodes.
//! `cargo bench --bench discovery` prints one row per size; the target is well under a second
//! for 5,000 nodes. Shapes are given directly, so only discovery itself is timed.

use std::time::Instant;

use mudsc::graph::ShapeMap;
use mudsc::onnx::proto::{
    tensor_proto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    ValueInfoProto,
};
use mudsc::onnx::{load_bytes, Model};
use prost::Message;

const D: usize = 16;

fn init(name: &str, dims: &[usize]) -> TensorProto {
    let n: usize = dims.iter().product();
    TensorProto {
        name: Some(name.into()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(tensor_proto::DataType::Float as i32),
        raw_data: Some(vec![0u8; n * 4].into()),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

fn build(blocks: usize) -> (Model, ShapeMap) {
    let mut g = GraphProto {
        input: vec![ValueInfoProto {
            name: Some("x0".into()),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut shapes = ShapeMap::new();
    shapes.insert("x0".into(), vec![1, D]);
    for b in 0..blocks {
        let (x, w1, b1, w2) = (
            format!("x{b}"),
            format!("w1_{b}"),
            format!("b1_{b}"),
            format!("w2_{b}"),
        );
        let names = ["m", "a", "r", "n"].map(|p| format!("{p}{b}"));
        let next = format!("x{}", b + 1);
        g.initializer.extend([
            init(&w1, &[D, 2 * D]),
            init(&b1, &[2 * D]),
            init(&w2, &[2 * D, D]),
        ]);
        g.node.push(node("MatMul", &[&x, &w1], &names[0]));
        g.node.push(node("Add", &[&names[0], &b1], &names[1]));
        g.node.push(node("Relu", &[&names[1]], &names[2]));
        g.node.push(node("MatMul", &[&names[2], &w2], &names[3]));
        g.node.push(node("Add", &[&x, &names[3]], &next));
        for (n, s) in names.iter().zip([2 * D, 2 * D, 2 * D, D]) {
            shapes.insert(n.clone(), vec![1, s]);
        }
        shapes.insert(next, vec![1, D]);
        shapes.insert(w1, vec![D, 2 * D]);
        shapes.insert(b1, vec![2 * D]);
        shapes.insert(w2, vec![2 * D, D]);
    }
    g.output.push(ValueInfoProto {
        name: Some(format!("x{blocks}")),
        ..Default::default()
    });
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(g),
        ..Default::default()
    };
    (load_bytes(m.encode_to_vec()).expect("valid model"), shapes)
}

fn main() {
    println!("| nodes | groups | discovery (ms) | µs per node | vs 5,000-node target (1 s) |");
    println!("|---:|---:|---:|---:|---:|");
    for blocks in [100, 500, 1000, 2000] {
        let (model, shapes) = build(blocks);
        let start = Instant::now();
        let d = mudsc::symmetry::discover(&model, &shapes).expect("discovery");
        let secs = start.elapsed().as_secs_f64();
        let nodes = blocks * 5;
        println!(
            "| {nodes} | {} | {:.1} | {:.1} | {:.3} |",
            d.groups.len(),
            secs * 1e3,
            secs * 1e6 / nodes as f64,
            secs / (nodes as f64 / 5000.0)
        );
    }
}
