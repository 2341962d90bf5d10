//! Atomic file output: write to a temporary file in the target's directory, then rename.
//! A failure at any point leaves no partial file, and an input file is never a target.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Errors if `target` is (or links to) one of the protected files.
pub fn refuse_protected(target: &Path, protect: &[PathBuf]) -> Result<()> {
    let Ok(target_real) = target.canonicalize() else {
        return Ok(()); // does not exist yet: cannot be an input
    };
    for p in protect {
        if p.canonicalize().ok().as_deref() == Some(target_real.as_path()) {
            return Err(Error::Usage(format!(
                "refusing to overwrite input file '{}'",
                target.display()
            )));
        }
    }
    Ok(())
}

pub(crate) fn write_temp(
    dir: &Path,
    target: &Path,
    bytes: &[u8],
) -> Result<tempfile::NamedTempFile> {
    let mut tmp = tempfile::Builder::new()
        .prefix(".mudsc-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io(target, e))?;
    tmp.write_all(bytes).map_err(|e| Error::io(target, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(target, e))?;
    Ok(tmp)
}

pub(crate) fn persist(tmp: tempfile::NamedTempFile, target: &Path) -> Result<()> {
    tmp.persist(target)
        .map_err(|e| Error::io(target, e.error))?;
    Ok(())
}

/// Writes any bytes atomically (used for npz outputs and reports too).
pub fn write_atomic(path: &Path, protect: &[PathBuf], bytes: &[u8]) -> Result<()> {
    refuse_protected(path, protect)?;
    let tmp = write_temp(&parent_dir(path), path, bytes)?;
    persist(tmp, path)
}
