//! Calibration statistics as files, for calibration spread over machines. Activation moments
//! are additive (counts, Σx and Σxxᵀ of each group), so shards computed on disjoint parts of
//! the calibration data — on other machines, under any job scheduler, on GPUs — sum to the
//! statistics of the whole. A shard records which models and which groups it was made from,
//! and a shard of other models or other groups is refused by name.
//!
//! Format (little-endian): the magic line `MUDSC-STATS/1\n`, the header's length (u64), the
//! header (JSON: models' fingerprints, groups, sample count), then per group in header order
//! Σx and Σxxᵀ as f64. Hand-written because the statistics must stay f64 and streamable, and
//! a few lines do it; npz would need a member per array and a JSON side file.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use ndarray::{Array1, Array2};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::onnx::Model;
use crate::stats::{Moments, SymmetricGram};

const MAGIC: &[u8] = b"MUDSC-STATS/1\n";

/// Which group a shard's statistics belong to: its id, width (per model) and calibration tap.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardGroup {
    pub id: usize,
    pub width: usize,
    pub tap: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    format: String,
    models: Vec<String>,
    samples: usize,
    groups: Vec<(ShardGroup, u64)>,
}

/// Per-group activation moments over some calibration samples of some models.
#[derive(Clone, Debug)]
pub struct Stats {
    /// sha256 of each model's serialized graph and weights, in merge order.
    pub models: Vec<String>,
    pub groups: Vec<ShardGroup>,
    /// Calibration inputs (not tap positions) the moments were taken over.
    pub samples: usize,
    pub moments: HashMap<usize, Moments>,
}

/// A model's fingerprint: sha256 of its protobuf encoding (graph, weights, metadata).
pub fn fingerprint(model: &Model) -> String {
    let digest = Sha256::digest(model.proto.encode_to_vec());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Stats {
    /// Sums `shards` after checking they were made from the same models and groups.
    pub fn sum(shards: Vec<(PathBuf, Stats)>) -> Result<Stats> {
        let mut it = shards.into_iter();
        let Some((first_path, mut total)) = it.next() else {
            return Err(Error::Usage("no statistics shards given".into()));
        };
        for (path, s) in it {
            if s.models != total.models {
                return Err(Error::data(
                    &path,
                    format!(
                        "statistics of other models than '{}' (model fingerprints differ)",
                        first_path.display()
                    ),
                ));
            }
            if s.groups != total.groups {
                return Err(Error::data(
                    &path,
                    format!("statistics of other groups than '{}'", first_path.display()),
                ));
            }
            for (g, m) in s.moments {
                if let Some(t) = total.moments.get_mut(&g) {
                    t.add_assign(&m);
                }
            }
            total.samples += s.samples;
        }
        Ok(total)
    }

    /// Errors (naming `path`) unless these statistics are of `models` and `groups`.
    pub fn check(&self, path: &Path, models: &[String], groups: &[ShardGroup]) -> Result<()> {
        if self.models.len() != models.len() {
            return Err(Error::data(
                path,
                format!(
                    "statistics of {} models, merging {}",
                    self.models.len(),
                    models.len()
                ),
            ));
        }
        if let Some(i) = (0..models.len()).find(|&i| self.models[i] != models[i]) {
            return Err(Error::data(
                path,
                format!("statistics were made from another model {i} (fingerprints differ)"),
            ));
        }
        if self.groups != groups {
            let why = groups
                .iter()
                .find(|g| !self.groups.contains(g))
                .map(|g| {
                    format!(
                        "group {} ({} units at '{}') is not in them",
                        g.id, g.width, g.tap
                    )
                })
                .unwrap_or_else(|| "they hold groups these models do not have".into());
            return Err(Error::data(
                path,
                format!("statistics of other groups: {why}"),
            ));
        }
        Ok(())
    }

    /// Writes the statistics to `path` atomically.
    pub fn save(&self, path: &Path, protect: &[PathBuf]) -> Result<()> {
        let header = Header {
            format: "mudsc-stats/1".into(),
            models: self.models.clone(),
            samples: self.samples,
            groups: self
                .groups
                .iter()
                .map(|g| (g.clone(), self.moments.get(&g.id).map_or(0, |m| m.count)))
                .collect(),
        };
        let json = serde_json::to_vec(&header).map_err(|e| Error::data(path, e.to_string()))?;
        let mut moments = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            match self.moments.get(&g.id) {
                Some(m) if m.sum.len() == header.models.len() * g.width => moments.push(m),
                _ => {
                    return Err(Error::Usage(format!(
                        "no statistics for group {} to save",
                        g.id
                    )))
                }
            }
        }
        // Streamed: a ViT-B pair's shard is 3.6 GB.
        crate::atomic::write_atomic_with(path, protect, |out| {
            out.write_all(MAGIC)?;
            out.write_all(&(json.len() as u64).to_le_bytes())?;
            out.write_all(&json)?;
            for m in moments {
                // About 0, so that shards of any data add up.
                for v in &m.raw_sum() {
                    out.write_all(&v.to_le_bytes())?;
                }
                // Σxxᵀ whole, row-major: the format predates its triangular storage.
                let u = m.sum.len();
                for i in 0..u {
                    for j in 0..u {
                        out.write_all(&m.raw_outer(i, j).to_le_bytes())?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Reads statistics written by `save`, checking every size against the file's length
    /// before allocating.
    pub fn load(path: &Path) -> Result<Stats> {
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
        let bad = |why: &str| Error::data(path, format!("not a mudsc statistics file: {why}"));
        let mut magic = vec![0u8; MAGIC.len()];
        f.read_exact(&mut magic).map_err(|_| bad("too short"))?;
        if magic != MAGIC {
            return Err(bad("wrong magic"));
        }
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|_| bad("too short"))?;
        let hlen = u64::from_le_bytes(n);
        if hlen > len {
            return Err(bad("header longer than the file"));
        }
        let mut json = vec![0u8; hlen as usize];
        f.read_exact(&mut json)
            .map_err(|_| bad("truncated header"))?;
        let header: Header =
            serde_json::from_slice(&json).map_err(|e| bad(&format!("header: {e}")))?;
        let n_models = header.models.len() as u64;
        let mut need: u64 = MAGIC.len() as u64 + 8 + hlen;
        for (g, _) in &header.groups {
            let u = n_models.saturating_mul(g.width as u64);
            need = need.saturating_add(u.saturating_add(u.saturating_mul(u)).saturating_mul(8));
        }
        if need != len {
            return Err(bad(&format!("{len} bytes where the header implies {need}")));
        }
        let mut moments = HashMap::new();
        let mut read = |count: usize| -> Result<Vec<f64>> {
            let mut raw = vec![0u8; count * 8];
            f.read_exact(&mut raw).map_err(|_| bad("truncated data"))?;
            Ok(raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect())
        };
        for (g, count) in &header.groups {
            let u = header.models.len() * g.width;
            let sum = Array1::from_vec(read(u)?);
            let outer = SymmetricGram::from_full(
                Array2::from_shape_vec((u, u), read(u * u)?)
                    .map_err(|e| bad(&e.to_string()))?
                    .view(),
            );
            moments.insert(g.id, Moments::about_zero(*count, sum, outer));
        }
        Ok(Stats {
            models: header.models,
            groups: header.groups.into_iter().map(|(g, _)| g).collect(),
            samples: header.samples,
            moments,
        })
    }
}
