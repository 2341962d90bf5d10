//! External data: tensors whose bytes live in a file beside the model (`data_location =
//! EXTERNAL`, with `location`, `offset` and `length` entries), as exporters write for large
//! models. The loader maps each data file once and hands out zero-copy slices of it.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;

use super::proto::TensorProto;
use super::tensor::DataType;
use super::EXTERNAL;
use crate::error::{Error, Result};

/// Files below this size are read into memory; larger ones are memory-mapped.
const MMAP_THRESHOLD: u64 = 1 << 20;

/// Reads a whole file as `Bytes`, memory-mapping it when large so that a multi-GiB model costs
/// address space rather than resident memory until its tensors are actually touched.
pub(super) fn read_file(path: &Path) -> Result<Bytes> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len < MMAP_THRESHOLD {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        return Ok(Bytes::from(bytes));
    }
    // SAFETY: the map is read-only; as with every mmap-based model loader (tract, ORT), a file
    // truncated by another process while we run is outside what we can guard against.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Bytes::from_owner(super::mapped::MappedFile::new(map)))
}

/// Resolves external tensors of one model, caching each data file.
pub(super) struct ExternalResolver<'a> {
    model_path: &'a Path,
    base_dir: Option<PathBuf>,
    files: HashMap<PathBuf, Bytes>,
}

impl<'a> ExternalResolver<'a> {
    /// `base_dir` is the model's directory; `None` for models loaded from memory, which cannot
    /// refer to external files.
    pub(super) fn new(model_path: &'a Path, base_dir: Option<PathBuf>) -> Self {
        ExternalResolver {
            model_path,
            base_dir,
            files: HashMap::new(),
        }
    }

    /// The data files that were read, so that a save can refuse to overwrite them.
    pub(super) fn files(&self) -> Vec<PathBuf> {
        self.files.keys().cloned().collect()
    }

    /// Replaces an external tensor's reference by its bytes (as `raw_data`).
    pub(super) fn resolve(&mut self, t: &mut TensorProto) -> Result<()> {
        if t.data_location != Some(EXTERNAL) {
            return Ok(());
        }
        let name = t.name.clone().unwrap_or_default();
        let err = |reason: String| Error::ExternalData {
            path: self.model_path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let entry = |key: &str| {
            t.external_data
                .iter()
                .find(|kv| kv.key.as_deref() == Some(key))
                .and_then(|kv| kv.value.clone())
        };
        let location = entry("location").ok_or_else(|| err("no 'location' entry".into()))?;
        let parse = |key: &str| -> Result<Option<u64>> {
            entry(key)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| err(format!("'{key}' is not a byte count: '{v}'")))
                })
                .transpose()
        };
        let offset = parse("offset")?.unwrap_or(0);
        let length = match parse("length")? {
            Some(l) => l,
            None => expected_bytes(t)
                .ok_or_else(|| err("no 'length' entry and the dtype gives no fixed size".into()))?,
        };
        let relative = Path::new(&location);
        if relative.is_absolute()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(err(format!(
                "location '{location}' must be a relative path inside the model's directory"
            )));
        }
        let base = self.base_dir.as_ref().ok_or_else(|| {
            err("model was loaded from memory; external data needs a file path".into())
        })?;
        let file_path = base.join(relative);
        let data = match self.files.get(&file_path) {
            Some(d) => d.clone(),
            None => {
                let real = confined(base, &file_path).map_err(err)?;
                let d = read_file(&real)?;
                self.files.insert(file_path.clone(), d.clone());
                d
            }
        };
        let end = offset
            .checked_add(length)
            .filter(|&e| e <= data.len() as u64)
            .ok_or_else(|| {
                err(format!(
                    "'{}' holds {} bytes but the tensor needs bytes {}..{}",
                    file_path.display(),
                    data.len(),
                    offset,
                    offset.saturating_add(length)
                ))
            })?;
        t.raw_data = Some(data.slice(offset as usize..end as usize));
        t.data_location = None;
        t.external_data.clear();
        Ok(())
    }
}

/// The real path of data file `file` (under the model's directory `base`), which must be a
/// regular file inside `base` once every symbolic link is resolved: a `location` that is a
/// plain relative name can still lead out through a link (`w.bin -> /etc/passwd`, a linked
/// directory), and a FIFO or device would block or stream endlessly. Tensor bytes come back
/// out through `run --output` and merged models, so this is a confidentiality boundary.
fn confined(base: &Path, file: &Path) -> std::result::Result<PathBuf, String> {
    let base_real = base
        .canonicalize()
        .map_err(|e| format!("model directory '{}': {e}", base.display()))?;
    let real = match file.canonicalize() {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!("data file '{}' is missing", file.display()))
        }
        Err(e) => return Err(format!("data file '{}': {e}", file.display())),
    };
    if !real.starts_with(&base_real) {
        return Err(format!(
            "data file '{}' resolves to '{}', outside the model's directory (symbolic links \
             may not lead out of it)",
            file.display(),
            real.display()
        ));
    }
    let meta =
        std::fs::metadata(&real).map_err(|e| format!("data file '{}': {e}", file.display()))?;
    if !meta.is_file() {
        return Err(format!(
            "data file '{}' is not a regular file",
            file.display()
        ));
    }
    Ok(real)
}

/// Byte size implied by a tensor's dims and dtype.
pub(crate) fn expected_bytes(t: &TensorProto) -> Option<u64> {
    let dtype = DataType::from_onnx(t.data_type?)?;
    t.dims.iter().try_fold(dtype.size() as u64, |acc, &d| {
        acc.checked_mul(u64::try_from(d).ok()?)
    })
}
