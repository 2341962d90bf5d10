//! Conversion between ONNX `TensorProto`s and `ndarray` arrays, for every numeric dtype.
//!
//! ONNX stores tensor contents either as little-endian `raw_data` or in one of the typed repeated
//! fields, with rules that differ per dtype (float16 bit patterns live in `int32_data`, uint32 in
//! `uint64_data`, ...). Both forms are read; we always write `raw_data`, the form every exporter
//! and runtime reads and the one external data uses.

use half::{bf16, f16};
use ndarray::{ArrayD, IxDyn};

use super::proto::TensorProto;
use crate::error::{Error, Result};

/// ONNX element types that mudsc can hold as arrays (`TensorProto.DataType` numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    F32 = 1,
    U8 = 2,
    I8 = 3,
    U16 = 4,
    I16 = 5,
    I32 = 6,
    I64 = 7,
    Bool = 9,
    F16 = 10,
    F64 = 11,
    U32 = 12,
    U64 = 13,
    BF16 = 16,
}

impl DataType {
    /// Every supported dtype, for tests and help texts.
    pub const ALL: [DataType; 13] = [
        DataType::F32,
        DataType::U8,
        DataType::I8,
        DataType::U16,
        DataType::I16,
        DataType::I32,
        DataType::I64,
        DataType::Bool,
        DataType::F16,
        DataType::F64,
        DataType::U32,
        DataType::U64,
        DataType::BF16,
    ];

    pub fn from_onnx(code: i32) -> Option<DataType> {
        DataType::ALL.iter().copied().find(|d| *d as i32 == code)
    }

    /// Whether elements are integers (what [`TensorData::to_labels`] reads).
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DataType::U8
                | DataType::I8
                | DataType::U16
                | DataType::I16
                | DataType::I32
                | DataType::I64
                | DataType::U32
                | DataType::U64
        )
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DataType::U8 | DataType::I8 | DataType::Bool => 1,
            DataType::U16 | DataType::I16 | DataType::F16 | DataType::BF16 => 2,
            DataType::F32 | DataType::I32 | DataType::U32 => 4,
            DataType::F64 | DataType::I64 | DataType::U64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DataType::F32 => "float32",
            DataType::U8 => "uint8",
            DataType::I8 => "int8",
            DataType::U16 => "uint16",
            DataType::I16 => "int16",
            DataType::I32 => "int32",
            DataType::I64 => "int64",
            DataType::Bool => "bool",
            DataType::F16 => "float16",
            DataType::F64 => "float64",
            DataType::U32 => "uint32",
            DataType::U64 => "uint64",
            DataType::BF16 => "bfloat16",
        }
    }
}

/// Name of an ONNX dtype code, including the ones mudsc cannot hold (for error messages).
pub fn onnx_dtype_name(code: i32) -> String {
    match DataType::from_onnx(code) {
        Some(d) => d.name().to_string(),
        None => match code {
            0 => "undefined".into(),
            8 => "string".into(),
            14 => "complex64".into(),
            15 => "complex128".into(),
            17..=20 => "float8".into(),
            21 | 22 => "int4".into(),
            23 => "float4".into(),
            _ => format!("dtype code {code}"),
        },
    }
}

