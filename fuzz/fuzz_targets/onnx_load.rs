//! The ONNX loader on arbitrary bytes, then everything that reads a freshly loaded model
//! without running it: the graph view, the summary `inspect` prints, every tensor decoded, the
//! architecture comparison and discovery on the shapes the file states. Any panic, abort, OOM
//! or timeout is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mudsc::fuzzing::onnx_model(data);
});
