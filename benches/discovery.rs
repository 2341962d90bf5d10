//! Discovery speed on large synthetic graphs: residual MLP stacks of 5 nodes per block
//! (MatMul, Add bias, Relu, MatMul, Add residual), from 500 to 200,000 nodes.
//! `cargo bench --bench discovery` prints one row per size; the target is well under a second
//! for 5,000 nodes. Shapes are given directly, so only discovery itself is timed.
//!
//! A second table times the whole import of an `Identity` chain between two Gemm layers (the
//! graph view, shape inference and discovery: what `mudsc groups` does), from 20,000 to
//! 200,000 nodes: it must grow linearly (tract's typed translation is quadratic in the node
//! count, so large graphs take their shapes from tract's inference analysis alone).

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
    for blocks in [100, 500, 1000, 2000, 20_000, 40_000] {
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
    println!();
    println!("| Identity chain nodes | import + discovery (s) | µs per node |");
    println!("|---:|---:|---:|");
    for k in [20_000, 50_000, 100_000, 200_000] {
        let model = chain(k);
        let start = Instant::now();
        let mut shapes = std::collections::HashMap::new();
        shapes.insert("x".to_string(), vec![1, 8]);
        let value_shapes = mudsc::graph::infer_shapes(&model, &shapes).expect("shapes");
        let d = mudsc::symmetry::discover(&model, &value_shapes).expect("discovery");
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(d.groups.len(), 1);
        println!("| {k} | {secs:.2} | {:.1} |", secs * 1e6 / k as f64);
    }
}

/// x[N, 8] -> Gemm(16) -> `k` Identity nodes -> Gemm(4), as `shared/repro/r9_chain_hang.sh`.
fn chain(k: usize) -> Model {
    let typed = |name: &str, dims: &[i64]| {
        use mudsc::onnx::proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto};
        ValueInfoProto {
            name: Some(name.into()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(tensor_proto::DataType::Float as i32),
                    shape: Some(TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(if d < 0 {
                                    tensor_shape_proto::dimension::Value::DimParam("N".into())
                                } else {
                                    tensor_shape_proto::dimension::Value::DimValue(d)
                                }),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    };
    let gemm = |name: &str, inputs: &[&str], output: &str| NodeProto {
        name: Some(name.into()),
        attribute: vec![mudsc::onnx::proto::AttributeProto {
            name: Some("transB".into()),
            i: Some(1),
            r#type: Some(mudsc::onnx::proto::attribute_proto::AttributeType::Int as i32),
            ..Default::default()
        }],
        ..node("Gemm", inputs, output)
    };
    let mut g = GraphProto {
        input: vec![typed("x", &[-1, 8])],
        output: vec![typed("y", &[-1, 4])],
        initializer: vec![init("w1", &[16, 8]), init("w2", &[4, 16])],
        ..Default::default()
    };
    g.node.push(gemm("fc1", &["x", "w1"], "t0"));
    for i in 0..k {
        g.node.push(NodeProto {
            name: Some(format!("n{i}")),
            ..node("Identity", &[&format!("t{i}")], &format!("t{}", i + 1))
        });
    }
    g.node.push(gemm("fc2", &[&format!("t{k}"), "w2"], "y"));
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        graph: Some(g),
        ..Default::default()
    };
    load_bytes(m.encode_to_vec()).expect("valid model")
}