/// A dense array of any supported dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    I8(ArrayD<i8>),
    I16(ArrayD<i16>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
    U8(ArrayD<u8>),
    U16(ArrayD<u16>),
    U32(ArrayD<u32>),
    U64(ArrayD<u64>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` to the inner array of a `TensorData`, whatever its dtype.
#[macro_export]
#[doc(hidden)]
macro_rules! with_array {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::onnx::TensorData::F32($a) => $body,
            $crate::onnx::TensorData::F64($a) => $body,
            $crate::onnx::TensorData::F16($a) => $body,
            $crate::onnx::TensorData::BF16($a) => $body,
            $crate::onnx::TensorData::I8($a) => $body,
            $crate::onnx::TensorData::I16($a) => $body,
            $crate::onnx::TensorData::I32($a) => $body,
            $crate::onnx::TensorData::I64($a) => $body,
            $crate::onnx::TensorData::U8($a) => $body,
            $crate::onnx::TensorData::U16($a) => $body,
            $crate::onnx::TensorData::U32($a) => $body,
            $crate::onnx::TensorData::U64($a) => $body,
            $crate::onnx::TensorData::Bool($a) => $body,
        }
    };
}

/// Little-endian element encoding, the layout of ONNX `raw_data`.
pub trait Element: Copy + Default + 'static {
    const DTYPE: DataType;
    fn write_le(self, out: &mut Vec<u8>);
    fn read_le(bytes: &[u8]) -> Self;
}

macro_rules! element_num {
    ($($t:ty => $d:ident),* $(,)?) => {$(
        impl Element for $t {
            const DTYPE: DataType = DataType::$d;
            fn write_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn read_le(bytes: &[u8]) -> Self {
                let mut b = [0u8; std::mem::size_of::<$t>()];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
        }
    )*};
}
element_num!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i8 => I8, i16 => I16, i32 => I32,
    i64 => I64, u8 => U8, u16 => U16, u32 => U32, u64 => U64);

impl Element for bool {
    const DTYPE: DataType = DataType::Bool;
    fn write_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn read_le(bytes: &[u8]) -> Self {
        bytes[0] != 0
    }
}

/// Builds a `TensorData` of the right variant from a typed array.
pub trait IntoTensorData {
    fn into_tensor_data(self) -> TensorData;
}

macro_rules! into_tensor_data {
    ($($t:ty => $v:ident),* $(,)?) => {$(
        impl IntoTensorData for ArrayD<$t> {
            fn into_tensor_data(self) -> TensorData {
                TensorData::$v(self)
            }
        }
    )*};
}
into_tensor_data!(f32 => F32, f64 => F64, f16 => F16, bf16 => BF16, i8 => I8, i16 => I16,
    i32 => I32, i64 => I64, u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool);

impl TensorData {
    pub fn dtype(&self) -> DataType {
        fn of<T: Element>(_: &ArrayD<T>) -> DataType {
            T::DTYPE
        }
        with_array!(self, a => of(a))
    }

    pub fn shape(&self) -> &[usize] {
        with_array!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        with_array!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as f32, converting from any numeric dtype (labels, masks, half floats).
    pub fn to_f32(&self) -> ArrayD<f32> {
        match self {
            TensorData::F32(a) => a.clone(),
            TensorData::F64(a) => a.mapv(|v| v as f32),
            TensorData::F16(a) => a.mapv(f32::from),
            TensorData::BF16(a) => a.mapv(f32::from),
            TensorData::I8(a) => a.mapv(f32::from),
            TensorData::I16(a) => a.mapv(f32::from),
            TensorData::I32(a) => a.mapv(|v| v as f32),
            TensorData::I64(a) => a.mapv(|v| v as f32),
            TensorData::U8(a) => a.mapv(f32::from),
            TensorData::U16(a) => a.mapv(f32::from),
            TensorData::U32(a) => a.mapv(|v| v as f32),
            TensorData::U64(a) => a.mapv(|v| v as f32),
            TensorData::Bool(a) => a.mapv(|v| v as u8 as f32),
        }
    }

    /// Integer class labels; `None` for float dtypes.
    pub fn to_labels(&self) -> Option<Vec<i64>> {
        let v: Vec<i64> = match self {
            TensorData::I8(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::I16(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::I32(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::I64(a) => a.iter().copied().collect(),
            TensorData::U8(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::U16(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::U32(a) => a.iter().map(|&v| v.into()).collect(),
            TensorData::U64(a) => a.iter().map(|&v| v as i64).collect(),
            _ => return None,
        };
        Some(v)
    }

    /// Rows `start..end` along axis 0 (a batch).
    pub fn slice_rows(&self, start: usize, end: usize) -> TensorData {
        use ndarray::{Axis, Slice};
        fn rows<T: Clone>(a: &ArrayD<T>, s: usize, e: usize) -> ArrayD<T> {
            a.slice_axis(Axis(0), Slice::from(s..e)).to_owned()
        }
        match self {
            TensorData::F32(a) => TensorData::F32(rows(a, start, end)),
            TensorData::F64(a) => TensorData::F64(rows(a, start, end)),
            TensorData::F16(a) => TensorData::F16(rows(a, start, end)),
            TensorData::BF16(a) => TensorData::BF16(rows(a, start, end)),
            TensorData::I8(a) => TensorData::I8(rows(a, start, end)),
            TensorData::I16(a) => TensorData::I16(rows(a, start, end)),
            TensorData::I32(a) => TensorData::I32(rows(a, start, end)),
            TensorData::I64(a) => TensorData::I64(rows(a, start, end)),
            TensorData::U8(a) => TensorData::U8(rows(a, start, end)),
            TensorData::U16(a) => TensorData::U16(rows(a, start, end)),
            TensorData::U32(a) => TensorData::U32(rows(a, start, end)),
            TensorData::U64(a) => TensorData::U64(rows(a, start, end)),
            TensorData::Bool(a) => TensorData::Bool(rows(a, start, end)),
        }
    }

    /// Joins arrays of one dtype along axis 0 (the batches of one output).
    pub fn concat_rows(parts: &[TensorData]) -> std::result::Result<TensorData, String> {
        fn cat<T: Clone>(
            parts: &[TensorData],
            get: impl Fn(&TensorData) -> Option<&ArrayD<T>>,
        ) -> std::result::Result<ArrayD<T>, String> {
            let views = parts
                .iter()
                .map(|p| get(p).map(|a| a.view()).ok_or("batches differ in dtype"))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            ndarray::concatenate(ndarray::Axis(0), &views).map_err(|e| e.to_string())
        }
        macro_rules! go {
            ($($v:ident),*) => {
                match parts.first() {
                    None => Err("no batches".to_string()),
                    $(Some(TensorData::$v(_)) => cat(parts, |p| match p {
                        TensorData::$v(a) => Some(a),
                        _ => None,
                    }).map(TensorData::$v),)*
                }
            };
        }
        go!(F32, F64, F16, BF16, I8, I16, I32, I64, U8, U16, U32, U64, Bool)
    }

    /// Little-endian bytes in row-major order, the ONNX `raw_data` layout.
    pub fn to_raw_bytes(&self) -> Vec<u8> {
        fn raw<T: Element>(a: &ArrayD<T>) -> Vec<u8> {
            let mut out = Vec::with_capacity(a.len() * T::DTYPE.size());
            for &v in a.iter() {
                v.write_le(&mut out);
            }
            out
        }
        with_array!(self, a => raw(a))
    }

    /// An initializer holding this array, as `raw_data`.
    pub fn to_proto(&self, name: &str) -> TensorProto {
        TensorProto {
            name: Some(name.to_string()),
            dims: self.shape().iter().map(|&d| d as i64).collect(),
            data_type: Some(self.dtype() as i32),
            raw_data: Some(self.to_raw_bytes().into()),
            ..Default::default()
        }
    }

    /// Reads a tensor proto whose contents are in memory (`raw_data` or a typed field).
    /// External data must have been resolved by the loader first.
    pub fn from_proto(t: &TensorProto) -> Result<TensorData> {
        let name = t.name.clone().unwrap_or_default();
        if t.data_location == Some(1) && t.raw_data.is_none() {
            return Err(Error::tensor(name, "external data was not loaded"));
        }
        let code = t.data_type.unwrap_or(0);
        let dtype = DataType::from_onnx(code).ok_or_else(|| {
            Error::tensor(
                &name,
                format!("unsupported dtype {}", onnx_dtype_name(code)),
            )
        })?;
        let shape = t
            .dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| Error::tensor(&name, format!("negative dimension in {:?}", t.dims)))?;
        let count = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::tensor(&name, "element count overflows"))?;
        match dtype {
            DataType::F32 => decode::<f32>(t, &name, shape, count, |t| t.float_data.to_vec()),
            DataType::F64 => decode::<f64>(t, &name, shape, count, |t| t.double_data.to_vec()),
            // Half floats, 8/16-bit integers and bool are stored widened in int32_data.
            DataType::F16 => decode::<f16>(t, &name, shape, count, |t| {
                t.int32_data
                    .iter()
                    .map(|&v| f16::from_bits(v as u16))
                    .collect()
            }),
            DataType::BF16 => decode::<bf16>(t, &name, shape, count, |t| {
                t.int32_data
                    .iter()
                    .map(|&v| bf16::from_bits(v as u16))
                    .collect()
            }),
            DataType::I8 => decode::<i8>(t, &name, shape, count, |t| {
                t.int32_data.iter().map(|&v| v as i8).collect()
            }),
            DataType::I16 => decode::<i16>(t, &name, shape, count, |t| {
                t.int32_data.iter().map(|&v| v as i16).collect()
            }),
            DataType::I32 => decode::<i32>(t, &name, shape, count, |t| t.int32_data.clone()),
            DataType::U8 => decode::<u8>(t, &name, shape, count, |t| {
                t.int32_data.iter().map(|&v| v as u8).collect()
            }),
            DataType::U16 => decode::<u16>(t, &name, shape, count, |t| {
                t.int32_data.iter().map(|&v| v as u16).collect()
            }),
            DataType::Bool => decode::<bool>(t, &name, shape, count, |t| {
                t.int32_data.iter().map(|&v| v != 0).collect()
            }),
            DataType::I64 => decode::<i64>(t, &name, shape, count, |t| t.int64_data.clone()),
            // uint32 and uint64 live in uint64_data.
            DataType::U32 => decode::<u32>(t, &name, shape, count, |t| {
                t.uint64_data.iter().map(|&v| v as u32).collect()
            }),
            DataType::U64 => decode::<u64>(t, &name, shape, count, |t| t.uint64_data.clone()),
        }
    }
}

fn decode<T>(
    t: &TensorProto,
    name: &str,
    shape: Vec<usize>,
    count: usize,
    typed: impl Fn(&TensorProto) -> Vec<T>,
) -> Result<TensorData>
where
    T: Element,
    ArrayD<T>: IntoTensorData,
{
    let values: Vec<T> = match &t.raw_data {
        Some(raw) => {
            let size = T::DTYPE.size();
            let need = count.checked_mul(size);
            if need != Some(raw.len()) {
                return Err(Error::tensor(
                    name,
                    format!(
                        "raw_data holds {} bytes, shape {:?} of {} needs {}",
                        raw.len(),
                        shape,
                        T::DTYPE.name(),
                        need.map_or_else(|| "more than 2^64".into(), |n| n.to_string())
                    ),
                ));
            }
            raw.chunks_exact(size).map(T::read_le).collect()
        }
        None => typed(t),
    };
    if values.len() != count {
        return Err(Error::tensor(
            name,
            format!(
                "holds {} values, shape {:?} needs {}",
                values.len(),
                shape,
                count
            ),
        ));
    }
    let array = ArrayD::from_shape_vec(IxDyn(&shape), values)
        .map_err(|e| Error::tensor(name, e.to_string()))?;
    Ok(array.into_tensor_data())
}
