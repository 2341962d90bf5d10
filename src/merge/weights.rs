//! Weight-space side of merging: per-unit weight vectors (§2) and the merged initializers
//! (§4c), both through the per-axis maps of [`super::units`].

use std::collections::{HashMap, HashSet};

use ndarray::{Array2, ArrayD, Axis};

use super::units::{apply_axis, Layout, Matchings, Role};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::TensorData;
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

/// Model i's initializers as f64 arrays, by model-0 name.
pub type Weights = Vec<HashMap<String, ArrayD<f64>>>;

/// Unit weight vectors of every model for group `g`, stacked model-major: `[N·W, F]`. Each
/// member tensor has its other axes mapped into merged coordinates by the current matchings
/// (the unmerge P, so that alignment-matched neighbours line up), then its rows along the
/// group's axis are the units' features.
pub fn unit_vectors(
    g: &Group,
    layout: &Layout,
    slots: &Slots,
    weights: &Weights,
    m: &Matchings,
) -> Option<Array2<f64>> {
    let models = weights.len();
    let mut per_model: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); g.width]; models];
    for member in &g.members {
        let axes = slots.of(&member.tensor)?;
        let own = axes.get(member.axis).copied().flatten()?;
        let units = layout.units_along(layout.st.comp_of[own], g);
        for (i, w) in weights.iter().enumerate() {
            let mut t = w.get(&member.tensor)?.clone();
            for (a, s) in axes.iter().enumerate() {
                if a == member.axis {
                    continue;
                }
                if let Some(s) = s {
                    if let Some(r) = layout.axis_map(layout.st.comp_of[*s], m, i, Role::Unmerge) {
                        t = apply_axis(&t, a, &r);
                    }
                }
            }
            for (k, unit) in units.iter().enumerate() {
                if let Some(u) = unit {
                    per_model[i][*u].extend(t.index_axis(Axis(member.axis), k).iter());
                }
            }
        }
    }
    let features = per_model[0].first().map_or(0, Vec::len);
    if features == 0 || per_model.iter().flatten().any(|r| r.len() != features) {
        return None;
    }
    let flat: Vec<f64> = per_model.into_iter().flatten().flatten().collect();
    Array2::from_shape_vec((models * g.width, features), flat).ok()
}

/// Axes that a consumer contracts with its input activation (Conv input channels, the K axis
/// of Gemm/MatMul): their merged columns are summed over a cluster, all others averaged.
pub fn input_axes(graph: &Graph) -> HashSet<(String, usize)> {
    let mut out = HashSet::new();
    let attr = |n: &crate::onnx::proto::NodeProto, name: &str| {
        n.attribute
            .iter()
            .find(|a| a.name.as_deref() == Some(name))
            .and_then(|a| a.i)
            .unwrap_or(0)
    };
    for node in graph.nodes() {
        let input = |k: usize| {
            node.input
                .get(k)
                .filter(|s| graph.initializer(s).is_some())
                .cloned()
        };
        let rank = |name: &str| graph.initializer(name).map_or(0, |t| t.dims.len());
        match node.op_type.as_deref() {
            Some("Conv") => {
                if let Some(w) = input(1) {
                    out.insert((w, 1));
                }
            }
            Some("ConvTranspose") => {
                if let Some(w) = input(1) {
                    out.insert((w, 0));
                }
            }
            Some("Gemm") => {
                if let Some(a) = input(0) {
                    out.insert((a, if attr(node, "transA") != 0 { 0 } else { 1 }));
                }
                if let Some(b) = input(1) {
                    out.insert((b, if attr(node, "transB") != 0 { 1 } else { 0 }));
                }
            }
            Some("MatMul") => {
                if let Some(b) = input(1) {
                    let r = rank(&b);
                    out.insert((b, r.saturating_sub(2)));
                }
                if let Some(a) = input(0) {
                    let r = rank(&a);
                    out.insert((a, r.saturating_sub(1)));
                }
            }
            _ => {}
        }
    }
    out
}

/// The merged value of one initializer: (1/N) Σ_i T_i mapped on every axis by model i's
/// matrix (merge matrix N·M on output axes, unmerge P on input axes).
pub fn merged_tensor(
    name: &str,
    layout: &Layout,
    slots: &Slots,
    weights: &Weights,
    m: &Matchings,
    inputs: &HashSet<(String, usize)>,
) -> Result<ArrayD<f64>> {
    let models = weights.len();
    let mut acc: Option<ArrayD<f64>> = None;
    for (i, w) in weights.iter().enumerate() {
        let mut t = w
            .get(name)
            .ok_or_else(|| Error::tensor(name, format!("missing from model {i}")))?
            .clone();
        if let Some(axes) = slots.of(name) {
            for (a, s) in axes.iter().enumerate() {
                let Some(s) = s else { continue };
                let role = if inputs.contains(&(name.to_string(), a)) {
                    Role::In
                } else {
                    Role::Out
                };
                if let Some(r) = layout.axis_map(layout.st.comp_of[*s], m, i, role) {
                    t = apply_axis(&t, a, &r);
                }
            }
        }
        acc = Some(match acc {
            None => t,
            Some(a) => a + t,
        });
    }
    Ok(acc.map(|a| a / models as f64).unwrap_or_default())
}

/// An initializer as f64 (float types only).
pub fn as_f64(t: &TensorData) -> Option<ArrayD<f64>> {
    match t {
        TensorData::F32(a) => Some(a.mapv(f64::from)),
        TensorData::F64(a) => Some(a.clone()),
        TensorData::F16(a) => Some(a.mapv(|v| f64::from(f32::from(v)))),
        TensorData::BF16(a) => Some(a.mapv(|v| f64::from(f32::from(v)))),
        _ => None,
    }
}
