//! Saving models atomically, inline or with external data.
//!
//! Protobuf cannot hold more than 2 GiB, and ONNX Runtime and the Python `onnx` package reject
//! such files even though prost would write them; above that size the initializers go to one
//! data file beside the model (the convention of `onnx.save_model(..., all_tensors_to_one_file)`).
//! Both files are written to temporary names and renamed into place, so a failure never leaves a
//! partial output, and an input file is never a target.

use std::path::{Path, PathBuf};

use prost::Message;

use super::proto::{GraphProto, ModelProto, StringStringEntryProto, TensorProto};
use super::tensor::TensorData;
use super::{Model, EXTERNAL};
use crate::atomic::{parent_dir, refuse_protected, refuse_special, write_temp};
use crate::error::{Error, Result};

/// Protobuf's hard limit, less headroom for the graph structure itself.
const INLINE_LIMIT: usize = (2 << 30) - (64 << 20);
/// Tensors smaller than this stay inline: shape-like int64 constants must (ORT's shape inference
/// cannot read them from external files), and tiny ones gain nothing.
const EXTERNAL_MIN_BYTES: usize = 1024;
/// Large tensors start on page boundaries so that readers can map them directly.
const PAGE: u64 = 4096;
const SMALL_ALIGN: u64 = 64;

/// Where initializers go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExternalData {
    /// Inline, unless the model would exceed protobuf's 2 GiB limit.
    #[default]
    Auto,
    /// Always to one external file; `None` names it `<model file name>.data`.
    Always(Option<String>),
}

#[derive(Clone, Debug, Default)]
pub struct SaveOptions {
    pub external_data: ExternalData,
    /// Files that must not be overwritten (the inputs of the job).
    pub protect: Vec<PathBuf>,
}

impl Model {
    /// Saves this model, refusing to overwrite the files it was loaded from.
    pub fn save(&self, path: impl AsRef<Path>, options: &SaveOptions) -> Result<Saved> {
        let mut options = options.clone();
        options.protect.extend(self.source_files());
        save(&self.proto, path.as_ref(), &options)
    }
}

/// The files one [`save`] wrote, so that a later failure can undo exactly those (and never a
/// `<name>.data` that was there before, such as an input model's own weights).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Saved {
    pub model: PathBuf,
    /// The external data file, when this save wrote one.
    pub data: Option<PathBuf>,
}

impl Saved {
    /// Removes what the save wrote. Best effort: what is not there is not an error.
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.model);
        if let Some(d) = &self.data {
            let _ = std::fs::remove_file(d);
        }
    }
}

/// The external data file `save` would write beside `path` with `options` (for refusing
/// other outputs of the same name before any work); `None` when the model stays inline or
/// its size decides at save time.
pub fn data_file_for(path: &Path, options: &SaveOptions) -> Option<PathBuf> {
    let name = match &options.external_data {
        ExternalData::Always(Some(name)) => name.clone(),
        ExternalData::Always(None) => default_data_name(path).ok()?,
        ExternalData::Auto => return None,
    };
    Some(parent_dir(path).join(name))
}

/// Saves a model proto to `path` (atomically), honouring `options`.
pub fn save(proto: &ModelProto, path: &Path, options: &SaveOptions) -> Result<Saved> {
    let external_name = match &options.external_data {
        ExternalData::Always(Some(name)) => Some(name.clone()),
        ExternalData::Always(None) => Some(default_data_name(path)?),
        ExternalData::Auto if proto.encoded_len() > INLINE_LIMIT => Some(default_data_name(path)?),
        ExternalData::Auto => None,
    };
    let dir = parent_dir(path);
    let data_path = external_name.as_ref().map(|n| dir.join(n));
    for target in std::iter::once(path).chain(data_path.as_deref()) {
        refuse_protected(target, &options.protect)?;
        refuse_special(target)?;
    }
    if let Some(d) = &data_path {
        if crate::atomic::output_key(d) == crate::atomic::output_key(path) {
            return Err(Error::Usage(format!(
                "the external data file '{}' would be the model file itself",
                d.display()
            )));
        }
    }
    match (external_name, data_path) {
        (Some(name), Some(data_path)) => {
            validate_data_name(&name)?;
            let mut proto = proto.clone();
            let graph = proto
                .graph
                .as_mut()
                .ok_or_else(|| Error::Usage("cannot save a model without a graph".into()))?;
            let data = externalize(graph, &name)?;
            let data_tmp = write_temp(&dir, &data_path, &data)?;
            let model_tmp = write_temp(&dir, path, &proto.encode_to_vec())?;
            data_tmp.persist(&data_path)?;
            // Without its model, the data file is debris: take it back.
            if let Err(e) = model_tmp.persist(path) {
                let _ = std::fs::remove_file(&data_path);
                return Err(e);
            }
            Ok(Saved {
                model: path.to_path_buf(),
                data: Some(data_path),
            })
        }
        _ => {
            let tmp = write_temp(&dir, path, &proto.encode_to_vec())?;
            tmp.persist(path)?;
            Ok(Saved {
                model: path.to_path_buf(),
                data: None,
            })
        }
    }
}

/// Moves every large initializer's bytes into one buffer and points the tensor at it.
fn externalize(graph: &mut GraphProto, location: &str) -> Result<Vec<u8>> {
    let mut data: Vec<u8> = Vec::new();
    for t in &mut graph.initializer {
        let raw = raw_bytes(t)?;
        if raw.len() < EXTERNAL_MIN_BYTES {
            continue;
        }
        let align = if raw.len() as u64 >= PAGE {
            PAGE
        } else {
            SMALL_ALIGN
        };
        let offset = (data.len() as u64).div_ceil(align) * align;
        data.resize(offset as usize, 0);
        data.extend_from_slice(&raw);
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: Some(k.into()),
            value: Some(v),
        };
        *t = TensorProto {
            dims: std::mem::take(&mut t.dims),
            data_type: t.data_type,
            name: t.name.take(),
            doc_string: t.doc_string.take(),
            metadata_props: std::mem::take(&mut t.metadata_props),
            data_location: Some(EXTERNAL),
            external_data: vec![
                entry("location", location.to_string()),
                entry("offset", offset.to_string()),
                entry("length", raw.len().to_string()),
            ],
            ..Default::default()
        };
    }
    Ok(data)
}

/// The tensor's contents as little-endian bytes, whichever field held them.
fn raw_bytes(t: &TensorProto) -> Result<Vec<u8>> {
    match &t.raw_data {
        Some(raw) => Ok(raw.to_vec()),
        None => Ok(TensorData::from_proto(t)?.to_raw_bytes()),
    }
}

fn default_data_name(path: &Path) -> Result<String> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("'{}' is not a file path", path.display())))?;
    Ok(format!("{}.data", name.to_string_lossy()))
}

fn validate_data_name(name: &str) -> Result<()> {
    let p = Path::new(name);
    if name.is_empty() || p.components().count() != 1 || p.is_absolute() || name == ".." {
        return Err(Error::Usage(format!(
            "external data name '{name}' must be a plain file name (it is stored beside the model)"
        )));
    }
    Ok(())
}
