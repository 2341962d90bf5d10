//! The groups report as a stable JSON document (`mudsc groups --json`), and reading one back
//! (`--groups spec.json`) to override discovery.
//!
//! An override can only take freedom away: a discovered group that the spec lists with
//! `"fixed": true`, or does not list at all, stays in place. Adding groups by hand is not
//! supported, because a hand-written group cannot be checked for soundness before it is used.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Discovery, FixedAxis, Group};
use crate::error::{Error, Result};

pub const FORMAT: &str = "mudsc-groups/1";

#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub format: &'static str,
    pub model: String,
    pub groups: &'a [Group],
    pub fixed: &'a [FixedAxis],
    pub unknown_ops: &'a std::collections::BTreeMap<String, usize>,
}

pub fn report<'a>(model: &str, d: &'a Discovery) -> Report<'a> {
    Report {
        format: FORMAT,
        model: model.to_string(),
        groups: &d.groups,
        fixed: &d.fixed,
        unknown_ops: &d.unknown_ops,
    }
}

#[derive(Debug, Deserialize)]
struct SpecGroup {
    #[serde(default)]
    fixed: bool,
    members: Vec<SpecMember>,
}

#[derive(Debug, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
struct SpecMember {
    tensor: String,
    axis: usize,
}

#[derive(Debug, Deserialize)]
struct Spec {
    format: String,
    groups: Vec<SpecGroup>,
}

/// Keeps only the discovered groups that the spec at `path` lists (by their member axes) and
/// does not mark fixed. Returns how many groups were dropped.
pub fn apply_override(d: &mut Discovery, path: &Path) -> Result<usize> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let spec: Spec = serde_json::from_str(&text)
        .map_err(|e| Error::data(path, format!("not a groups spec: {e}")))?;
    if spec.format != FORMAT {
        return Err(Error::data(
            path,
            format!("format '{}' is not '{FORMAT}'", spec.format),
        ));
    }
    let key = |members: Vec<(String, usize)>| {
        let mut m = members;
        m.sort();
        m
    };
    let allowed: Vec<Vec<(String, usize)>> = spec
        .groups
        .into_iter()
        .filter(|g| !g.fixed)
        .map(|g| key(g.members.into_iter().map(|m| (m.tensor, m.axis)).collect()))
        .collect();
    let before = d.groups.len();
    d.groups.retain(|g| {
        let k = key(g
            .members
            .iter()
            .map(|m| (m.tensor.clone(), m.axis))
            .collect());
        allowed.contains(&k)
    });
    Ok(before - d.groups.len())
}
