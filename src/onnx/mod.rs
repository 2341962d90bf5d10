//! ONNX model I/O: protobuf types, loading (with external data), saving, tensors as arrays.

mod external;
mod load;
pub mod mapped;
pub mod proto;
mod save;
mod tensor;

pub use load::{load, load_bytes, Model, MAX_IR_VERSION};
pub use save::{data_file_for, save, ExternalData, SaveOptions, Saved};
pub use tensor::{onnx_dtype_name, DataType, Element, IntoTensorData, TensorData};

/// Value of `TensorProto.data_location` for tensors stored in an external file.
pub(crate) const EXTERNAL: i32 = 1;
