//! The graph view: producers, consumers, constants, order, subgraphs, shapes, and structural
//! errors.

mod common;

use std::collections::HashMap;

use common::model;
use mudsc::graph::{infer_shapes, Graph, Source};
use mudsc::onnx;

#[test]
fn producers_consumers_and_order() {
    let m = onnx::load(model("convnet.onnx")).unwrap();
    let g = Graph::new(&m).unwrap();
    assert_eq!(g.nodes().len(), 7);
    assert_eq!(g.producer("bn").unwrap().name.as_deref(), Some("bn"));
    assert_eq!(g.source("x"), Some(Source::Input));
    assert_eq!(g.source("w"), Some(Source::Initializer));
    assert!(matches!(
        g.source("feat"),
        Some(Source::Node { slot: 0, .. })
    ));
    let consumers: Vec<&str> = g
        .consumers("feat")
        .iter()
        .map(|&(n, _)| g.node(n).op_type.as_deref().unwrap())
        .collect();
    assert_eq!(consumers, vec!["GlobalAveragePool"]);
    assert!(g.initializer("fc").is_some());
    // A Constant node's value is a constant but not an initializer.
    assert!(g.initializer("fcb").is_none());
    assert_eq!(g.constant("fcb").unwrap().dims, vec![5]);
    // Topological: every node after the producers of its inputs.
    let order = g.topological_order();
    let pos: HashMap<usize, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    for &n in order {
        for input in &g.node(n).input {
            if let Some(Source::Node { node, .. }) = g.source(input) {
                assert!(pos[&node] < pos[&n]);
            }
        }
    }
    assert_eq!(g.dag().edge_count(), 6);
    assert!(g.subgraphs().is_empty());
}

