//! Where the binary finds ONNX Runtime (`cargo install`ed, it has no checkout to rely on):
//! `--ort-lib`, `ORT_DYLIB_PATH`, an installed `onnxruntime` Python package, the fetched copy,
//! in that order, and tract with a note when none gives one. The Python package is faked by a
//! `python3` on PATH that names a package directory; its library is a file that is not a
//! library, so a run that picks it fails naming it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `mudsc check` of the bundled MLP with PATH = `path` only, no virtual environment and no
/// `ORT_DYLIB_PATH` unless given.
fn check(path: &Path, extra: &[&str], ort_dylib: Option<&Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mudsc"));
    c.args([
        "check",
        root().join("fixtures/models/mlp_a.onnx").to_str().unwrap(),
        "--trials",
        "1",
    ])
    .args(extra)
    .env("PATH", path)
    .env_remove("VIRTUAL_ENV")
    .env_remove("ORT_DYLIB_PATH");
    if let Some(lib) = ort_dylib {
        c.env("ORT_DYLIB_PATH", lib);
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn the_library_is_looked_up_in_order() {
    let fetched = root().join("third_party/onnxruntime/libonnxruntime.so.1");
    assert!(fetched.exists(), "scripts/setup.sh fetches the library");
    let dir = tempfile::tempdir().unwrap();
    // A fake interpreter whose onnxruntime package holds a library that does not load.
    let package = dir.path().join("site-packages/onnxruntime");
    std::fs::create_dir_all(package.join("capi")).unwrap();
    let fake = package.join("capi/libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a library").unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let python = bin.join("python3");
    std::fs::write(
        &python,
        format!("#!/bin/sh\necho '{}'\n", package.display()),
    )
    .unwrap();
    let mut perms = std::fs::metadata(&python).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&python, perms).unwrap();
    // /bin for the fake interpreter's shell.
    let path =
        std::env::join_paths([bin.as_path(), Path::new("/bin"), Path::new("/usr/bin")]).unwrap();
    let path = Path::new(&path);

    // The Python package comes before the fetched copy: its (broken) library is the one tried.
    let o = check(path, &["--backend", "ort"], None);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(fake.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    // ORT_DYLIB_PATH comes before the package, --ort-lib before both.
    let o = check(path, &["--backend", "ort"], Some(&fetched));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = check(
        path,
        &["--backend", "ort", "--ort-lib", fetched.to_str().unwrap()],
        Some(&fake),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // No python at all: the fetched copy, no panic, no note.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = check(&empty, &[], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("tract"), "{}", stderr(&o));
    // An onnxruntime too old for the bindings is skipped with a note, for the fetched copy.
    std::fs::rename(&fake, package.join("capi/libonnxruntime.so.1.24.4")).unwrap();
    let o = check(path, &["--backend", "ort"], None);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("is version 1.24.4"), "{}", stderr(&o));
    // A library named but missing: tract, with a one-line note saying where to get ONNX Runtime.
    let o = check(&empty, &[], Some(&dir.path().join("none.so")));
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    let note: Vec<&str> = err.lines().filter(|l| l.contains("tract")).collect();
    assert_eq!(note.len(), 1, "{}", stderr(&o));
    assert!(
        note[0].contains("none.so") && note[0].contains("pip install onnxruntime"),
        "{}",
        note[0]
    );
}
