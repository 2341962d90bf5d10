//! The library's error type. Every variant names the file, tensor, node or backend it is about,
//! because a user merging models exported by someone else needs to know *where* to look.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operating system refused a read or write.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file is not an ONNX model (or is truncated).
    #[error("{}: not a valid ONNX model: {reason}", path.display())]
    NotOnnx { path: PathBuf, reason: String },

    /// The model is well-formed protobuf but something in it is outside what we support.
    #[error("{}: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },

    /// A tensor stored in an external data file could not be resolved.
    #[error("{}: tensor '{tensor}': external data: {reason}", path.display())]
    ExternalData {
        path: PathBuf,
        tensor: String,
        reason: String,
    },

    /// The graph's structure is inconsistent (cycle, value produced twice, dangling input).
    #[error("{}: node '{node}' ({op}): {reason}", path.display())]
    Graph {
        path: PathBuf,
        node: String,
        op: String,
        reason: String,
    },

    /// Two models that should share an architecture do not.
    #[error("{} and {} differ in structure at node '{node}': {reason}", a.display(), b.display())]
    Mismatch {
        a: PathBuf,
        b: PathBuf,
        node: String,
        reason: String,
    },

    /// A tensor's contents are inconsistent with its declared type or shape.
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },

    /// An input data file (npz, npy, test_data_set) is unreadable or does not fit the model.
    #[error("{}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },

    /// An inference backend failed to load or run a model.
    #[error("{backend} backend: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },

    /// Drawing or encoding a picture failed.
    #[error("drawing the picture: {0}")]
    Plot(String),

    /// The work would need more memory than the machine has (the estimate comes before the
    /// allocation, which would abort the process).
    #[error("{0}")]
    TooLarge(String),

    /// A model an engine rejects as malformed (its structure, not a missing op): the input's
    /// fault, unlike [`Error::Backend`].
    #[error("{backend} backend: {reason}")]
    BadModel {
        backend: &'static str,
        reason: String,
    },

    /// A caller asked for something inconsistent (bad option value, overwriting an input...).
    #[error("{0}")]
    Usage(String),
}

impl Error {
    /// Whether the error is the user's input's fault (exit code 2) rather than a failure while
    /// doing the work (exit code 1). A path that does not exist (a misspelt model file, an
    /// output directory that is not there) is the user's; other I/O failures are not.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Error::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
            Error::Backend { .. } | Error::Plot(_) | Error::TooLarge(_) => false,
            _ => true,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tensor(name: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn data(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
