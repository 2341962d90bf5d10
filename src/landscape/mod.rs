//! The loss landscape around a merge: where the merged model sits on the plane through model
//! A, model B (aligned to A) and the merged model, relative to each task's low-loss region.
//!
//! B is first permuted into A's coordinates with the alignment counterpart of the method that
//! made the merged model (read from its metadata), so the three points live in one coordinate
//! system; without that, B would sit in a permuted copy of A's basin and the plane would show a
//! barrier that is only a relabelling of hidden units. Then:
//! [`params`] flattens every float initializer into θ, [`plane`] builds the orthonormal basis
//! and the grid, [`grid`] evaluates each task's cross-entropy ([`loss`]) at every grid point,
//! and [`plot`] draws one filled-contour panel per task plus the joint loss.

mod canvas;
pub mod grid;
pub mod loss;
pub mod params;
pub mod plane;
pub mod plot;

use std::fmt::Write as _;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::merge::Method;
use crate::onnx::Model;

pub use grid::{evaluate, model_losses, Data, EvalOptions};
pub use loss::{cross_entropy, Head, LossSpec};
pub use params::ParamSpace;
pub use plane::{Grid, Plane};

/// How the merged model was made, from its `metadata_props`.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeSettings {
    pub method: Method,
    pub alpha: f64,
    /// Set when a value was missing and a default was used.
    pub note: Option<String>,
}

/// Reads `mudsc.method` and `mudsc.alpha` from the merged model; a missing key falls back to
/// mudsc-zip / 0.5 (the merge defaults) with a note, an unreadable value is an error, and so
/// is a partial zip (`mudsc.zip_until`), whose graph is not A's.
pub fn merge_settings(merged: &Model) -> Result<MergeSettings> {
    let get = |k: &str| {
        merged
            .proto
            .metadata_props
            .iter()
            .find(|e| e.key.as_deref() == Some(k))
            .and_then(|e| e.value.clone())
    };
    let name = merged.display_name();
    if let Some(cut) = get("mudsc.zip_until") {
        return Err(Error::Usage(format!(
            "{name} is a partial zip (mudsc.zip_until = {cut}): it keeps each model's own layers \
             after the cut, so it is not a point of model A's parameter space; draw the \
             landscape of a full merge"
        )));
    }
    let mut missing = Vec::new();
    let method = match get("mudsc.method") {
        Some(m) => *Method::ALL
            .iter()
            .find(|x| x.name() == m.trim())
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{name}: metadata mudsc.method '{m}' is not a merge method of this mudsc"
                ))
            })?,
        None => {
            missing.push("mudsc.method (using mudsc-zip)");
            Method::MudscZip
        }
    };
    let alpha = match get("mudsc.alpha") {
        Some(a) => a
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|a| (0.0..=1.0).contains(a))
            .ok_or_else(|| {
                Error::Usage(format!(
                    "{name}: metadata mudsc.alpha '{a}' is not a number in [0, 1]"
                ))
            })?,
        None => {
            missing.push("mudsc.alpha (using 0.5)");
            0.5
        }
    };
    let note = (!missing.is_empty()).then(|| {
        format!(
            "{name} does not record {}: B is aligned with those defaults",
            missing.join(" or ")
        )
    });
    Ok(MergeSettings {
        method,
        alpha,
        note,
    })
}

/// One of the three models, at its exact plane coordinates.
#[derive(Clone, Debug, Serialize)]
pub struct Marker {
    pub label: String,
    pub x: f64,
    pub y: f64,
    /// Per task, then joint (see [`LossSpec::names`]).
    pub losses: Vec<f64>,
}

/// The evaluated plane.
#[derive(Clone, Debug, Serialize)]
pub struct Landscape {
    /// Panel names: one per task, then "joint" when there is a joint loss.
    pub names: Vec<String>,
    pub xs: Vec<f64>,
    pub ys: Vec<f64>,
    /// `losses[k][j * xs.len() + i]`: loss `k` at (xs[i], ys[j]).
    pub losses: Vec<Vec<f64>>,
    /// A, B, merged.
    pub markers: Vec<Marker>,
}

impl Landscape {
    /// Assembles the grid results (as [`grid::evaluate`] returns them over
    /// [`Grid::points`]) and the markers' losses.
    pub fn new(
        names: Vec<String>,
        grid: &Grid,
        at_points: Vec<Vec<f64>>,
        markers: Vec<Marker>,
    ) -> Result<Landscape> {
        if at_points.len() != grid.xs.len() * grid.ys.len() {
            return Err(Error::Usage(format!(
                "{} results for a {}x{} grid",
                at_points.len(),
                grid.xs.len(),
                grid.ys.len()
            )));
        }
        let losses = (0..names.len())
            .map(|k| {
                at_points
                    .iter()
                    .map(|l| l.get(k).copied().unwrap_or(f64::NAN))
                    .collect()
            })
            .collect();
        Ok(Landscape {
            names,
            xs: grid.xs.clone(),
            ys: grid.ys.clone(),
            losses,
            markers,
        })
    }

    /// CSV: `point,x,y,<loss per panel>`, one row per grid point (`point` = `grid`) and one per
    /// marker (`point` = its label), so the markers' exact losses travel with the grid.
    pub fn to_csv(&self) -> String {
        let mut out = String::from("point,x,y");
        for n in &self.names {
            let _ = write!(out, ",loss {n}");
        }
        out.push('\n');
        let row =
            |out: &mut String, point: &str, x: f64, y: f64, l: &mut dyn Iterator<Item = f64>| {
                let _ = write!(out, "{point},{x},{y}");
                for v in l {
                    let _ = write!(out, ",{v}");
                }
                out.push('\n');
            };
        for (j, &y) in self.ys.iter().enumerate() {
            for (i, &x) in self.xs.iter().enumerate() {
                let at = j * self.xs.len() + i;
                row(
                    &mut out,
                    "grid",
                    x,
                    y,
                    &mut self.losses.iter().map(|l| l[at]),
                );
            }
        }
        for m in &self.markers {
            row(&mut out, &m.label, m.x, m.y, &mut m.losses.iter().copied());
        }
        out
    }
}
