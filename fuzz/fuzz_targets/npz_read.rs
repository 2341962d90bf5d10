//! The `.npz` and `.npy` readers on arbitrary bytes. Any panic, abort, OOM or timeout is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = mudsc::fuzzing::numpy_data(data);
});
