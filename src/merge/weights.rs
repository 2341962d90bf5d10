//! Weight-space side of merging: per-unit weight vectors (§2) and the merged initializers
//! (§4c), both through the per-axis maps of [`super::units`].

use std::collections::{HashMap, HashSet};

use ndarray::{ArrayD, ArrayViewMut2, Axis};

use super::bn_fold::Folded;
use super::units::{apply_axis, AxisMap, Entry, Layout, Matchings, Role};
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
    pub fn is_standard_layout(&self) -> bool {
        match self {
            Stored::F32(a) => a.is_standard_layout(),
            Stored::F64(a) => a.is_standard_layout(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            Stored::F32(a) => a.shape(),
            Stored::F64(a) => a.shape(),
        }
    }

    /// An f32 tensor's values in standard order, in place; `None` for f64 or strided ones.
    pub fn as_f32_slice(&self) -> Option<&[f32]> {
        match self {
            Stored::F32(a) => a.as_slice(),
            Stored::F64(_) => None,
        }
    }

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
/// through `folded`), every model stacked model-major: `[N·W, F]`, written row-major into
/// `out` (its dims returned). The tensor has its other axes mapped into merged coordinates by
/// the current matchings (the unmerge P, so that alignment-matched neighbours line up), then
/// its lanes along the group's axis are the units' features. A group's vectors are its
/// members' blocks side by side (§2), correlated block by block (`stats::RowBlock`). `None`
/// where the member gives no usable vectors (no slots, or units with unequal lane counts).
#[allow(clippy::too_many_arguments)]
pub fn member_vectors(
    g: &Group,
    member: &Member,
    layout: &Layout,
    slots: &Slots,
    weights: &Weights,
    folded: &Folded,
    m: &Matchings,
    out: &mut Vec<f64>,
) -> Option<(usize, usize)> {
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
    let mut dims: Option<(usize, usize)> = None;
    for i in 0..weights.len() {
        let w = folded.get(weights, i, &member.tensor)?;
        // The other grouped axes, each mapped by model i's unmerge (alignment-matched
        // neighbours line up).
        let maps: Vec<(usize, AxisMap)> = axes
            .iter()
            .enumerate()
            .filter(|&(a, _)| a != member.axis)
            .filter_map(|(a, s)| {
                let s = (*s)?;
                let r = layout.axis_map(layout.st.comp_of[s], m, i, Role::Unmerge)?;
                Some((a, r))
            })
            .collect();
        // One pass straight into the unit rows where at most one axis moves, by a map of at
        // most one entry per lane (every unmerge): converting, mapping and copying the tensor
        // in three passes, each a fresh tensor, was a third of a ResNet's matching.
        let single = match maps.as_slice() {
            _ if !w.is_standard_layout() => None,
            [] => Some(None),
            [(a, r)] => r.single_entries().map(|(e, new)| Some((*a, e, new))),
            _ => None,
        };
        // Elsewhere (CCA's dense maps, several mapped axes) the tensor is mapped whole first.
        let general;
        let (source, mapped) = match &single {
            Some(single) => (
                w,
                single.as_ref().map(|(axis, entries, new)| Mapped {
                    axis: *axis,
                    entries,
                    new: *new,
                }),
            ),
            None => {
                let mut t = w.to_f64();
                for (a, r) in &maps {
                    t = apply_axis(&t, *a, r);
                }
                if !t.is_standard_layout() {
                    t = t.as_standard_layout().into_owned();
                }
                general = Stored::F64(t);
                (&general, None)
            }
        };
        let mut shape = source.shape().to_vec();
        if let Some(m) = &mapped {
            shape[m.axis] = m.new;
        }
        let lane: usize = shape
            .iter()
            .enumerate()
            .filter(|&(d, _)| d != member.axis)
            .map(|(_, &n)| n)
            .product();
        let d = *dims.get_or_insert_with(|| sized(out, (weights.len() * g.width, lanes[0] * lane)));
        let mut out = ArrayViewMut2::from_shape(d, &mut out[..]).ok()?;
        let rows = Lanes {
            axis: member.axis,
            units: &units,
            width: g.width,
            first_row: i * g.width,
            lane,
        };
        match source {
            Stored::F32(a) => rows.scatter(a, mapped.as_ref(), &mut out)?,
            Stored::F64(a) => rows.scatter(a, mapped.as_ref(), &mut out)?,
        }
    }
    dims
}

/// `buffer` holding `dims.0 × dims.1` values, whatever they are: every lane's scatter writes
/// (or zeroes, then adds into) all of its row's values, while they are in cache. Zeroing the
/// whole buffer first was a pass through memory of its own (5 % of a ResNet-18 pair's
/// matching).
fn sized(buffer: &mut Vec<f64>, dims: (usize, usize)) -> (usize, usize) {
    buffer.resize(dims.0 * dims.1, 0.0);
    dims
}

/// An axis of a member tensor mapped by single entries (`AxisMap::single_entries`) to `new`
/// indices.
struct Mapped<'a> {
    axis: usize,
    entries: &'a [Entry],
    new: usize,
}

