//! A missing ONNX Runtime library is a clear error, not a panic. Its own test binary, so that
//! no other test has loaded the library into the process first.

mod common;

use mudsc::onnx;
use mudsc::runtime::{open_session, BackendKind, BackendOptions};

#[test]
fn missing_ort_library_is_an_error_not_a_panic() {
    let m = onnx::load(common::model("mlp.onnx")).unwrap();
    let options = BackendOptions {
        ort_library: Some("/nonexistent/libonnxruntime.so".into()),
        ..Default::default()
    };
    let e = open_session(BackendKind::Ort, &m, &[], &options)
        .err()
        .expect("a missing library must fail");
    let msg = e.to_string();
    assert!(msg.contains("/nonexistent/libonnxruntime.so"), "{msg}");
    assert!(!e.is_bad_input());
    // Not a bad-library-path tax on later sessions: the real library still loads afterwards.
    open_session(BackendKind::Ort, &m, &[], &BackendOptions::default()).unwrap();
}
