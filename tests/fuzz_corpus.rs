//! The fuzz targets' corpora and crash regressions, replayed in plain `cargo test` (no
//! cargo-fuzz, no nightly): every input the fuzzers kept (`fuzz/corpus/<target>`) and every
//! crash, OOM or panic they or a review found and that was fixed (`fuzz/regressions/<target>`)
//! goes through the same entry points as the fuzz targets (`mudsc::fuzzing`). None may panic;
//! an unbounded allocation aborts this test binary, which fails the test too.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn fuzz_dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(sub)
}

/// Runs `entry` on every file; returns how many were refused (errors), failing on any panic.
fn replay(paths: &[PathBuf], entry: fn(&[u8]) -> mudsc::Result<()>) -> usize {
    let mut panics = Vec::new();
    let mut refused = 0;
    for path in paths {
        let bytes = std::fs::read(path).unwrap();
        match catch_unwind(AssertUnwindSafe(|| entry(&bytes))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                refused += 1;
                let msg = e.to_string();
                assert!(!msg.is_empty(), "{}: empty error message", path.display());
            }
            Err(_) => panics.push(path.display().to_string()),
        }
    }
    assert!(panics.is_empty(), "panicked on: {panics:#?}");
    refused
}

#[test]
fn onnx_corpus_and_regressions_never_panic() {
    let corpus = files(&fuzz_dir("corpus/onnx_load"));
    // A corpus that went missing would make this test pass without checking anything.
    assert!(corpus.len() >= 50, "{} corpus files", corpus.len());
    replay(&corpus, mudsc::fuzzing::onnx_model);
    let regressions = files(&fuzz_dir("regressions/onnx_load"));
    assert!(!regressions.is_empty());
    replay(&regressions, mudsc::fuzzing::onnx_model);
}

#[test]
fn onnx_inference_corpus_and_regressions_never_panic() {
    let corpus = files(&fuzz_dir("corpus/onnx_infer"));
    assert!(corpus.len() >= 20, "{} corpus files", corpus.len());
    replay(&corpus, mudsc::fuzzing::onnx_model_inferred);
    // Each crash was a malformed model that tract panicked or looped on: now refused first;
    // those of discovery itself (`crash-discovery-*`, e.g. Split pieces whose sizes overflow)
    // fix the node they are about, so they only must not panic.
    let regressions = files(&fuzz_dir("regressions/onnx_infer"));
    assert!(!regressions.is_empty());
    let ours = regressions
        .iter()
        .filter(|p| p.to_string_lossy().contains("crash-discovery-"))
        .count();
    assert!(replay(&regressions, mudsc::fuzzing::onnx_model_inferred) >= regressions.len() - ours);
}

#[test]
fn numpy_corpus_and_regressions_never_panic() {
    let corpus = files(&fuzz_dir("corpus/npz_read"));
    assert!(corpus.len() >= 50, "{} corpus files", corpus.len());
    let refused = replay(&corpus, mudsc::fuzzing::numpy_data);
    assert!(refused < corpus.len());
    let regressions = files(&fuzz_dir("regressions/npz_read"));
    assert!(!regressions.is_empty());
    // Every crash input was a corrupt file: each must now be refused with an error.
    assert_eq!(
        replay(&regressions, mudsc::fuzzing::numpy_data),
        regressions.len()
    );
}

/// The hardened numpy reader still reads what numpy writes (the seeds cover every dtype,
/// header version, layout and compression), so the checks refuse only what is corrupt.
#[test]
fn numpy_reader_reads_what_numpy_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (onnx, npz) = (dir.path().join("onnx"), dir.path().join("npz"));
    let script = fuzz_dir("seeds/make_seeds.py");
    let status = std::process::Command::new(common::python_exe())
        .args([
            script.to_str().unwrap(),
            onnx.to_str().unwrap(),
            npz.to_str().unwrap(),
        ])
        .status()
        .expect("python must be installed (scripts/setup.sh)");
    assert!(status.success());
    for path in files(&npz) {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let refused = ["f16.npy", "complex.npy", "object.npy", "refused_dtype.npz"];
        let empty = ["not_npy.npz", "empty.npz"];
        let got = mudsc::data::read(&path);
        if refused.contains(&name.as_str()) {
            let e = got.expect_err(&name).to_string();
            assert!(e.contains("unsupported dtype"), "{name}: {e}");
        } else if empty.contains(&name.as_str()) {
            assert!(got.is_err(), "{name}");
        } else {
            let arrays = got.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(!arrays.0.is_empty(), "{name}");
        }
    }
    // Values survive: the Fortran-ordered and big-endian arrays read as numpy sees them.
    let f = mudsc::data::read(&npz.join("fortran.npy")).unwrap();
    let be = mudsc::data::read(&npz.join("bigendian.npy")).unwrap();
    assert_eq!(f.0[0].1.shape(), &[2, 3]);
    assert_eq!(
        be.0[0].1.to_f32().iter().copied().collect::<Vec<_>>(),
        vec![0.0, 1.0, 2.0]
    );
}
