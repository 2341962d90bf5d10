//! An ONNX model from arbitrary bytes through shape inference (tract) and symmetry discovery,
//! as `mudsc groups` runs it. Any panic in mudsc, abort, OOM or timeout is a bug.
//!
//! mudsc runs tract under `catch_unwind` (tract panics on some malformed models) and turns
//! such a panic into an error; libFuzzer's hook would abort on it first, so panics raised
//! inside tract's own crates are let through to that guard here.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        let abort = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.location().is_some_and(|l| l.file().contains("/tract-")) {
                return;
            }
            abort(info);
        }));
    },
    |data: &[u8]| {
        let _ = mudsc::fuzzing::onnx_model_inferred(data);
    }
);
