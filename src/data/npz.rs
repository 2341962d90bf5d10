//! `.npz` and `.npy` files (numpy's formats), read and written with `ndarray-npy`.
//!
//! numpy files carry their dtype in a header, but `ndarray-npy` reads into a statically typed
//! array; we try each supported element type and keep the first whose descriptor matches.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter, ReadNpyError, ReadNpyExt, ReadNpzError, ReadableElement};

use super::NamedArrays;
use crate::error::{Error, Result};
use crate::onnx::{IntoTensorData, TensorData};

type NpzRead<R> = fn(&mut NpzReader<R>, &str) -> Result<Option<TensorData>, ReadNpzError>;
type NpyRead = fn(&[u8]) -> Result<Option<TensorData>, ReadNpyError>;

fn npz_typed<R: Read + Seek, T: ReadableElement>(
    npz: &mut NpzReader<R>,
    name: &str,
) -> Result<Option<TensorData>, ReadNpzError>
where
    ArrayD<T>: IntoTensorData,
{
    match npz.by_name::<OwnedRepr<T>, IxDyn>(name) {
        Ok(a) => Ok(Some(a.into_tensor_data())),
        Err(ReadNpzError::Npy(ReadNpyError::WrongDescriptor(_))) => Ok(None),
        Err(e) => Err(e),
    }
}

fn npy_typed<T: ReadableElement>(bytes: &[u8]) -> Result<Option<TensorData>, ReadNpyError>
where
    ArrayD<T>: IntoTensorData,
{
    match ArrayD::<T>::read_npy(Cursor::new(bytes)) {
        Ok(a) => Ok(Some(a.into_tensor_data())),
        Err(ReadNpyError::WrongDescriptor(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The element types numpy files may hold that we accept, most common first.
macro_rules! dtype_readers {
    ($f:ident $(, $r:ty)?) => {
        [
            $f::<$($r,)? f32>,
            $f::<$($r,)? f64>,
            $f::<$($r,)? i64>,
            $f::<$($r,)? i32>,
            $f::<$($r,)? u8>,
            $f::<$($r,)? i8>,
            $f::<$($r,)? i16>,
            $f::<$($r,)? u16>,
            $f::<$($r,)? u32>,
            $f::<$($r,)? u64>,
            $f::<$($r,)? bool>,
        ]
    };
}

const UNSUPPORTED: &str = "has an unsupported dtype (use float32/64, an integer type or bool)";

/// Reads every array of an `.npz` archive, in archive order (keys without `.npy`).
pub fn read_npz(path: &Path) -> Result<NamedArrays> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    npz_from_reader(BufReader::new(file), path)
}

/// Reads every array of an `.npz` archive held in memory (`<memory>` in messages).
pub fn read_npz_bytes(bytes: &[u8]) -> Result<NamedArrays> {
    npz_from_reader(Cursor::new(bytes), Path::new(MEMORY))
}

/// Messages about data read from memory name it so.
const MEMORY: &str = "<memory>";

fn npz_from_reader<R: Read + Seek>(reader: R, path: &Path) -> Result<NamedArrays> {
    let bad = |e: ReadNpzError| Error::data(path, format!("not a readable .npz file: {e}"));
    let mut npz = NpzReader::new(reader).map_err(bad)?;
    let names = npz.names().map_err(bad)?;
    let readers: [NpzRead<R>; 11] = dtype_readers!(npz_typed, R);
    let mut arrays = Vec::with_capacity(names.len());
    for raw_name in names {
        let key = raw_name
            .strip_suffix(".npy")
            .unwrap_or(&raw_name)
            .to_string();
        let mut found = None;
        for read in readers {
            found = read(&mut npz, &raw_name)
                .map_err(|e| Error::data(path, format!("array '{key}': {e}")))?;
            if found.is_some() {
                break;
            }
        }
        let array =
            found.ok_or_else(|| Error::data(path, format!("array '{key}' {UNSUPPORTED}")))?;
        arrays.push((key, array));
    }
    if arrays.is_empty() {
        return Err(Error::data(path, "the archive holds no arrays"));
    }
    Ok(NamedArrays(arrays))
}

/// Reads one `.npy` file; its key is the file stem.
pub fn read_npy(path: &Path) -> Result<NamedArrays> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let key = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let array = npy_from_bytes(&bytes, path)?;
    Ok(NamedArrays(vec![(key, array)]))
}

/// Reads one `.npy` array held in memory, under the key `key`.
pub fn read_npy_bytes(bytes: &[u8], key: &str) -> Result<NamedArrays> {
    let array = npy_from_bytes(bytes, Path::new(MEMORY))?;
    Ok(NamedArrays(vec![(key.to_string(), array)]))
}

fn npy_from_bytes(bytes: &[u8], path: &Path) -> Result<TensorData> {
    let readers: [NpyRead; 11] = dtype_readers!(npy_typed);
    for read in readers {
        if let Some(a) =
            read(bytes).map_err(|e| Error::data(path, format!("not a readable .npy file: {e}")))?
        {
            return Ok(a);
        }
    }
    Err(Error::data(path, format!("the array {UNSUPPORTED}")))
}

/// Writes arrays to an `.npz` archive atomically (numpy cannot hold bfloat16: it is widened to
/// float32; float16 is stored as float32 too, since `ndarray-npy` has no half type).
pub fn write_npz(path: &Path, arrays: &NamedArrays, protect: &[PathBuf]) -> Result<()> {
    let werr = |e: ndarray_npy::WriteNpzError| Error::data(path, format!("writing npz: {e}"));
    let mut npz = NpzWriter::new_compressed(Cursor::new(Vec::new()));
    for (name, t) in &arrays.0 {
        match t {
            TensorData::F32(a) => npz.add_array(name.as_str(), a),
            TensorData::F64(a) => npz.add_array(name.as_str(), a),
            TensorData::F16(_) | TensorData::BF16(_) => npz.add_array(name.as_str(), &t.to_f32()),
            TensorData::I8(a) => npz.add_array(name.as_str(), a),
            TensorData::I16(a) => npz.add_array(name.as_str(), a),
            TensorData::I32(a) => npz.add_array(name.as_str(), a),
            TensorData::I64(a) => npz.add_array(name.as_str(), a),
            TensorData::U8(a) => npz.add_array(name.as_str(), a),
            TensorData::U16(a) => npz.add_array(name.as_str(), a),
            TensorData::U32(a) => npz.add_array(name.as_str(), a),
            TensorData::U64(a) => npz.add_array(name.as_str(), a),
            TensorData::Bool(a) => npz.add_array(name.as_str(), a),
        }
        .map_err(werr)?;
    }
    let bytes = npz.finish().map_err(werr)?.into_inner();
    crate::atomic::write_atomic(path, protect, &bytes)
}