/// Where one model's lanes of a member tensor go: lane `k` along `axis` is unit `units[k]`'s
/// next `lane` features, in row `first_row + unit`.
struct Lanes<'a> {
    axis: usize,
    units: &'a [Option<usize>],
    width: usize,
    first_row: usize,
    lane: usize,
}

impl Lanes<'_> {
    /// Writes `w`'s lanes into `out` (every value of their rows), with `mapped` (an axis, its
    /// lanes' single entries, its new width) scattered on the way: the values `apply_axis`
    /// and a copy give, by the same f64 additions in the same order (into each new index,
    /// from 0, its source lanes in ascending order). Reads `w`'s contiguous runs in place (a
    /// lane of a consumer's input axis is strided). `None` where `w` is not in standard
    /// layout or the shapes disagree (the caller checks the layout).
    fn scatter<T: Copy>(
        &self,
        w: &ArrayD<T>,
        mapped: Option<&Mapped>,
        out: &mut ArrayViewMut2<f64>,
    ) -> Option<()>
    where
        f64: From<T>,
    {
        let (shape, src, a) = (w.shape(), w.as_slice()?, self.axis);
        let lanes = *shape.get(a)?;
        if lanes != self.units.len() {
            return None;
        }
        // The dims around the member axis `a` and the mapped axis `b`: [pre, lo, mid, hi,
        // post], with lo/hi the lower/higher of the two.
        let b = mapped.map_or(a, |m| m.axis);
        let (lo, hi) = (a.min(b), a.max(b));
        let pre: usize = shape[..lo].iter().product();
        let mid: usize = shape.get(lo + 1..hi).map_or(1, |d| d.iter().product());
        let post: usize = shape[hi + 1..].iter().product();
        if let Some(m) = mapped.filter(|_| mid == 1 && post == 1) {
            return self.scatter_adjacent(src, (pre, lanes, shape[b]), m, a < b, out);
        }
        let starts = self.lane_starts(out.ncols())?;
        let out = out.as_slice_mut()?;
        for (k, start) in starts.iter().enumerate() {
            let Some(start) = *start else { continue };
            let dst = out.get_mut(start..start + self.lane)?;
            let Some(&Mapped { entries, new, .. }) = mapped else {
                // [pre, a, post]: lane k is `pre` runs of `post`.
                for p in 0..pre {
                    let from = src.get((p * lanes + k) * post..(p * lanes + k + 1) * post)?;
                    let to = dst.get_mut(p * post..(p + 1) * post)?;
                    for (d, &s) in to.iter_mut().zip(from) {
                        *d = f64::from(s);
                    }
                }
                continue;
            };
            if entries.len() != shape[b] {
                return None;
            }
            dst.fill(0.0);
            for p in 0..pre {
                for (l, hit) in entries.iter().enumerate() {
                    let Some((j, v)) = *hit else { continue };
                    for q in 0..mid {
                        // Source [pre, lo, mid, hi, post]; the lane [pre, mid, new, post]
                        // (a < b) or [pre, new, mid, post] (b < a).
                        let (from, to) = if a < b {
                            (
                                (((p * lanes + k) * mid + q) * shape[b] + l) * post,
                                ((p * mid + q) * new + j) * post,
                            )
                        } else {
                            (
                                (((p * shape[b] + l) * mid + q) * lanes + k) * post,
                                ((p * new + j) * mid + q) * post,
                            )
                        };
                        let from = src.get(from..from + post)?;
                        let to = dst.get_mut(to..to + post)?;
                        for (d, &s) in to.iter_mut().zip(from) {
                            *d += v * f64::from(s);
                        }
                    }
                }
            }
        }
        Some(())
    }

    /// Where each lane (of `units`) starts in the row-major `out` of `cols` columns: its
    /// unit's row, after the unit's earlier lanes; `None` where a unit's lanes overflow its
    /// row.
    fn lane_starts(&self, cols: usize) -> Option<Vec<Option<usize>>> {
        let mut cursor = vec![0; self.width];
        self.units
            .iter()
            .map(|unit| match *unit {
                Some(u) => {
                    let at = cursor.get_mut(u)?;
                    let start = (self.first_row + u) * cols + *at;
                    *at += self.lane;
                    (*at <= cols).then_some(Some(start))
                }
                None => Some(None),
            })
            .collect()
    }

    /// `scatter` where the mapped axis is next to the member axis and last but for it (a
    /// Gemm's or a 1×1 convolution's weight: `mid` and `post` 1), whose general loop spent
    /// most of its time slicing runs of one element: a ResNet-50's matching spent 18 % of
    /// its time there. The same additions in the same order (each new index from 0, its
    /// source lanes ascending). A consumer's lanes (its input axis, `member_first` false)
    /// are strided: they are read in blocks of neighbouring lanes, one cache line of each
    /// source row at a time.
    fn scatter_adjacent<T: Copy>(
        &self,
        src: &[T],
        (pre, lanes, across): (usize, usize, usize),
        m: &Mapped,
        member_first: bool,
        out: &mut ArrayViewMut2<f64>,
    ) -> Option<()>
    where
        f64: From<T>,
    {
        const BLOCK: usize = 16;
        if m.entries.len() != across || m.entries.iter().flatten().any(|&(j, _)| j >= m.new) {
            return None;
        }
        if pre * m.new > self.lane {
            return None;
        }
        let starts = self.lane_starts(out.ncols())?;
        let out = out.as_slice_mut()?;
        if member_first {
            // [pre, lanes, across]: lane k is `pre` contiguous runs of `across`.
            for (k, start) in starts.iter().enumerate() {
                let Some(start) = *start else { continue };
                out.get_mut(start..start + self.lane)?.fill(0.0);
                for p in 0..pre {
                    let from = src.get((p * lanes + k) * across..(p * lanes + k + 1) * across)?;
                    let to = out.get_mut(start + p * m.new..start + (p + 1) * m.new)?;
                    for (hit, &s) in m.entries.iter().zip(from) {
                        if let Some((j, v)) = *hit {
                            to[j] += v * f64::from(s);
                        }
                    }
                }
            }
            return Some(());
        }
        // [pre, across, lanes]: lane k is element k of every source row.
        for k0 in (0..lanes).step_by(BLOCK) {
            let k1 = (k0 + BLOCK).min(lanes);
            for start in starts[k0..k1].iter().flatten() {
                out.get_mut(*start..*start + self.lane)?.fill(0.0);
            }
            for p in 0..pre {
                for (l, hit) in m.entries.iter().enumerate() {
                    let Some((j, v)) = *hit else { continue };
                    let row = (p * across + l) * lanes;
                    let from = src.get(row + k0..row + k1)?;
                    for (&s, start) in from.iter().zip(&starts[k0..k1]) {
                        if let Some(start) = *start {
                            *out.get_mut(start + p * m.new + j)? += v * f64::from(s);
                        }
                    }
                }
            }
        }
        Some(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symmetry::permute::SplitMix;

    /// What `Lanes::scatter` replaces: the tensor in f64, mapped by `apply_axis`, then each
    /// unit's lanes copied after each other.
    fn mapped_then_copied(
        w: &ArrayD<f32>,
        member: usize,
        map: Option<(usize, &AxisMap)>,
        units: &[Option<usize>],
        width: usize,
    ) -> Vec<Vec<f64>> {
        let mut t = w.mapv(f64::from);
        if let Some((a, r)) = map {
            t = apply_axis(&t, a, r);
        }
        let mut rows = vec![Vec::new(); width];
        for (k, unit) in units.iter().enumerate() {
            if let Some(u) = unit {
                rows[*u].extend(t.index_axis(Axis(member), k).iter().copied());
            }
        }
        rows
    }

    /// Against the mapped copy: a 4-D tensor (every member axis, mapped axes adjacent or
    /// not), and a Gemm-sized 2-D one, whose adjacent axes take `scatter_adjacent` with more
    /// lanes than its blocks hold.
    #[test]
    fn lanes_scatter_gives_the_mapped_copy_bit_for_bit() {
        let mut rng = SplitMix(11);
        for shape in [vec![6, 5, 3, 2], vec![37, 40]] {
            scatter_matches_the_mapped_copy(&shape, &mut rng);
        }
    }

    fn scatter_matches_the_mapped_copy(shape: &[usize], rng: &mut SplitMix) {
        let w = ArrayD::from_shape_fn(shape, |_| (rng.uniform() * 2.0 - 1.0) as f32);
        // Every member axis, with no map, or one map of another axis whose lanes merge
        // (several into one, with scales that f32 does not hold) or are dropped.
        for member in 0..shape.len() {
            // Units: lanes in shuffled order, two lanes per unit, an odd lane left out.
            let width = shape[member] / 2;
            let mut order: Vec<usize> = (0..shape[member]).collect();
            rng.shuffle(&mut order);
            let units: Vec<Option<usize>> = order
                .iter()
                .map(|&o| (o < 2 * width).then_some(o / 2))
                .collect();
            let lanes = 2;
            let mut maps: Vec<Option<(usize, AxisMap)>> = vec![None];
            for a in (0..shape.len()).filter(|&a| a != member) {
                let cols = shape[a] - 1;
                let entries = (0..shape[a])
                    .map(|l| (l != 1).then(|| ((l * 7) % cols, 1.0 / (1.0 + l as f64))))
                    .collect();
                maps.push(Some((a, AxisMap::Sparse { cols, entries })));
            }
            for map in &maps {
                let mapped = map
                    .as_ref()
                    .and_then(|(a, r)| r.single_entries().map(|(e, new)| (*a, e, new)));
                let mut out_shape = shape.to_vec();
                if let Some((a, _, new)) = &mapped {
                    out_shape[*a] = *new;
                }
                let lane: usize = (0..shape.len())
                    .filter(|&d| d != member)
                    .map(|d| out_shape[d])
                    .product();
                // Stale values (NaN) where the rows go: every one must be written.
                let mut out = ndarray::Array2::<f64>::from_elem((width, lanes * lane), f64::NAN);
                let rows = Lanes {
                    axis: member,
                    units: &units,
                    width,
                    first_row: 0,
                    lane,
                };
                let entries = mapped.as_ref().map(|(axis, entries, new)| Mapped {
                    axis: *axis,
                    entries,
                    new: *new,
                });
                rows.scatter(&w, entries.as_ref(), &mut out.view_mut())
                    .expect("shapes agree");
                let want = mapped_then_copied(
                    &w,
                    member,
                    map.as_ref().map(|(a, r)| (*a, r)),
                    &units,
                    width,
                );
                for (u, want) in want.iter().enumerate() {
                    let got: Vec<u64> = out.row(u).iter().map(|v| v.to_bits()).collect();
                    let want: Vec<u64> = want.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(
                        got,
                        want,
                        "member axis {member}, map {:?}, unit {u}",
                        map.as_ref().map(|m| m.0)
                    );
                }
            }
        }
    }
}
