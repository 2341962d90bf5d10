//! Input data: `.npz` / `.npy` files and ONNX `test_data_set` directories, and binding their
//! arrays to a model's inputs.

mod npz;
mod pb_dir;

use std::path::Path;

pub use npz::{read_npy, read_npy_bytes, read_npz, read_npz_bytes, write_npz};
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

/// Removes the integer labels stored under `key` from `arrays`; errors name the file and
/// list the keys it has.
pub fn take_labels(arrays: &mut NamedArrays, key: &str, path: &Path) -> Result<Vec<i64>> {
    let names = arrays.names().join(", ");
    arrays
        .take(key)
        .ok_or_else(|| {
            Error::data(
                path,
                format!("no labels under key '{key}' (the file has: {names}); use --labels"),
            )
        })?
        .to_labels()
        .ok_or_else(|| Error::data(path, format!("labels '{key}' must be integers")))
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
    let at = bound_positions(arrays, model, source)?;
    Ok(at.into_iter().map(|i| arrays.0[i].1.clone()).collect())
}

/// `bind_inputs`, moving the arrays into the inputs instead of copying them: where the file's
/// arrays are not needed afterwards, the data is not held twice (a merge's 256 ViT-B
/// calibration images are 154 MB, which the copy kept for the whole merge).
pub fn into_inputs(arrays: NamedArrays, model: &Model, source: &Path) -> Result<Vec<TensorData>> {
    let at = bound_positions(&arrays, model, source)?;
    let mut slots: Vec<Option<TensorData>> = arrays.0.into_iter().map(|(_, t)| Some(t)).collect();
    let mut inputs: Vec<TensorData> = Vec::with_capacity(at.len());
    for &i in &at {
        let t = match slots[i].take() {
            Some(t) => t,
            // An array bound to two inputs (a model declaring one name twice) is copied for
            // the second from the first, which took it.
            None => inputs[at
                .iter()
                .position(|&j| j == i)
                .expect("taken by an earlier input")]
            .clone(),
        };
        inputs.push(t);
    }
    Ok(inputs)
}

