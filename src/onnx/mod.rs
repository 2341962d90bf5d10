//! ONNX model I/O: protobuf types, loading (with external data), saving, tensors as arrays.

mod external;
mod load;
pub mod mapped;
pub mod proto;
mod save;
mod tensor;

pub(crate) use external::expected_bytes;
pub use load::{load, load_bytes, Model, MAX_IR_VERSION};
pub use save::{data_file_for, save, ExternalData, SaveOptions, Saved};
pub use tensor::{onnx_dtype_name, DataType, Element, IntoTensorData, TensorData};

/// Value of `TensorProto.data_location` for tensors stored in an external file.
pub(crate) const EXTERNAL: i32 = 1;

/// A graph-input entry for an initializer: its element type and shape (as IR < 4 requires
/// of every initializer, and as shape inference reads a weight given without its values).
pub fn initializer_input(t: &proto::TensorProto) -> proto::ValueInfoProto {
    use proto::{tensor_shape_proto, type_proto, TensorShapeProto, TypeProto, ValueInfoProto};
    ValueInfoProto {
        name: t.name.clone(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: t.data_type,
                shape: Some(TensorShapeProto {
                    dim: t
                        .dims
                        .iter()
                        .map(|&d| tensor_shape_proto::Dimension {
                            value: Some(tensor_shape_proto::dimension::Value::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
