//! mudsc: training-free merging of ONNX models trained on different tasks.
//!
//! The pipeline, one module per stage: [`onnx`] (load/save) → [`graph`] (the graph view and
//! shapes) → [`runtime`] (inference, the calibration read points) → [`eval`]. Later stages
//! (symmetry discovery, statistics, similarity, matching, rewrite) build on these.

// The command line lives in the library (not only in the binary) so that the Python package's
// `mudsc` command runs the very same code; its modules name the library `mudsc::`, as a
// separate crate would.
extern crate self as mudsc;

pub mod atomic;
pub mod card;
#[doc(hidden)]
pub mod cli;
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
#[cfg(feature = "python")]
mod python;
pub mod runtime;
pub mod same_base;
pub mod stats;
pub mod symmetry;

pub use error::{Error, Result};
