//! An engine's output, read where the engine left it.
//!
//! Calibration reads every tap of every batch once and keeps none of them: on a ResNet-18
//! pair (256 images at 224²) copying ONNX Runtime's outputs into tensors of our own moved
//! 6.9 GB and took 1.4 s of the 12.4 s calibration, on the thread that runs the engine. An
//! engine that can lend its output memory (ONNX Runtime's f32 values) is read in place.

use ndarray::{CowArray, IxDyn};

use crate::onnx::TensorData;

/// One output of one run.
pub enum Output {
    /// Copied into a tensor of our own (tract; ONNX Runtime's other element types).
    Tensor(TensorData),
    /// ONNX Runtime's own f32 value, held until read.
    #[cfg(feature = "ort")]
    Lent(super::ort::LentF32),
}

impl Output {
    /// Its values as f32: borrowed where they are f32, converted otherwise.
    pub fn f32(&self) -> CowArray<'_, f32, IxDyn> {
        match self {
            Output::Tensor(TensorData::F32(a)) => CowArray::from(a.view()),
            Output::Tensor(t) => CowArray::from(t.to_f32()),
            #[cfg(feature = "ort")]
            Output::Lent(v) => CowArray::from(v.view()),
        }
    }

    pub fn shape(&self) -> Vec<usize> {
        match self {
            Output::Tensor(t) => t.shape().to_vec(),
            #[cfg(feature = "ort")]
            Output::Lent(v) => v.view().shape().to_vec(),
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        match self {
            Output::Tensor(t) => t.len() * t.dtype().size(),
            #[cfg(feature = "ort")]
            Output::Lent(v) => v.view().len() * std::mem::size_of::<f32>(),
        }
    }

    /// A tensor of our own (a copy of a lent value): for what outlives the run's batch.
    pub fn to_tensor(&self) -> TensorData {
        match self {
            Output::Tensor(t) => t.clone(),
            #[cfg(feature = "ort")]
            Output::Lent(v) => TensorData::F32(v.view().to_owned()),
        }
    }
}
