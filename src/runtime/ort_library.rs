//! Where the ONNX Runtime shared library comes from, in this order: `--ort-lib`, then
//! `ORT_DYLIB_PATH`, then an installed `onnxruntime` Python package (its wheel ships the plain
//! C-API library as `onnxruntime/capi/libonnxruntime.so.<version>`), then the copy that
//! `scripts/fetch-onnxruntime.sh` put into the source tree. The Python package comes before the
//! fetched copy because a `cargo install`ed binary outlives its checkout, and because
//! `pip install mudsc` brings that package: then nothing else is needed.
//!
//! The Python package is found by asking an interpreter (the active virtual environment's,
//! else `python3` on PATH) where `onnxruntime` lives, without importing it; inside the Python
//! extension the running interpreter says it directly ([`use_python_package`]). No interpreter,
//! no package or a library older than the one the `ort` crate needs just moves on to the next
//! place: never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};

use super::BackendOptions;

/// The oldest ONNX Runtime the `ort` crate's `api-31` feature accepts (1.31).
const MIN_MINOR: u32 = 31;

/// The package directory the embedding Python interpreter reported (the Python extension sets
/// it at import), which replaces asking a `python3` process.
static PACKAGE_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Tells the locator where the running interpreter's `onnxruntime` package is (called by the
/// Python extension at import; `None` when the package is not installed).
pub fn use_python_package(dir: Option<PathBuf>) {
    if let Ok(mut slot) = PACKAGE_DIR.lock() {
        *slot = Some(dir.unwrap_or_default());
    }
}

/// The library to load for `options`: the first place in the order above that gives one (for
/// `--ort-lib` and `ORT_DYLIB_PATH`, whatever they name, so that a wrong path is reported).
/// When none does, the fetched copy's path, which does not exist then.
pub fn library_path(options: &BackendOptions) -> PathBuf {
    if let Some(p) = &options.ort_library {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    if let Some(p) = python_package_library() {
        return p;
    }
    fetched_copy()
}

/// The copy `scripts/fetch-onnxruntime.sh` puts into the source tree this binary was built
/// from.
pub fn fetched_copy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("third_party/onnxruntime/libonnxruntime.so.1")
}

/// The library of the installed `onnxruntime` Python package, looked up once per process.
fn python_package_library() -> Option<PathBuf> {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let told = PACKAGE_DIR.lock().ok().and_then(|slot| slot.clone());
            let dir = match told {
                Some(dir) if dir.as_os_str().is_empty() => return None,
                Some(dir) => dir,
                None => ask_python()?,
            };
            library_in_package(&dir)
        })
        .clone()
}

/// Where an interpreter says the `onnxruntime` package is: the active virtual environment's
/// python first, then `python3` on PATH. `find_spec` locates the package without importing it
/// (importing ONNX Runtime takes a second).
fn ask_python() -> Option<PathBuf> {
    const SCRIPT: &str = "import importlib.util as u; s = u.find_spec('onnxruntime'); \
                          print(list(s.submodule_search_locations)[0] if s and \
                          s.submodule_search_locations else '')";
    let venv = std::env::var_os("VIRTUAL_ENV").map(|v| PathBuf::from(v).join("bin/python"));
    let interpreters = venv.into_iter().chain([PathBuf::from("python3")]);
    for python in interpreters {
        let Ok(out) = Command::new(&python)
            .args(["-c", SCRIPT])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
        else {
            continue;
        };
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dir.is_empty() {
            return Some(PathBuf::from(dir));
        }
    }
    None
}

/// The newest `capi/libonnxruntime.so.<major>.<minor>.<patch>` in an `onnxruntime` package
/// directory that the `ort` crate can use; an older one is skipped with a note.
pub fn library_in_package(dir: &Path) -> Option<PathBuf> {
    let capi = dir.join("capi");
    let mut found: Vec<((u32, u32, u32), PathBuf)> = std::fs::read_dir(&capi)
        .ok()?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?;
            Some((version_of(name)?, path))
        })
        .collect();
    found.sort();
    let (version, path) = found.pop()?;
    if version.0 == 1 && version.1 >= MIN_MINOR || version.0 > 1 {
        Some(path)
    } else {
        super::warn_once(&format!(
            "the onnxruntime Python package at '{}' is version {}.{}.{}; mudsc needs ONNX \
             Runtime 1.{MIN_MINOR} or newer, so it is not used (pip install -U onnxruntime)",
            dir.display(),
            version.0,
            version.1,
            version.2
        ));
        None
    }
}

/// `(1, 31, 1)` from `libonnxruntime.so.1.31.1`.
fn version_of(file_name: &str) -> Option<(u32, u32, u32)> {
    let mut parts = file_name
        .strip_prefix("libonnxruntime.so.")?
        .split('.')
        .map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_file_name() {
        assert_eq!(version_of("libonnxruntime.so.1.31.1"), Some((1, 31, 1)));
        assert_eq!(version_of("libonnxruntime.so.1"), None);
        assert_eq!(version_of("libonnxruntime.so.1.31.1.bak"), None);
        assert_eq!(version_of("libonnxruntime_providers_shared.so"), None);
    }

    #[test]
    fn the_newest_usable_library_of_a_package_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join("capi");
        std::fs::create_dir(&capi).unwrap();
        assert_eq!(library_in_package(dir.path()), None);
        std::fs::write(capi.join("libonnxruntime.so.1.24.4"), b"").unwrap();
        // Too old for the api-31 bindings: skipped (with a note), not loaded to fail later.
        assert_eq!(library_in_package(dir.path()), None);
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(
            library_in_package(dir.path()),
            Some(capi.join("libonnxruntime.so.1.31.1"))
        );
        std::fs::write(capi.join("libonnxruntime.so.1.32.0"), b"").unwrap();
        assert_eq!(
            library_in_package(dir.path()),
            Some(capi.join("libonnxruntime.so.1.32.0"))
        );
    }
}
