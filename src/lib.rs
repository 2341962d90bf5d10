//! mudsc: training-free merging of ONNX models trained on different tasks.
//!
//! The pipeline, one module per stage: [`onnx`] (load/save) → [`graph`] (the graph view and
//! shapes) → [`runtime`] (inference, the calibration read points) → [`eval`]. Later stages
//! (symmetry discovery, statistics, similarity, matching, rewrite) build on these.

pub mod atomic;
pub mod data;
pub mod error;
pub mod eval;
#[doc(hidden)]
pub mod fuzzing;
pub mod graph;
pub mod inspect;
pub mod landscape;
pub mod merge;
pub mod onnx;
pub mod runtime;
pub mod stats;
pub mod symmetry;

pub use error::{Error, Result};
