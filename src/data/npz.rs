//! `.npz` and `.npy` files (numpy's formats), read and written with `ndarray-npy`.
//!
//! numpy files carry their dtype in a header, but `ndarray-npy` reads into a statically typed
//! array; we try each supported element type and keep the first whose descriptor matches.
//!
//! Files are untrusted: before `ndarray-npy` sees an array, its header length and the data
//! size its shape implies are checked against the bytes actually there, so that a corrupt or
//! hostile header cannot make the reader allocate more than the file holds. An `.npz` member
//! is decompressed no further than its own `.npy` header says the array needs.

use std::fs::File;
use std::io::{BufReader, Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use ndarray_npy::npy::header::Header;
use ndarray_npy::{NpzWriter, ReadNpyError, ReadNpyExt, ReadableElement};

use super::NamedArrays;
use crate::error::{Error, Result};
use crate::onnx::{IntoTensorData, TensorData};

type NpyRead = fn(&[u8]) -> Result<Option<TensorData>, ReadNpyError>;

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
const READERS: [NpyRead; 11] = [
    npy_typed::<f32>,
    npy_typed::<f64>,
    npy_typed::<i64>,
    npy_typed::<i32>,
    npy_typed::<u8>,
    npy_typed::<i8>,
    npy_typed::<i16>,
    npy_typed::<u16>,
    npy_typed::<u32>,
    npy_typed::<u64>,
    npy_typed::<bool>,
];

const UNSUPPORTED: &str = "has an unsupported dtype (use float32/64, an integer type or bool)";

/// Messages about data read from memory name it so.
const MEMORY: &str = "<memory>";

/// numpy writes headers of at most 10 000 bytes (`numpy.lib.format._MAX_HEADER_SIZE`); a
/// longer one is refused before it is read.
const MAX_HEADER_BYTES: usize = 1 << 16;

/// Reads every array of an `.npz` archive, in archive order (keys without `.npy`).
pub fn read_npz(path: &Path) -> Result<NamedArrays> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    npz_from_reader(BufReader::new(file), path)
}

/// Reads every array of an `.npz` archive held in memory (`<memory>` in messages).
pub fn read_npz_bytes(bytes: &[u8]) -> Result<NamedArrays> {
    npz_from_reader(Cursor::new(bytes), Path::new(MEMORY))
}

fn npz_from_reader<R: Read + Seek>(mut reader: R, path: &Path) -> Result<NamedArrays> {
    let bad = |reason: String| Error::data(path, format!("not a readable .npz file: {reason}"));
    // The zip crate keeps one entry per name: two members of one name would pass as one.
    let start = zip::ZipArchive::new(&mut reader)
        .map_err(|e| bad(e.to_string()))?
        .central_directory_start();
    if let Some(name) = repeated_member(&mut reader, start) {
        let key = name.strip_suffix(".npy").unwrap_or(&name);
        return Err(Error::data(
            path,
            format!(
                "array '{key}': the archive holds two members of this name; which one is meant \
                 is ambiguous"
            ),
        ));
    }
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| bad(e.to_string()))?;
    let mut arrays = Vec::with_capacity(zip.len());
    for index in 0..zip.len() {
        let mut entry = zip.by_index(index).map_err(|e| bad(e.to_string()))?;
        let raw_name = entry.name().to_string();
        let key = raw_name
            .strip_suffix(".npy")
            .unwrap_or(&raw_name)
            .to_string();
        let member = |reason: String| Error::data(path, format!("array '{key}': {reason}"));
        if arrays.iter().any(|(k, _): &(String, TensorData)| *k == key) {
            return Err(member(
                "the archive holds two members of this name; which one is meant is ambiguous"
                    .into(),
            ));
        }
        let bytes = read_member(&mut entry).map_err(member)?;
        let array = npy_array(&bytes).map_err(member)?;
        arrays.push((key, array));
    }
    if arrays.is_empty() {
        return Err(Error::data(path, "the archive holds no arrays"));
    }
    Ok(NamedArrays(arrays))
}

/// The first member name that the central directory (at `start`) lists twice. Best effort:
/// a directory the zip crate accepted is walked header by header until the signature stops.
fn repeated_member(reader: &mut (impl Read + Seek), start: u64) -> Option<String> {
    const CENTRAL: u32 = 0x0201_4b50;
    reader.seek(std::io::SeekFrom::Start(start)).ok()?;
    let mut seen = std::collections::HashSet::new();
    loop {
        let mut header = [0u8; 46];
        reader.read_exact(&mut header).ok()?;
        if u32::from_le_bytes([header[0], header[1], header[2], header[3]]) != CENTRAL {
            return None;
        }
        let le16 = |at: usize| u16::from_le_bytes([header[at], header[at + 1]]) as i64;
        let (name_len, extra, comment) = (le16(28), le16(30), le16(32));
        let mut name = vec![0u8; name_len as usize];
        reader.read_exact(&mut name).ok()?;
        let name = String::from_utf8_lossy(&name).into_owned();
        if !seen.insert(name.clone()) {
            return Some(name);
        }
        reader
            .seek(std::io::SeekFrom::Current(extra + comment))
            .ok()?;
    }
}