#[test]
fn initializers_listed_as_inputs_are_not_runtime_inputs() {
    let m = onnx::load(model("two_inputs.onnx")).unwrap();
    let g = Graph::new(&m).unwrap();
    let names: Vec<&str> = g
        .inputs()
        .iter()
        .map(|v| v.name.as_deref().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(g.source("c"), Some(Source::Initializer));
}

#[test]
fn subgraphs_are_detected() {
    let m = onnx::load(model("with_if.onnx")).unwrap();
    let g = Graph::new(&m).unwrap();
    let mut attrs: Vec<&str> = g.subgraphs().iter().map(|s| s.attribute.as_str()).collect();
    attrs.sort();
    assert_eq!(attrs, vec!["else_branch", "then_branch"]);
    assert_eq!(g.subgraphs()[0].node_name, "branch");
}

#[test]
fn cycles_and_double_producers_are_errors_naming_the_node() {
    let mut m = onnx::load(model("mlp.onnx")).unwrap();
    // fc1 reads the output of relu: a cycle.
    m.proto.graph.as_mut().unwrap().node[0].input[0] = "r".into();
    let e = Graph::new(&m).err().expect("cycle must fail");
    assert!(e.to_string().contains("cycle"), "{e}");

    let mut m = onnx::load(model("mlp.onnx")).unwrap();
    m.proto.graph.as_mut().unwrap().node[1].output[0] = "h".into();
    let e = Graph::new(&m).err().expect("double producer must fail");
    assert!(
        e.to_string().contains("'h'") && e.to_string().contains("relu"),
        "{e}"
    );

    let mut m = onnx::load(model("mlp.onnx")).unwrap();
    m.proto.graph.as_mut().unwrap().node[1].input[0] = "nowhere".into();
    let e = Graph::new(&m).err().expect("dangling input must fail");
    assert!(
        e.to_string().contains("nowhere") && e.to_string().contains("Relu"),
        "{e}"
    );
}

#[test]
fn static_shapes_for_a_given_input_shape() {
    let m = onnx::load(model("convnet.onnx")).unwrap();
    let shapes = infer_shapes(&m, &HashMap::from([("x".to_string(), vec![7, 3, 8, 8])])).unwrap();
    assert_eq!(shapes["c"], vec![7, 16, 8, 8]);
    assert_eq!(shapes["feat"], vec![7, 16, 8, 8]);
    assert_eq!(shapes["gp"], vec![7, 16, 1, 1]);
    assert_eq!(shapes["flat"], vec![7, 16]);
    assert_eq!(shapes["logits"], vec![7, 5]);
    assert_eq!(shapes["w"], vec![16, 3, 3, 3]);
    // A symbolic dimension with no shape given is a usage error, not a guess.
    assert!(infer_shapes(&m, &HashMap::new()).is_err());
}

#[test]
fn fixture_pairs_share_an_architecture_and_different_ones_are_named() {
    use mudsc::graph::same_architecture;
    let dir = common::root().join("fixtures/models");
    for pair in [
        "mlp",
        "resnet20_bn_folded",
        "resnet20_gn",
        "vit",
        "vit_mha",
        "dwcnn",
        "flax_cnn",
    ] {
        let a = onnx::load(dir.join(format!("{pair}_a.onnx"))).unwrap();
        let b = onnx::load(dir.join(format!("{pair}_b.onnx"))).unwrap();
        same_architecture(&a, &b).unwrap_or_else(|e| panic!("{pair}: {e}"));
    }
    let mlp = onnx::load(dir.join("mlp_a.onnx")).unwrap();
    let resnet = onnx::load(dir.join("resnet20_bn_folded_a.onnx")).unwrap();
    let e = same_architecture(&mlp, &resnet).unwrap_err().to_string();
    assert!(
        e.contains("mlp_a.onnx") && e.contains("resnet20_bn_folded_a.onnx"),
        "{e}"
    );
    // A changed attribute is found and its node named.
    let mut changed = onnx::load(dir.join("resnet20_bn_folded_b.onnx")).unwrap();
    let graph = changed.proto.graph.as_mut().unwrap();
    let conv = graph
        .node
        .iter_mut()
        .position(|n| n.op_type.as_deref() == Some("Conv"))
        .unwrap();
    let name = graph.node[conv].name.clone().unwrap();
    for attr in &mut graph.node[conv].attribute {
        if attr.name.as_deref() == Some("pads") {
            attr.ints = vec![0, 0, 0, 0];
        }
    }
    let e = same_architecture(&resnet, &changed)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&name) && e.contains("attributes"), "{e}");
}

/// Shapes inferred without the large weights' values (the merge's path: those weights enter
/// tract as inputs of their shape) are the shapes inferred from the whole model: on every
/// bundled model and every model of the architecture zoo, each shape found without the values
/// is the one found with them, and where every value got one (the path the merge then takes)
/// the maps are equal. That path is taken on most bundled models, so the comparison is not
/// vacuous.
#[test]
fn shapes_without_the_weights_values_are_the_shapes_with_them() {
    let mut paths = Vec::new();
    for dir in ["fixtures/models", "fixtures/zoo"] {
        for entry in std::fs::read_dir(common::root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "onnx") {
                paths.push(path);
            }
        }
    }
    paths.sort();
    let mut lighter = 0;
    for path in &paths {
        let m = onnx::load(path).unwrap();
        let inputs = mudsc::data::input_shapes(&m, None, &[], 1).unwrap();
        let with = mudsc::graph::infer_shapes_with_weights(&m, &inputs).unwrap();
        assert_eq!(
            infer_shapes(&m, &inputs).unwrap(),
            with,
            "{}",
            path.display()
        );
        let Some(without) = mudsc::graph::infer_shapes_without_weights(&m, &inputs) else {
            continue;
        };
        let without = without.unwrap();
        for (name, shape) in &without {
            assert_eq!(Some(shape), with.get(name), "{}: {name}", path.display());
        }
        if without.len() == with.len() {
            lighter += 1;
        }
    }
    assert!(paths.len() > 40, "{} models", paths.len());
    assert!(
        lighter > 20,
        "{lighter} of {} models without the values",
        paths.len()
    );
}
