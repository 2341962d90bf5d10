//! Atomic file output: write to a temporary file in the target's directory, then rename.
//! A failure at any point leaves no partial file, and an input file is never a target.
//!
//! Temporary files are named `.mudsc-<pid>-<random>.tmp`. Those of this process are listed in
//! [`LIVE`] so that the command line's SIGINT/SIGTERM handler can remove them
//! ([`remove_live_temps`]); those of a process that died without cleaning up (SIGKILL, a power
//! cut) are removed by the next write into the same directory ([`clean_stale`]).

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

const TEMP_PREFIX: &str = ".mudsc-";
const TEMP_SUFFIX: &str = ".tmp";
/// A dead process's temporary file is removed only when older than this, so that a file of a
/// live process on another host (a shared file system, other pids) is left alone.
const STALE_AFTER: Duration = Duration::from_secs(10 * 60);

/// Temporary files this process has open, for the signal handler.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

pub(crate) fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `path` as an absolute path with `.` and `..` resolved, its directory through the file
/// system (so symbolic links and other spellings agree) when it exists: two outputs with the
/// same key are the same file (`m.onnx`, `sub/../m.onnx`, `$PWD/m.onnx`).
pub fn output_key(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    let dir = parent_dir(path);
    match (dir.canonicalize(), path.file_name()) {
        (Ok(d), Some(name)) => d.join(name),
        _ => lexical(&std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())),
    }
}

/// `.` and `..` removed without touching the file system.
fn lexical(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// Errors if two of the named outputs (option, path) are one file under any spelling, so that
/// one never silently replaces another.
pub fn refuse_same_outputs(outputs: &[(&str, &Path)]) -> Result<()> {
    for (i, (a_name, a)) in outputs.iter().enumerate() {
        for (b_name, b) in &outputs[..i] {
            if output_key(a) == output_key(b) {
                return Err(Error::Usage(format!(
                    "{a_name} '{}' and {b_name} '{}' are the same file",
                    a.display(),
                    b.display()
                )));
            }
        }
    }
    Ok(())
}

/// Errors if `target` is (or links to) one of the protected files (callers with a long
/// computation ahead check early, before `write_atomic` checks again).
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

/// Errors unless `target` can be written by renaming a new file over it: an existing symbolic
/// link, device node, FIFO, socket or directory there is refused (a rename would replace the
/// node itself, `/dev/null` or a pipe a reader waits on, by a regular file).
pub fn refuse_special(target: &Path) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(target) else {
        return Ok(());
    };
    let kind = meta.file_type();
    let what = if kind.is_file() {
        return Ok(());
    } else if kind.is_symlink() {
        "a symbolic link"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file (a device, FIFO or socket)"
    };
    Err(Error::Usage(format!(
        "output '{}' is {what}; outputs are written to a new file and renamed into place, so \
         only a regular file (or a path that does not exist yet) can be an output",
        target.display()
    )))
}

/// Every check an output path can have before the work starts: not an input, not a special
/// file, in a directory that exists and where a file can be created. Commands call it first so
/// that a bad output path costs nothing.
pub fn check_output(target: &Path, protect: &[PathBuf]) -> Result<()> {
    refuse_protected(target, protect)?;
    refuse_special(target)?;
    let dir = parent_dir(target);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::Usage(format!(
                "output '{}': '{}' is not a directory",
                target.display(),
                dir.display()
            )))
        }
        Err(e) => return Err(Error::io(target, e)),
    }
    // A probe file: permissions, read-only mounts and full directories show now.
    new_temp(&dir, target).map(drop)
}

/// A temporary file in the output directory, listed in [`LIVE`] while it exists.
pub(crate) struct Temp {
    file: Option<tempfile::NamedTempFile>,
    path: PathBuf,
}

impl Temp {
    pub(crate) fn persist(mut self, target: &Path) -> Result<()> {
        refuse_special(target)?;
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        let result = file
            .persist(target)
            .map(drop)
            .map_err(|e| Error::io(target, e.error));
        forget_live(&self.path);
        result
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        drop(self.file.take()); // removes the file
        forget_live(&self.path);
    }
}

fn forget_live(path: &Path) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| p != path);
    }
}

fn new_temp(dir: &Path, target: &Path) -> Result<Temp> {
    use std::os::unix::fs::PermissionsExt;
    clean_stale(dir);
    let file = tempfile::Builder::new()
        .prefix(&format!("{TEMP_PREFIX}{}-", std::process::id()))
        .suffix(TEMP_SUFFIX)
        // Created 0666 less the umask, as any other program's output (tempfile's 0600 default
        // made merged models unreadable to the rest of a group).
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .map_err(|e| Error::io(target, e))?;
    let path = file.path().to_path_buf();
    if let Ok(mut live) = LIVE.lock() {
        live.push(path.clone());
    }
    Ok(Temp {
        file: Some(file),
        path,
    })
}

pub(crate) fn write_temp(dir: &Path, target: &Path, bytes: &[u8]) -> Result<Temp> {
    let mut tmp = new_temp(dir, target)?;
    if let Some(f) = tmp.file.as_mut() {
        f.write_all(bytes).map_err(|e| Error::io(target, e))?;
        f.as_file().sync_all().map_err(|e| Error::io(target, e))?;
    }
    Ok(tmp)
}

/// Removes this process's temporary files (for a signal handler: best effort, no errors).
pub fn remove_live_temps() {
    let paths = match LIVE.lock() {
        Ok(live) => live.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}

/// Removes `.mudsc-<pid>-*.tmp` files in `dir` left by a process that no longer runs, once
/// they are older than [`STALE_AFTER`]. Best effort.
pub fn clean_stale(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let me = std::process::id();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(TEMP_PREFIX)
            .filter(|r| r.ends_with(TEMP_SUFFIX))
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me || process_alive(pid) {
            continue;
        }
        let old = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_AFTER);
        if old {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists; no signal is sent.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Writes any bytes atomically (used for npz outputs and reports too).
pub fn write_atomic(path: &Path, protect: &[PathBuf], bytes: &[u8]) -> Result<()> {
    refuse_protected(path, protect)?;
    refuse_special(path)?;
    let tmp = write_temp(&parent_dir(path), path, bytes)?;
    tmp.persist(path)
}

/// `write_atomic` for output produced piece by piece through a buffered writer: a statistics
/// shard of gigabytes is never held whole in memory. An error from `write` leaves no file.
pub fn write_atomic_with(
    path: &Path,
    protect: &[PathBuf],
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    refuse_protected(path, protect)?;
    refuse_special(path)?;
    let mut tmp = new_temp(&parent_dir(path), path)?;
    if let Some(f) = tmp.file.as_mut() {
        let mut out = std::io::BufWriter::with_capacity(1 << 20, f.as_file_mut());
        write(&mut out)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io(path, e))?;
        drop(out);
        f.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    }
    tmp.persist(path)
}