/// One member's bytes, inflated no further than its `.npy` header says the array needs: the
/// header is read first, and a member whose declared size disagrees with it is refused before
/// its data is decompressed (a few MB of zeros can declare and inflate to many GiB).
fn read_member(entry: &mut impl Read) -> std::result::Result<Vec<u8>, String> {
    let io = |e: std::io::Error| e.to_string();
    let mut bytes = Vec::new();
    entry.take(12).read_to_end(&mut bytes).map_err(io)?;
    let data_start = header_end(&bytes)?;
    let have = bytes.len() as u64;
    entry
        .take((data_start as u64).saturating_sub(have))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let need = data_bytes(&bytes)?;
    let total = data_start
        .checked_add(need)
        .ok_or_else(|| "the .npy header's shape is too large".to_string())?;
    // Grown as the data arrives, never sized by a declared length; one byte more than needed
    // tells a member that holds more.
    entry
        .take(
            (total as u64)
                .saturating_add(1)
                .saturating_sub(bytes.len() as u64),
        )
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() != total {
        return Err(format!(
            "the .npy header's shape needs {need} bytes of data, the member holds {}",
            if bytes.len() > total {
                "more".to_string()
            } else {
                bytes.len().saturating_sub(data_start).to_string()
            }
        ));
    }
    Ok(bytes)
}

/// Reads one `.npy` file; its key is the file stem.
pub fn read_npy(path: &Path) -> Result<NamedArrays> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let key = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let array = npy_array(&bytes).map_err(|e| Error::data(path, e))?;
    Ok(NamedArrays(vec![(key, array)]))
}

/// Reads one `.npy` array held in memory, under the key `key`.
pub fn read_npy_bytes(bytes: &[u8], key: &str) -> Result<NamedArrays> {
    let array = npy_array(bytes).map_err(|e| Error::data(MEMORY, e))?;
    Ok(NamedArrays(vec![(key.to_string(), array)]))
}

/// An `.npy` byte image as an array, after checking that its header describes these bytes.
fn npy_array(bytes: &[u8]) -> std::result::Result<TensorData, String> {
    check_npy(bytes)?;
    for read in READERS {
        if let Some(a) = read(bytes).map_err(|e| format!("not a readable .npy array: {e}"))? {
            return Ok(a);
        }
    }
    Err(format!("the array {UNSUPPORTED}"))
}

/// Errors unless the header fits in `bytes` and the data after it is exactly what the header's
/// shape and dtype need (what `ndarray-npy` would allocate, it must be able to fill).
fn check_npy(bytes: &[u8]) -> std::result::Result<(), String> {
    let data_start = header_end(bytes)?;
    let need = data_bytes(bytes)?;
    let data = bytes.len().saturating_sub(data_start);
    if need != data {
        return Err(format!(
            "the .npy header's shape needs {need} bytes of data, the file holds {data}"
        ));
    }
    Ok(())
}

/// Where the data of an `.npy` image starts, from its first 12 bytes (magic, version, header
/// length), with the header length bounded.
fn header_end(bytes: &[u8]) -> std::result::Result<usize, String> {
    const MAGIC: &[u8] = b"\x93NUMPY";
    let not_npy = || "not an .npy array (no \\x93NUMPY magic string)".to_string();
    if !bytes.starts_with(MAGIC) {
        return Err(not_npy());
    }
    let (header_len, start) = match bytes.get(MAGIC.len()).copied() {
        Some(1) => match bytes.get(8..10) {
            Some(b) => (u16::from_le_bytes([b[0], b[1]]) as usize, 10),
            None => return Err("the .npy header is cut short".into()),
        },
        Some(2 | 3) => match bytes.get(8..12) {
            Some(b) => (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12),
            None => return Err("the .npy header is cut short".into()),
        },
        Some(v) => return Err(format!("unsupported .npy format version {v}")),
        None => return Err(not_npy()),
    };
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "the .npy header claims {header_len} bytes (numpy writes at most 10000)"
        ));
    }
    Ok(start + header_len)
}

/// Bytes of data the header (which `bytes` must hold whole) declares: shape × item size.
fn data_bytes(bytes: &[u8]) -> std::result::Result<usize, String> {
    let data_start = header_end(bytes)?;
    let Some(header_bytes) = bytes.get(..data_start) else {
        return Err(format!(
            "the .npy header claims {} bytes, the file ends before ({} in all)",
            data_start,
            bytes.len()
        ));
    };
    let header = Header::from_reader(&mut &header_bytes[..])
        .map_err(|e| format!("not a readable .npy header: {e}"))?;
    let descr = header.type_descriptor.to_string();
    let Some(item) = item_size(&descr) else {
        return Err(format!("the array's dtype {descr} {UNSUPPORTED}"));
    };
    header
        .shape
        .iter()
        .try_fold(item, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            format!(
                "the header's shape {:?} of {descr} needs more than 2^64 bytes",
                header.shape
            )
        })
}

/// Bytes per element of a numpy type descriptor such as `'<f4'`, `'|b1'` or `'B'`; `None` for
/// structured and other descriptors no reader accepts.
fn item_size(descr: &str) -> Option<usize> {
    let s = descr.strip_prefix('\'')?.strip_suffix('\'')?;
    let s = s.trim_start_matches(['<', '>', '|', '=']);
    let mut chars = s.chars();
    let kind = chars.next()?;
    let digits = chars.as_str();
    match (kind, digits) {
        ('b' | 'B', "") => Some(1),
        ('f' | 'i' | 'u' | 'b', d) if !d.is_empty() => d.parse().ok().filter(|&n| n > 0),
        _ => None,
    }
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