/// Which array (index into `arrays.0`) feeds each graph input, checked.
fn bound_positions(arrays: &NamedArrays, model: &Model, source: &Path) -> Result<Vec<usize>> {
    let graph = Graph::new(model)?;
    let declared = graph.inputs();
    let input_names: Vec<String> = declared
        .iter()
        .map(|vi| vi.name.clone().unwrap_or_default())
        .collect();
    let at = bind_by_name(arrays, &input_names, source)?;
    for ((vi, name), &i) in declared.iter().zip(&input_names).zip(&at) {
        check_declared(vi, name, &arrays.0[i].1, source)?;
    }
    Ok(at)
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

fn bind_by_name(arrays: &NamedArrays, input_names: &[String], source: &Path) -> Result<Vec<usize>> {
    let positional = arrays
        .0
        .iter()
        .enumerate()
        .all(|(i, (n, _))| *n == format!("input_{i}"));
    let at: Vec<usize> = if input_names.len() == 1 && arrays.0.len() == 1 {
        vec![0]
    } else if positional && arrays.0.len() == input_names.len() {
        (0..arrays.0.len()).collect()
    } else {
        input_names
            .iter()
            .map(|name| {
                arrays.0.iter().position(|(n, _)| n == name).ok_or_else(|| {
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
    let bound: Vec<&TensorData> = at.iter().map(|&i| &arrays.0[i].1).collect();
    let samples = |t: &TensorData| t.shape().first().copied();
    if let Some(&first) = bound.first() {
        for (&t, name) in bound.iter().zip(input_names) {
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
        if samples(first) == Some(0) {
            return Err(Error::data(
                source,
                format!(
                    "input '{}' holds no samples (axis 0 has length 0)",
                    input_names.first().map(String::as_str).unwrap_or("")
                ),
            ));
        }
    }
    Ok(at)
}

/// Number of samples (axis-0 length) of bound inputs.
pub fn sample_count(inputs: &[TensorData]) -> usize {
    inputs
        .first()
        .and_then(|t| t.shape().first().copied())
        .unwrap_or(0)
}

/// Most bytes of random input `check` generates (all inputs together): enough for any model's
/// proof at a handful of samples, and far below what would make the allocation abort.
pub const MAX_RANDOM_BYTES: u64 = 1 << 30;

/// Deterministic pseudo-random inputs for a model (for `check` without data): standard normal
/// floats, booleans, and integers the graph accepts: below the row count of every table a
/// `Gather` indexes with them (token ids into an embedding), else 0 or 1 (masks, token types).
/// `shapes` gives every input's concrete shape; their total size is bounded by
/// [`MAX_RANDOM_BYTES`].
pub fn random_inputs(
    model: &Model,
    shapes: &std::collections::HashMap<String, Vec<usize>>,
    seed: u64,
) -> Result<Vec<TensorData>> {
    let graph = Graph::new(model)?;
    let mut total: u64 = 0;
    for vi in graph.inputs() {
        let name = vi.name.clone().unwrap_or_default();
        let shape = shapes
            .get(&name)
            .ok_or_else(|| Error::Usage(format!("no shape for input '{name}'")))?;
        let elem = shapes_declared(vi).map(|d| d.0).unwrap_or(1);
        let item = DataType::from_onnx(elem).map_or(4, |d| d.size() as u64);
        let bytes = shape
            .iter()
            .try_fold(item, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|b| b.checked_add(total));
        match bytes {
            Some(b) if b <= MAX_RANDOM_BYTES => total = b,
            _ => {
                return Err(Error::Usage(format!(
                    "random input '{name}' of shape {shape:?} would take {} (limit {} MiB of \
                     generated data): lower --samples or --shape, or pass --data",
                    human_size(shape, item),
                    MAX_RANDOM_BYTES >> 20
                )))
            }
        }
    }
    let mut state = seed ^ 0x5DEE_CE66_D1CE_5EED;
    let mut next = move || {
        // xorshift64*: test inputs only, no quality needed beyond variety.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut uniform = move || (next() >> 11) as f64 / (1u64 << 53) as f64;
    let mut out = Vec::new();
    for vi in graph.inputs() {
        let name = vi.name.clone().unwrap_or_default();
        let shape = shapes
            .get(&name)
            .ok_or_else(|| Error::Usage(format!("no shape for input '{name}'")))?;
        let n: usize = shape.iter().product();
        let elem = shapes_declared(vi).map(|d| d.0).unwrap_or(1);
        let dim = ndarray::IxDyn(shape);
        let high = index_bound(&graph, &name).unwrap_or(2) as f64;
        let t = match DataType::from_onnx(elem) {
            Some(DataType::I64) => TensorData::I64(ndarray::ArrayD::from_shape_fn(dim, |_| {
                (uniform() * high) as i64
            })),
            Some(DataType::I32) => TensorData::I32(ndarray::ArrayD::from_shape_fn(dim, |_| {
                (uniform() * high) as i32
            })),
            Some(DataType::Bool) => {
                TensorData::Bool(ndarray::ArrayD::from_shape_fn(dim, |_| uniform() < 0.5))
            }
            Some(DataType::F32) | None => {
                // Box–Muller.
                let v: Vec<f32> = (0..n)
                    .map(|_| {
                        let (u1, u2) = (uniform().max(1e-12), uniform());
                        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                    })
                    .collect();
                TensorData::F32(
                    ndarray::ArrayD::from_shape_vec(dim, v)
                        .map_err(|e| Error::tensor(&name, e.to_string()))?,
                )
            }
            Some(other) => {
                return Err(Error::Usage(format!(
                    "cannot make random {} data for input '{name}'; pass --data",
                    other.name()
                )))
            }
        };
        out.push(t);
    }
    Ok(out)
}

fn human_size(shape: &[usize], item: u64) -> String {
    let bytes = shape.iter().fold(item as f64, |acc, &d| acc * d as f64);
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// The smallest row count among the tables a `Gather` indexes with `value` (directly or
/// through Cast, Reshape, Unsqueeze, Squeeze, Flatten or Identity); `None` when it indexes none.
fn index_bound(graph: &Graph, value: &str) -> Option<usize> {
    let mut bound: Option<usize> = None;
    let mut stack = vec![value.to_string()];
    let mut seen = std::collections::HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v.clone()) {
            continue;
        }
        for &(node, slot) in graph.consumers(&v) {
            let n = graph.node(node);
            match (n.op_type.as_deref(), slot) {
                (Some("Gather"), 1) => {
                    let table = n
                        .input
                        .first()
                        .and_then(|t| graph.initializer(t).or_else(|| graph.constant(t)));
                    let axis = n
                        .attribute
                        .iter()
                        .find(|a| a.name.as_deref() == Some("axis"))
                        .and_then(|a| a.i)
                        .unwrap_or(0);
                    if let Some(t) = table {
                        let rank = t.dims.len() as i64;
                        let axis = if axis < 0 { axis + rank } else { axis };
                        if let Some(&rows) = usize::try_from(axis).ok().and_then(|a| t.dims.get(a))
                        {
                            let rows = rows.max(1) as usize;
                            bound = Some(bound.map_or(rows, |b| b.min(rows)));
                        }
                    }
                }
                (
                    Some("Cast" | "Identity" | "Unsqueeze" | "Squeeze" | "Flatten" | "Reshape"),
                    0,
                ) => stack.extend(n.output.iter().cloned()),
                _ => {}
            }
        }
    }
    bound
}

/// Concrete input shapes: from bound data if given, else the declared shapes with every
/// symbolic dimension set to `default_dim`, then `overrides` (name → shape) on top.
pub fn input_shapes(
    model: &Model,
    bound: Option<&[TensorData]>,
    overrides: &[(String, Vec<usize>)],
    default_dim: usize,
) -> Result<std::collections::HashMap<String, Vec<usize>>> {
    let graph = Graph::new(model)?;
    let mut shapes = std::collections::HashMap::new();
    for (i, vi) in graph.inputs().iter().enumerate() {
        let name = vi.name.clone().unwrap_or_default();
        let shape = match bound.and_then(|b| b.get(i)) {
            Some(t) => t.shape().to_vec(),
            None => shapes_declared(vi)
                .and_then(|d| d.1)
                .ok_or_else(|| {
                    Error::Usage(format!("input '{name}' declares no shape; give --shape"))
                })?
                .iter()
                .map(|d| match d {
                    Dim::Known(k) => *k,
                    _ => default_dim,
                })
                .collect(),
        };
        shapes.insert(name, shape);
    }
    for (name, shape) in overrides {
        if !shapes.contains_key(name) {
            return Err(Error::Usage(format!(
                "--shape: the model has no input '{name}'"
            )));
        }
        shapes.insert(name.clone(), shape.clone());
    }
    Ok(shapes)
}
