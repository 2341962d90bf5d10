//! Loading ONNX models from files or memory, with external data resolved.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use prost::Message;

use super::external::{read_file, ExternalResolver};
use super::proto::{GraphProto, ModelProto, TensorProto};
use crate::error::{Error, Result};

/// Newest IR version this build understands (that of the vendored `onnx.proto`).
pub const MAX_IR_VERSION: i64 = 14;
/// IR 3 introduced `opset_import`; older files cannot say which operator semantics they use.
const MIN_IR_VERSION: i64 = 3;

/// A loaded model: the protobuf with every external tensor pulled in (zero-copy where the data
/// file is memory-mapped), plus where it came from.
#[derive(Clone, Debug)]
pub struct Model {
    pub proto: ModelProto,
    /// The file it was loaded from; `None` when loaded from memory.
    pub path: Option<PathBuf>,
    /// External data files it read, which a save must never overwrite.
    pub data_files: Vec<PathBuf>,
}

impl Model {
    /// The main graph (validated present at load).
    pub fn graph(&self) -> &GraphProto {
        self.proto
            .graph
            .as_ref()
            .expect("Model invariant: graph is checked at load")
    }

    /// The file name alone (for records kept inside other files, such as the merged model's
    /// provenance, which must not leak the user's directory layout), or `<memory>`.
    pub fn file_name(&self) -> String {
        self.path
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "<memory>".into())
    }

    /// A name for messages: the file path, or `<memory>`.
    pub fn display_name(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "<memory>".into())
    }

    /// Opset version imported for a domain ("" = the default ONNX domain).
    pub fn opset(&self, domain: &str) -> Option<i64> {
        self.proto
            .opset_import
            .iter()
            .find(|o| {
                let d = o.domain.as_deref().unwrap_or("");
                d == domain || (domain.is_empty() && d == "ai.onnx")
            })
            .and_then(|o| o.version)
    }

    /// Every path this model was read from (model file and data files).
    pub fn source_files(&self) -> Vec<PathBuf> {
        self.path.iter().chain(&self.data_files).cloned().collect()
    }
}

/// Loads a model file, resolving external data relative to the file's directory.
pub fn load(path: impl AsRef<Path>) -> Result<Model> {
    let path = path.as_ref();
    if path.is_dir() {
        return Err(Error::NotOnnx {
            path: path.into(),
            reason: "is a directory".into(),
        });
    }
    // A FIFO or device would block or stream without end (a link to a regular file is fine).
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::NotOnnx {
            path: path.into(),
            reason: "is not a regular file".into(),
        });
    }
    let bytes = read_file(path)?;
    let base_dir = path
        .parent()
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_path_buf()
            }
        })
        .unwrap_or_else(|| PathBuf::from("."));
    let mut model = decode(path, bytes, Some(base_dir))?;
    model.path = Some(path.to_path_buf());
    Ok(model)
}

/// Loads a model from bytes in memory; external data is an error there.
pub fn load_bytes(bytes: impl Into<Bytes>) -> Result<Model> {
    decode(Path::new("<memory>"), bytes.into(), None)
}

fn decode(path: &Path, bytes: Bytes, base_dir: Option<PathBuf>) -> Result<Model> {
    let not_onnx = |reason: String| Error::NotOnnx {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.is_empty() {
        return Err(not_onnx("the file is empty".into()));
    }
    let mut proto = ModelProto::decode(bytes).map_err(|e| {
        not_onnx(format!(
            "protobuf decoding failed ({e}); the file is truncated or not an ONNX model"
        ))
    })?;
    let ir = proto
        .ir_version
        .ok_or_else(|| not_onnx("no IR version (ir_version field missing)".into()))?;
    let Some(graph) = proto.graph.as_mut() else {
        return Err(not_onnx("the model has no graph".into()));
    };
    if !(MIN_IR_VERSION..=MAX_IR_VERSION).contains(&ir) {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "unsupported IR version {ir} (this build reads {MIN_IR_VERSION} to {MAX_IR_VERSION})"
            ),
        });
    }
    // Two initializers of one name: engines keep one or the other, and a merge would average
    // different tensors under one name. Refused, naming it.
    let mut names = std::collections::HashSet::new();
    for t in &graph.initializer {
        let name = t.name.as_deref().unwrap_or("");
        if !names.insert(name) {
            return Err(Error::Unsupported {
                path: path.to_path_buf(),
                reason: format!("initializer '{name}' is defined twice"),
            });
        }
    }
    let mut resolver = ExternalResolver::new(path, base_dir);
    visit_tensors_mut(graph, &mut |t| resolver.resolve(t))?;
    Ok(Model {
        proto,
        path: None,
        data_files: resolver.files(),
    })
}

/// Calls `f` on every tensor a graph holds: initializers, `Constant` node values and tensor
/// attributes, recursing into subgraphs (If/Loop/Scan bodies).
pub(super) fn visit_tensors_mut(
    graph: &mut GraphProto,
    f: &mut dyn FnMut(&mut TensorProto) -> Result<()>,
) -> Result<()> {
    for t in &mut graph.initializer {
        f(t)?;
    }
    for sparse in &mut graph.sparse_initializer {
        for t in sparse.values.iter_mut().chain(sparse.indices.iter_mut()) {
            f(t)?;
        }
    }
    for node in &mut graph.node {
        for attr in &mut node.attribute {
            for t in attr.t.iter_mut().chain(attr.tensors.iter_mut()) {
                f(t)?;
            }
            for g in attr.g.iter_mut().chain(attr.graphs.iter_mut()) {
                visit_tensors_mut(g, f)?;
            }
        }
    }
    Ok(())
}
