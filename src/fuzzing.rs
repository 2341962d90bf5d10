//! Entry points shared by the fuzz targets (`fuzz/`) and their regression test
//! (`tests/fuzz_corpus.rs`): each takes arbitrary bytes and runs everything mudsc does with
//! such input before any inference. They return errors; a panic, an abort or an unbounded
//! allocation is a bug.

use crate::error::Result;
use crate::graph::{same_architecture, shapes_declared, Dim, Graph, ShapeMap};
use crate::onnx::TensorData;

/// An ONNX model from bytes: the loader, the graph view, the `inspect` summary, every tensor
/// decoded, the architecture comparison with itself, and symmetry discovery on the shapes the
/// file itself states (declared static inputs, decodable initializers and `Constant` values;
/// shape inference runs the model through tract and is left out).
pub fn onnx_model(bytes: &[u8]) -> Result<()> {
    let model = crate::onnx::load_bytes(bytes.to_vec())?;
    let graph = Graph::new(&model)?;
    crate::inspect::summarize(&model)?;
    let mut shapes = ShapeMap::new();
    for vi in graph.inputs() {
        if let (Some(name), Some((_, Some(dims)))) = (&vi.name, shapes_declared(vi)) {
            let known: Option<Vec<usize>> = dims
                .iter()
                .map(|d| match d {
                    Dim::Known(k) => Some(*k),
                    _ => None,
                })
                .collect();
            if let Some(known) = known {
                shapes.insert(name.clone(), known);
            }
        }
    }
    let constants = graph
        .nodes()
        .iter()
        .flat_map(|n| &n.attribute)
        .flat_map(|a| a.t.iter().chain(&a.tensors));
    for t in graph.initializers().iter().chain(constants) {
        if let (Ok(data), Some(name)) = (TensorData::from_proto(t), &t.name) {
            shapes.insert(name.clone(), data.shape().to_vec());
        }
    }
    same_architecture(&model, &model)?;
    crate::symmetry::discover(&model, &shapes)?;
    Ok(())
}

/// Numpy data from bytes, read both as an `.npz` archive and as a single `.npy` array; an
/// error when neither reads.
pub fn numpy_data(bytes: &[u8]) -> Result<()> {
    let npz = crate::data::read_npz_bytes(bytes);
    let npy = crate::data::read_npy_bytes(bytes, "x");
    match (npz, npy) {
        (Err(e), Err(_)) => Err(e),
        _ => Ok(()),
    }
}

/// An ONNX model from bytes, as far as `mudsc groups` takes it: loaded, its shapes inferred by
/// tract (symbolic input dimensions set to 2), and symmetry discovery on those shapes.
pub fn onnx_model_inferred(bytes: &[u8]) -> Result<()> {
    let model = crate::onnx::load_bytes(bytes.to_vec())?;
    let inputs = crate::data::input_shapes(&model, None, &[], 2)?;
    let shapes = crate::graph::infer_shapes(&model, &inputs)?;
    crate::symmetry::discover(&model, &shapes)?;
    Ok(())
}
