//! ONNX test-data directories (`test_data_set_N/input_K.pb`): one serialized `TensorProto` per
//! input, the layout of the ONNX model zoo and backend tests.

use std::path::{Path, PathBuf};

use prost::Message;

use super::NamedArrays;
use crate::error::{Error, Result};
use crate::onnx::proto::TensorProto;
use crate::onnx::TensorData;

/// Reads `input_*.pb` files of a directory in index order. Tensors without a name are keyed
/// `input_K` and bound to graph inputs by position.
pub fn read_pb_dir(dir: &Path) -> Result<NamedArrays> {
    let mut files: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let stem = path.file_name()?.to_str()?.strip_prefix("input_")?;
            let index = stem.strip_suffix(".pb")?.parse().ok()?;
            Some((index, path))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::data(dir, "no input_K.pb files in this directory"));
    }
    let mut arrays = Vec::with_capacity(files.len());
    for (index, path) in files {
        arrays.push(read_pb(&path, index)?);
    }
    Ok(NamedArrays(arrays))
}

/// Reads one serialized `TensorProto`.
pub fn read_pb(path: &Path, index: usize) -> Result<(String, TensorData)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let t = TensorProto::decode(bytes.as_slice())
        .map_err(|e| Error::data(path, format!("not a serialized ONNX TensorProto: {e}")))?;
    let name = t
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| format!("input_{index}"));
    let data = TensorData::from_proto(&t).map_err(|e| Error::data(path, e.to_string()))?;
    Ok((name, data))
}
