//! Input data: `.npz` / `.npy` files and ONNX `test_data_set` directories, and binding their
//! arrays to a model's inputs.

mod npz;
mod pb_dir;

use std::path::Path;

pub use npz::{read_npy, read_npz, write_npz};
pub use pb_dir::{read_pb, read_pb_dir};

use crate::error::{Error, Result};
use crate::graph::{shapes_declared, Dim, Graph};
use crate::onnx::proto::ValueInfoProto;
use crate::onnx::{onnx_dtype_name, DataType, Model, TensorData};

/// Arrays by name, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NamedArrays(pub Vec<(String, TensorData)>);

impl NamedArrays {
    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// Removes and returns an array.
    pub fn take(&mut self, name: &str) -> Option<TensorData> {
        let i = self.0.iter().position(|(n, _)| n == name)?;
        Some(self.0.remove(i).1)
    }
}

/// Reads a data source, choosing the reader by its form: a directory of `input_K.pb` files,
/// an `.npz` archive, an `.npy` array, or a single `.pb` tensor.
pub fn read(path: &Path) -> Result<NamedArrays> {
    if path.is_dir() {
        return read_pb_dir(path);
    }
    if !path.exists() {
        return Err(Error::data(path, "no such file or directory"));
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some("npz") => read_npz(path),
        Some("npy") => read_npy(path),
        Some("pb") => Ok(NamedArrays(vec![read_pb(path, 0)?])),
        _ => Err(Error::data(
            path,
            "unknown data format (expected .npz, .npy, .pb or a test_data_set directory)",
        )),
    }
}

/// Orders the arrays to feed the model's graph inputs, and checks them against the declared
/// element types and static dimensions so that a mismatch is reported as bad input data,
/// naming the input, rather than surfacing as an engine failure. Keys must be the graph input
/// names, except that a single-input model accepts a file holding a single array under any
/// key, and unnamed test-data tensors (`input_K`) bind by position. Every array must have the
/// same number of samples (axis 0).
pub fn bind_inputs(arrays: &NamedArrays, model: &Model, source: &Path) -> Result<Vec<TensorData>> {
    let graph = Graph::new(model)?;
    let declared = graph.inputs();
    let input_names: Vec<String> = declared
        .iter()
        .map(|vi| vi.name.clone().unwrap_or_default())
        .collect();
    let bound = bind_by_name(arrays, &input_names, source)?;
    for ((vi, name), t) in declared.iter().zip(&input_names).zip(&bound) {
        check_declared(vi, name, t, source)?;
    }
    Ok(bound)
}

/// Errors if an array's dtype, rank or a static dimension differs from the input's declaration.
fn check_declared(vi: &ValueInfoProto, name: &str, t: &TensorData, source: &Path) -> Result<()> {
    let Some((elem, dims)) = shapes_declared(vi) else {
        return Ok(());
    };
    if DataType::from_onnx(elem).is_some_and(|d| d != t.dtype()) {
        return Err(Error::data(
            source,
            format!(
                "input '{name}' must be {}, the data holds {}",
                onnx_dtype_name(elem),
                t.dtype().name()
            ),
        ));
    }
    if let Some(dims) = dims {
        let fits = dims.len() == t.shape().len()
            && dims.iter().zip(t.shape()).all(|(d, &n)| match d {
                Dim::Known(k) => *k == n,
                _ => true,
            });
        if !fits {
            let want: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            return Err(Error::data(
                source,
                format!(
                    "input '{name}' must have shape [{}], the data has {:?}",
                    want.join(", "),
                    t.shape()
                ),
            ));
        }
    }
    Ok(())
}

fn bind_by_name(
    arrays: &NamedArrays,
    input_names: &[String],
    source: &Path,
) -> Result<Vec<TensorData>> {
    let positional = arrays
        .0
        .iter()
        .enumerate()
        .all(|(i, (n, _))| *n == format!("input_{i}"));
    let bound: Vec<TensorData> = if input_names.len() == 1 && arrays.0.len() == 1 {
        vec![arrays.0[0].1.clone()]
    } else if positional && arrays.0.len() == input_names.len() {
        arrays.0.iter().map(|(_, t)| t.clone()).collect()
    } else {
        input_names
            .iter()
            .map(|name| {
                arrays.get(name).cloned().ok_or_else(|| {
                    Error::data(
                        source,
                        format!(
                            "no array for model input '{name}' (the file has: {})",
                            arrays.names().join(", ")
                        ),
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    let samples = |t: &TensorData| t.shape().first().copied();
    if let Some(first) = bound.first() {
        for (t, name) in bound.iter().zip(input_names) {
            if samples(t) != samples(first) || samples(t).is_none() {
                return Err(Error::data(
                    source,
                    format!(
                        "input '{name}' has shape {:?}; all inputs need the same number of \
                         samples on axis 0",
                        t.shape()
                    ),
                ));
            }
        }
    }
    Ok(bound)
}

/// Number of samples (axis-0 length) of bound inputs.
pub fn sample_count(inputs: &[TensorData]) -> usize {
    inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(0)
}
