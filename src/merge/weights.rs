//! Weight-space side of merging: per-unit weight vectors (§2) and the merged initializers
//! (§4c), both through the per-axis maps of [`super::units`].

use std::collections::{HashMap, HashSet};

use ndarray::{Array2, ArrayD, Axis};

use super::bn_fold::Folded;
use super::units::{apply_axis, Layout, Matchings, Role};
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::onnx::TensorData;
use crate::symmetry::rules::attr_int;
use crate::symmetry::slots::{SlotId, Slots};
use crate::symmetry::{Group, Member};

/// Model i's float initializers, by model-0 name.
pub type Weights = Vec<HashMap<String, Stored>>;

/// A float initializer held at its own precision: f32 (float32, and float16/bfloat16, which
/// f32 holds exactly) or f64. Every use maps it to f64 on the fly (the copy each use made
/// anyway), so the models' weights cost their own size, not twice it.
#[derive(Clone, Debug, PartialEq)]
pub enum Stored {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
}

impl Stored {
    pub fn to_f64(&self) -> ArrayD<f64> {
        match self {
            Stored::F32(a) => a.mapv(f64::from),
            Stored::F64(a) => a.clone(),
        }
    }

    /// Whether some lane along `axis` differs from the first.
    pub fn varies_along(&self, axis: usize) -> bool {
        fn varies<T: PartialEq>(a: &ArrayD<T>, axis: usize) -> bool {
            a.axis_iter(Axis(axis))
                .skip(1)
                .any(|lane| lane != a.index_axis(Axis(axis), 0))
        }
        match self {
            Stored::F32(a) => varies(a, axis),
            Stored::F64(a) => varies(a, axis),
        }
    }
}

/// An initializer as `Stored` (float types only).
pub fn stored(t: TensorData) -> Option<Stored> {
    match t {
        TensorData::F32(a) => Some(Stored::F32(a)),
        TensorData::F64(a) => Some(Stored::F64(a)),
        TensorData::F16(a) => Some(Stored::F32(a.mapv(f32::from))),
        TensorData::BF16(a) => Some(Stored::F32(a.mapv(f32::from))),
        _ => None,
    }
}

/// One member tensor's share of group `g`'s unit weight vectors (BatchNorm-kept layers read
/// through `folded`), every model stacked
/// model-major: `[N·W, F]`. The tensor has its other axes mapped into merged coordinates by
/// the current matchings (the unmerge P, so that alignment-matched neighbours line up), then
/// its lanes along the group's axis are the units' features. A group's vectors are its
/// members' blocks side by side (§2), correlated block by block (`stats::RowBlock`). `None`
/// where the member gives no usable vectors (no slots, or units with unequal lane counts).
pub fn member_vectors(
    g: &Group,
    member: &Member,
    layout: &Layout,
    slots: &Slots,
    weights: &Weights,
    folded: &Folded,
    m: &Matchings,
) -> Option<Array2<f64>> {
    let axes = slots.of(&member.tensor)?;
    let own = axes.get(member.axis).copied().flatten()?;
    let units = layout.units_along(layout.st.comp_of[own], g);
    let mut lanes = vec![0usize; g.width];
    for u in units.iter().flatten() {
        lanes[*u] += 1;
    }
    if lanes.iter().any(|&l| l != lanes[0]) {
        return None;
    }
    // Filled in place: on a residual stream the members hold every block's weights.
    let mut out: Option<Array2<f64>> = None;
    for i in 0..weights.len() {
        let w = folded.get(weights, i, &member.tensor)?;
        let t = map_axes(w.to_f64(), axes, layout, m, i, |a| {
            (a != member.axis).then_some(Role::Unmerge)
        });
        // As [outer, lanes, inner] (standard layout after the maps): each lane is `outer` runs
        // of `inner` contiguous values, copied as slices (iterating the dynamic-rank view
        // element by element cost more than the rest of the similarity).
        let shape = t.shape();
        let outer: usize = shape[..member.axis].iter().product();
        let inner: usize = shape[member.axis + 1..].iter().product();
        let lanes_here = shape[member.axis];
        let t = if t.is_standard_layout() {
            t
        } else {
            t.as_standard_layout().into_owned()
        };
        let t = t.into_shape_with_order((outer, lanes_here, inner)).ok()?;
        let lane = outer * inner;
        let out = out.get_or_insert_with(|| {
            Array2::<f64>::zeros((weights.len() * g.width, lanes[0] * lane))
        });
        let mut cursor = vec![0; g.width];
        for (k, unit) in units.iter().enumerate() {
            let Some(u) = unit else { continue };
            let mut row = out.row_mut(i * g.width + u);
            let dst = row.slice_mut(ndarray::s![cursor[*u]..cursor[*u] + lane]);
            let src = t.index_axis(Axis(1), k);
            match (dst.into_slice(), src.as_slice()) {
                (Some(d), Some(s)) => d.copy_from_slice(s),
                (Some(d), None) => {
                    for (d, s) in d.iter_mut().zip(src.iter()) {
                        *d = *s;
                    }
                }
                (None, _) => return None,
            }
            cursor[*u] += lane;
        }
    }
    out
}

/// Axes that a consumer contracts with its input activation (Conv input channels, the K axis
/// of Gemm/MatMul): their merged columns are summed over a cluster, all others averaged.
pub fn input_axes(graph: &Graph) -> HashSet<(String, usize)> {
    let mut out = HashSet::new();
    let attr = |n, name| attr_int(n, name).unwrap_or(0);
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
            .to_f64();
        if let Some(axes) = slots.of(name) {
            t = map_axes(t, axes, layout, m, i, |a| {
                Some(if inputs.contains(&(name.to_string(), a)) {
                    Role::In
                } else {
                    Role::Out
                })
            });
        }
        acc = Some(match acc {
            None => t,
            Some(a) => a + t,
        });
    }
    Ok(acc.map(|a| a / models as f64).unwrap_or_default())
}

/// `t` (a tensor with slots `axes`) with each grouped axis mapped by model `model`'s matrix in
/// the role `role` gives it (`None`: left as it is).
pub fn map_axes(
    mut t: ArrayD<f64>,
    axes: &[Option<SlotId>],
    layout: &Layout,
    m: &Matchings,
    model: usize,
    role: impl Fn(usize) -> Option<Role>,
) -> ArrayD<f64> {
    for (a, s) in axes.iter().enumerate() {
        let (Some(s), Some(role)) = (s, role(a)) else {
            continue;
        };
        if let Some(r) = layout.axis_map(layout.st.comp_of[*s], m, model, role) {
            t = apply_axis(&t, a, &r);
        }
    }
    t
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
