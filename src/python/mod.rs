//! The Python extension module `mudsc._native` (built by maturin, see `pyproject.toml`; the
//! Python-facing API is `python/mudsc/__init__.py`).
//!
//! It adds no second implementation: every call is a command line parsed by the CLI's own
//! parser (so options are validated, defaulted and worded exactly as for `mudsc`) and run by
//! the CLI's own functions, which return the documents `--json` / `--report` print. What
//! differs from the command: numpy arrays can stand in for a data file (copied once into the
//! library's arrays, with no file round trip), nothing is printed on stdout, errors are raised
//! as `MudscError` / `BadInputError` carrying the CLI's message, and the GIL is released while
//! the work runs.

use numpy::{PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::cli::{self, Command};
use crate::data::NamedArrays;
use crate::onnx::TensorData;

create_exception!(
    _native,
    MudscError,
    PyRuntimeError,
    "A mudsc command failed (the CLI's exit code 1); the message is the CLI's."
);
create_exception!(
    _native,
    BadInputError,
    MudscError,
    "The input was at fault (the CLI's exit code 2: a bad model, data file, spec or option); \
     the message names the file, tensor or option."
);

/// Runs the `mudsc` command line (`argv[0]` is the program name) in this process, as the binary
/// would, and returns its exit status: the `mudsc` console command of the Python package.
#[pyfunction]
fn command_line(py: Python<'_>, argv: Vec<String>) -> u8 {
    py.detach(move || cli::run(argv))
}

/// Runs the command line `argv` (`["mudsc", "merge", ...]`) and returns its JSON document as
/// text; `arrays` (name → numpy array) replace the command's data file when given.
#[pyfunction]
#[pyo3(signature = (argv, arrays=None))]
fn run_json(
    py: Python<'_>,
    argv: Vec<String>,
    arrays: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    use clap::Parser;
    let command = cli::Cli::try_parse_from(argv)
        .map_err(|e| BadInputError::new_err(clap_message(&e)))?
        .command;
    let arrays = arrays.map(named_arrays).transpose()?;
    py.detach(move || document(command, arrays)).map_err(|e| {
        let message = cli::message(&e);
        if cli::is_bad_input(&e) {
            BadInputError::new_err(message)
        } else {
            MudscError::new_err(message)
        }
    })
}

/// The command's document: what `--json` prints (`groups`, `check`, `eval`) or what `--report`
/// writes (`merge`), as the same text.
fn document(command: Command, arrays: Option<NamedArrays>) -> anyhow::Result<String> {
    let value = match command {
        Command::Groups(mut a) => {
            a.discover.data_arrays = arrays;
            cli::groups::document(&a.discover)?
        }
        Command::Check(mut a) => {
            a.discover.data_arrays = arrays;
            // Serialised from the struct, as `--json` does: its f32 numbers keep their shortest
            // spelling (through a `Value` they would be widened to f64 digits).
            return Ok(serde_json::to_string(&cli::check::document(&a)?)?);
        }
        Command::Merge(mut a) => {
            a.calib_arrays = arrays;
            cli::merge::execute(&mut a)?.json
        }
        Command::Eval(mut a) => {
            a.data_arrays = arrays;
            cli::eval::document(&cli::eval::scores(&mut a)?)?
        }
        _ => {
            return Err(crate::Error::Usage(
                "this command has no Python function; run it with the mudsc command".into(),
            )
            .into())
        }
    };
    Ok(serde_json::to_string(&value)?)
}

/// clap's error without its usage block: the first paragraph, less the `error: ` prefix.
fn clap_message(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.split("\n\n").next().unwrap_or(&text).trim();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Numpy arrays by name, each copied once into an owned array in C order (the library's
/// tensors own their data); the names are kept in the dict's order.
fn named_arrays(dict: &Bound<'_, PyDict>) -> PyResult<NamedArrays> {
    dict.iter()
        .map(|(k, v)| {
            let name: String = k.extract()?;
            let tensor = tensor(&name, &v)?;
            Ok((name, tensor))
        })
        .collect::<PyResult<Vec<_>>>()
        .map(NamedArrays)
}

fn tensor(name: &str, value: &Bound<'_, PyAny>) -> PyResult<TensorData> {
    macro_rules! by_dtype {
        ($($t:ty => $variant:ident),* $(,)?) => {$(
            if let Ok(a) = value.extract::<PyReadonlyArrayDyn<'_, $t>>() {
                return Ok(TensorData::$variant(a.as_array().as_standard_layout().into_owned()));
            }
        )*};
    }
    by_dtype!(f32 => F32, f64 => F64, half::f16 => F16, i8 => I8, i16 => I16, i32 => I32,
        i64 => I64, u8 => U8, u16 => U16, u32 => U32, u64 => U64, bool => Bool);
    let what = match value.cast::<PyUntypedArray>() {
        Ok(a) => format!("a numpy array of dtype {}", a.dtype()),
        Err(_) => format!("a {}", value.get_type().name()?),
    };
    Err(BadInputError::new_err(format!(
        "array '{name}': {what}; give a numpy array of a float, integer or bool dtype"
    )))
}

/// Where the running interpreter's `onnxruntime` package is (`None`: not installed); its
/// library is then used when neither `ort_lib` nor `ORT_DYLIB_PATH` names one.
#[pyfunction]
#[pyo3(signature = (package_dir=None))]
fn use_onnxruntime_package(package_dir: Option<std::path::PathBuf>) {
    crate::runtime::ort_library::use_python_package(package_dir);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(command_line, m)?)?;
    m.add_function(wrap_pyfunction!(run_json, m)?)?;
    m.add_function(wrap_pyfunction!(use_onnxruntime_package, m)?)?;
    m.add("MudscError", m.py().get_type::<MudscError>())?;
    m.add("BadInputError", m.py().get_type::<BadInputError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
