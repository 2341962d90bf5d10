//! How a group's units sit on a tensor axis, and the per-model linear maps that merging applies
//! to every axis.
//!
//! A group's units are numbered `0..width`: for a plain group, the leaf's index; for a blocked
//! group, `block · block_size + index in block`. A matching gives, per group, the unmerge
//! matrix P ([models·width, width], 0/1): row `i·width + u` (unit u of model i) has a 1 in the
//! merged unit it joins. Every axis's map is built from these through the axis structure: a
//! product of factors maps as the Kronecker product of its factors' maps, a concatenation as
//! the block-diagonal of its ranges' maps, and fixed or ungrouped parts as the identity.

use std::collections::HashMap;

use ndarray::{Array2, ArrayD};

use crate::symmetry::structure::{CompId, Def, Structure};
use crate::symmetry::{Group, GroupKind};

/// Matchings of all groups: `p[g]` is group g's unmerge, `blocks[g]` (blocked groups only)
/// the block-level one.
#[derive(Clone, Debug, Default)]
pub struct Matchings {
    pub models: usize,
    pub p: HashMap<usize, Unmerge>,
    pub blocks: HashMap<usize, Unmerge>,
    /// Groups aligned by a linear map instead of their permutation (`--method cca`): model i's
    /// map into model 0's units. Takes precedence over `p` on every axis.
    pub linear: HashMap<usize, std::sync::Arc<Vec<super::cca::LinearMap>>>,
}

/// An unmerge matrix P ([models·width, merged], 0/1, one 1 per row) stored as the merged unit
/// of each row. Dense, P costs 8·N·W² bytes per group (1.8 GB for a ViT-B's MLPs, twice over
/// with the iterative loop's best copy); stored this way it costs 4·N·W.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unmerge {
    pub target: Vec<u32>,
    pub merged: usize,
}

impl Unmerge {
    /// From a dense 0/1 matrix with one 1 per row (what the matchers produce).
    pub fn from_dense(p: &Array2<f64>) -> Unmerge {
        let target = p
            .rows()
            .into_iter()
            .map(|row| row.iter().position(|&v| v > 0.5).unwrap_or(0) as u32)
            .collect();
        Unmerge {
            target,
            merged: p.ncols(),
        }
    }

    pub fn dense(&self) -> Array2<f64> {
        let mut p = Array2::zeros((self.target.len(), self.merged));
        for (r, &c) in self.target.iter().enumerate() {
            p[[r, c as usize]] = 1.0;
        }
        p
    }

    /// How many units (of all models) each merged unit gathers.
    pub fn cluster_sizes(&self) -> Vec<usize> {
        let mut n = vec![0; self.merged];
        for &c in &self.target {
            n[c as usize] += 1;
        }
        n
    }

    /// The same clustering with merged units numbered by first appearance: two matchings that
    /// differ only in how their merged units are numbered map a tensor's axis to the same
    /// columns in another order, which no row correlation sees.
    pub fn canonical(&self) -> Unmerge {
        let mut label = vec![u32::MAX; self.merged];
        let mut next = 0;
        let target = self
            .target
            .iter()
            .map(|&c| {
                let l = &mut label[c as usize];
                if *l == u32::MAX {
                    *l = next;
                    next += 1;
                }
                *l
            })
            .collect();
        Unmerge {
            target,
            merged: self.merged,
        }
    }
}

/// Which matrix an axis takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Rows of merged units are the mean of their cluster (outputs, biases, norm parameters).
    Out,
    /// Columns are summed over the cluster (the input axis of a consumer).
    In,
    /// Plain unmerge P for both (weight vectors, where only the alignment matters).
    Unmerge,
}

/// Where each group is anchored in the structure.
pub struct Layout<'a> {
    pub st: &'a Structure,
    by_leaf: HashMap<CompId, usize>,
    by_block: HashMap<CompId, usize>,
    groups: &'a [Group],
}

impl<'a> Layout<'a> {
    pub fn new(st: &'a Structure, groups: &'a [Group]) -> Layout<'a> {
        let mut by_leaf = HashMap::new();
        let mut by_block = HashMap::new();
        for g in groups {
            by_leaf.insert(g.leaf, g.id);
            if let Some(b) = g.block {
                by_block.entry(b).or_insert(g.id);
            }
        }
        Layout {
            st,
            by_leaf,
            by_block,
            groups,
        }
    }

    /// The map of model `model` for an axis of component `c`; `None` means identity.
    pub fn axis_map(&self, c: CompId, m: &Matchings, model: usize, role: Role) -> Option<AxisMap> {
        let comp = &self.st.comps[c];
        if comp.is_fixed() {
            return None;
        }
        if let Some(&g) = self.by_leaf.get(&c) {
            if self.groups[g].block.is_none() {
                if let Some(maps) = m.linear.get(&g) {
                    return Some(AxisMap::Dense(linear_map(&maps[model], role)));
                }
                return m.p.get(&g).map(|p| model_map(p, model, m.models, role));
            }
        }
        if let Some(&g) = self.by_block.get(&c) {
            return m
                .blocks
                .get(&g)
                .map(|p| model_map(p, model, m.models, role));
        }
        match &comp.def {
            Def::Leaf => None,
            Def::Factor(parts) => {
                let mut maps: Vec<(usize, Option<AxisMap>)> = Vec::new();
                let mut k = 0;
                while k < parts.len() {
                    if let Some(g) = self.blocked_pair(parts, k) {
                        let size = self.groups[g].width;
                        maps.push((
                            size,
                            m.p.get(&g).map(|p| model_map(p, model, m.models, role)),
                        ));
                        k += 2;
                    } else {
                        let p = parts[k];
                        maps.push((self.st.comps[p].size, self.axis_map(p, m, model, role)));
                        k += 1;
                    }
                }
                if maps.iter().all(|x| x.1.is_none()) {
                    return None;
                }
                Some(maps.into_iter().fold(AxisMap::identity(1), |acc, (n, x)| {
                    acc.kron(&x.unwrap_or_else(|| AxisMap::identity(n)))
                }))
            }
            Def::Concat(pieces) => {
                let maps: Vec<(usize, Option<AxisMap>)> = pieces
                    .iter()
                    .map(|&(_, size, p)| (size, self.axis_map(p, m, model, role)))
                    .collect();
                if maps.iter().all(|x| x.1.is_none()) {
                    return None;
                }
                Some(AxisMap::block_diagonal(
                    maps.into_iter()
                        .map(|(n, x)| x.unwrap_or_else(|| AxisMap::identity(n)))
                        .collect(),
                ))
            }
        }
    }

    /// The matchings `axis_map` reads for an axis of component `c`: `(group, block-level)`
    /// pairs. A cache of anything built from mapped axes is valid while these are unchanged.
    pub fn map_deps(&self, c: CompId, out: &mut Vec<(usize, bool)>) {
        let comp = &self.st.comps[c];
        if comp.is_fixed() {
            return;
        }
        if let Some(&g) = self.by_leaf.get(&c) {
            if self.groups[g].block.is_none() {
                out.push((g, false));
                return;
            }
        }
        if let Some(&g) = self.by_block.get(&c) {
            out.push((g, true));
            return;
        }
        match &comp.def {
            Def::Leaf => {}
            Def::Factor(parts) => {
                let mut k = 0;
                while k < parts.len() {
                    if let Some(g) = self.blocked_pair(parts, k) {
                        out.push((g, false));
                        k += 2;
                    } else {
                        self.map_deps(parts[k], out);
                        k += 1;
                    }
                }
            }
            Def::Concat(pieces) => {
                for &(_, _, p) in pieces {
                    self.map_deps(p, out);
                }
            }
        }
    }

    /// The blocked group whose (block, leaf) pair starts at `parts[k]`.
    fn blocked_pair(&self, parts: &[CompId], k: usize) -> Option<usize> {
        let (&b, &l) = (parts.get(k)?, parts.get(k + 1)?);
        let &g = self.by_leaf.get(&l)?;
        (self.groups[g].block == Some(b)).then_some(g)
    }

    /// For each index along an axis of component `c`, the unit of group `g` it holds (if any).
    pub fn units_along(&self, c: CompId, g: &Group) -> Vec<Option<usize>> {
        let size = self.st.comps[c].size;
        (0..size)
            .map(|i| {
                let mut ctx = Vec::new();
                self.st.collect_leaves(c, i, &mut ctx);
                let digit = |x: CompId| ctx.iter().find(|(k, _)| *k == x).map(|d| d.1);
                match (g.block, &g.kind) {
                    (None, _) => digit(g.leaf),
                    (Some(b), GroupKind::Blocked { block_size, .. }) => {
                        Some(digit(b)? * block_size + digit(g.leaf)?)
                    }
                    _ => None,
                }
            })
            .collect()
    }
}

/// Model `model`'s rows of P, as the matrix applied to its axis: P_i (In / Unmerge) or the
/// merge matrix N·P_i / (colsum(P) + 1e-5) (Out), the reference's storage convention.
fn model_map(p: &Unmerge, model: usize, models: usize, role: Role) -> AxisMap {
    let w = p.target.len() / models;
    let sizes = p.cluster_sizes();
    let entries = (0..w)
        .map(|u| {
            let j = p.target[model * w + u] as usize;
            let v = match role {
                Role::In | Role::Unmerge => 1.0,
                Role::Out => models as f64 / (sizes[j] as f64 + 1e-5),
            };
            Some((j, v))
        })
        .collect();
    AxisMap::Sparse {
        cols: p.merged,
        entries,
    }
}

/// A lane's single entry in a map: its new index and scale, or none.
pub type Entry = Option<(usize, f64)>;

/// The matrix an axis is mapped through ([old, new]). Every unmerge and merge matrix, and
/// their Kronecker products and block-diagonals, has at most one entry per row and is kept as
/// those entries: the dense form of a 3,072-unit MLP axis is 75 MB of zeros to build and scan,
/// per member tensor per sweep. CCA's linear maps are dense.
#[derive(Clone, Debug)]
pub enum AxisMap {
    /// Row k's single entry (new index, scale), or none; `cols` new indices.
    Sparse {
        cols: usize,
        entries: Vec<Option<(usize, f64)>>,
    },
    Dense(Array2<f64>),
}

impl AxisMap {
    pub fn identity(n: usize) -> AxisMap {
        AxisMap::Sparse {
            cols: n,
            entries: (0..n).map(|i| Some((i, 1.0))).collect(),
        }
    }

    /// Each row's single entry (new index, scale) and the new width, where no row has more
    /// than one (every unmerge and merge matrix): what `apply_axis` scatters.
    pub fn single_entries(&self) -> Option<(Vec<Entry>, usize)> {
        match self {
            AxisMap::Sparse { cols, entries } => Some((entries.clone(), *cols)),
            AxisMap::Dense(d) => one_per_row(d).map(|single| (single, d.ncols())),
        }
    }

    pub fn dim(&self) -> (usize, usize) {
        match self {
            AxisMap::Sparse { cols, entries } => (entries.len(), *cols),
            AxisMap::Dense(d) => d.dim(),
        }
    }

    pub fn to_dense(&self) -> Array2<f64> {
        match self {
            AxisMap::Dense(d) => d.clone(),
            AxisMap::Sparse { cols, entries } => {
                let mut out = Array2::zeros((entries.len(), *cols));
                for (k, e) in entries.iter().enumerate() {
                    if let Some((j, v)) = *e {
                        out[[k, j]] = v;
                    }
                }
                out
            }
        }
    }

    /// The Kronecker product `self ⊗ other`: index (i, k) of the product axis is i·|other| + k.
    fn kron(&self, other: &AxisMap) -> AxisMap {
        match (self, other) {
            (
                AxisMap::Sparse {
                    cols: ac,
                    entries: a,
                },
                AxisMap::Sparse {
                    cols: bc,
                    entries: b,
                },
            ) => AxisMap::Sparse {
                cols: ac * bc,
                entries: a
                    .iter()
                    .flat_map(|x| {
                        b.iter().map(move |y| match (x, y) {
                            (Some((ja, va)), Some((jb, vb))) => Some((ja * bc + jb, va * vb)),
                            _ => None,
                        })
                    })
                    .collect(),
            },
            _ => AxisMap::Dense(kron(&self.to_dense(), &other.to_dense())),
        }
    }

    /// The block-diagonal of `maps` (a concatenated axis: each piece keeps its own map).
    fn block_diagonal(maps: Vec<AxisMap>) -> AxisMap {
        if maps.iter().all(|m| matches!(m, AxisMap::Sparse { .. })) {
            let (mut cols, mut entries) = (0, Vec::new());
            for m in maps {
                if let AxisMap::Sparse {
                    cols: c,
                    entries: e,
                } = m
                {
                    entries.extend(e.into_iter().map(|x| x.map(|(j, v)| (j + cols, v))));
                    cols += c;
                }
            }
            return AxisMap::Sparse { cols, entries };
        }
        let rows: usize = maps.iter().map(|m| m.dim().0).sum();
        let cols: usize = maps.iter().map(|m| m.dim().1).sum();
        let mut out = Array2::zeros((rows, cols));
        let (mut r, mut c) = (0, 0);
        for m in maps {
            let (n, k) = m.dim();
            out.slice_mut(ndarray::s![r..r + n, c..c + k])
                .assign(&m.to_dense());
            (r, c) = (r + n, c + k);
        }
        AxisMap::Dense(out)
    }
}

/// A linear alignment as the matrix applied to an axis (x'[j] = Σ_k x[k] r[k, j]): output
/// axes take Tᵀ (rows become T W), input axes T⁻¹ (columns become V T⁻¹), so that a layer
/// pair computes what it did; activations and weight vectors are mapped as outputs.
fn linear_map(map: &super::cca::LinearMap, role: Role) -> Array2<f64> {
    match role {
        Role::Out | Role::Unmerge => map.t.t().to_owned(),
        Role::In => map.inverse.clone(),
    }
}

fn kron(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
    let (ar, ac) = a.dim();
    let (br, bc) = b.dim();
    Array2::from_shape_fn((ar * br, ac * bc), |(i, j)| {
        a[[i / br, j / bc]] * b[[i % br, j % bc]]
    })
}

/// `x` with axis `axis` mapped through `r` ([old, new]): x'[.., j, ..] = Σ_k x[.., k, ..] r[k, j].
pub fn apply_axis(x: &ArrayD<f64>, axis: usize, r: &AxisMap) -> ArrayD<f64> {
    let r = match r {
        AxisMap::Sparse { cols, entries } => return scatter_axis(x, axis, entries, *cols),
        AxisMap::Dense(d) => d,
    };
    if let Some(single) = one_per_row(r) {
        return scatter_axis(x, axis, &single, r.ncols());
    }
    let moved = x.view().permuted_axes(move_last(x.ndim(), axis));
    let shape = moved.shape().to_vec();
    let rows: usize = shape[..shape.len() - 1].iter().product();
    let flat = moved
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order((rows, shape[shape.len() - 1]))
        .expect("contiguous");
    let out = flat.dot(r);
    let mut new_shape = shape.clone();
    *new_shape.last_mut().expect("rank ≥ 1") = r.ncols();
    let back = out
        .into_shape_with_order(new_shape)
        .expect("same size")
        .into_dyn();
    let inv = invert(&move_last(x.ndim(), axis));
    back.permuted_axes(inv).as_standard_layout().into_owned()
}

/// For a map whose every row has at most one non-zero (every unmerge and merge matrix, and
/// their Kronecker products and block-diagonals): that entry per row.
fn one_per_row(r: &Array2<f64>) -> Option<Vec<Option<(usize, f64)>>> {
    r.rows()
        .into_iter()
        .map(|row| {
            let mut hit = None;
            for (j, &v) in row.iter().enumerate() {
                if v != 0.0 {
                    if hit.is_some() {
                        return None;
                    }
                    hit = Some((j, v));
                }
            }
            Some(hit)
        })
        .collect()
}

/// `apply_axis` for a map with one entry per row: each old lane is added, scaled, into its
/// new lane. The same sums as the matrix product without its O(old·new) work per element, which
/// dominated rewriting and weight matching on wide layers.
fn scatter_axis(
    x: &ArrayD<f64>,
    axis: usize,
    single: &[Option<(usize, f64)>],
    new: usize,
) -> ArrayD<f64> {
    let mut shape = x.shape().to_vec();
    shape[axis] = new;
    let mut out = ArrayD::<f64>::zeros(shape.clone());
    // As [outer, lanes, inner]: two-dimensional lanes, which ndarray walks far faster than
    // dynamic-rank views (this runs on every member tensor in every sweep).
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    // Outer index by outer index, each lane a contiguous run of `inner` values on both sides
    // (lane by lane, a 1×1 convolution's input axis is a stride-`lanes` walk through the whole
    // tensor per lane). Every element gets its lanes' terms in the same order either way.
    let src = x.as_standard_layout();
    let (Some(src), Some(dst)) = (src.as_slice(), out.as_slice_mut()) else {
        unreachable!("standard-layout arrays are contiguous");
    };
    let lanes = x.shape()[axis];
    if inner == 0 || lanes == 0 || new == 0 {
        return out;
    }
    for (from, to) in src
        .chunks_exact(lanes * inner)
        .zip(dst.chunks_exact_mut(new * inner))
        .take(outer)
    {
        for (k, hit) in single.iter().enumerate() {
            if let Some((j, v)) = *hit {
                let d = &mut to[j * inner..(j + 1) * inner];
                for (d, s) in d.iter_mut().zip(&from[k * inner..(k + 1) * inner]) {
                    *d += v * s;
                }
            }
        }
    }
    out
}

fn move_last(rank: usize, axis: usize) -> Vec<usize> {
    (0..rank).filter(|&a| a != axis).chain([axis]).collect()
}

fn invert(p: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; p.len()];
    for (i, &v) in p.iter().enumerate() {
        inv[v] = i;
    }
    inv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(cols: usize, entries: &[Option<(usize, f64)>]) -> AxisMap {
        AxisMap::Sparse {
            cols,
            entries: entries.to_vec(),
        }
    }

    /// Kronecker products and block-diagonals of sparse maps equal those of their dense
    /// forms (the matrices `axis_map` built before), and dense pieces make a dense result.
    #[test]
    fn sparse_maps_compose_as_their_dense_forms() {
        let a = sparse(2, &[Some((1, 0.5)), None, Some((0, 2.0))]);
        let b = sparse(3, &[Some((2, 1.0)), Some((0, 3.0))]);
        let d = AxisMap::Dense(Array2::from_shape_fn((2, 2), |(i, j)| (i + 2 * j) as f64));
        let k = a.kron(&b);
        assert!(matches!(k, AxisMap::Sparse { .. }));
        assert_eq!(k.to_dense(), kron(&a.to_dense(), &b.to_dense()));
        let kd = a.kron(&d);
        assert!(matches!(kd, AxisMap::Dense(_)));
        assert_eq!(kd.to_dense(), kron(&a.to_dense(), &d.to_dense()));
        let diag = AxisMap::block_diagonal(vec![a.clone(), b.clone()]);
        let mut want = Array2::zeros((5, 5));
        want.slice_mut(ndarray::s![..3, ..2]).assign(&a.to_dense());
        want.slice_mut(ndarray::s![3.., 2..]).assign(&b.to_dense());
        assert!(matches!(diag, AxisMap::Sparse { .. }));
        assert_eq!(diag.to_dense(), want);
        let mixed = AxisMap::block_diagonal(vec![a.clone(), d.clone()]);
        let mut want = Array2::zeros((5, 4));
        want.slice_mut(ndarray::s![..3, ..2]).assign(&a.to_dense());
        want.slice_mut(ndarray::s![3.., 2..]).assign(&d.to_dense());
        assert_eq!(mixed.to_dense(), want);
        // Applied to a tensor's axis 1, sparse and dense maps give x'[o, j, i] =
        // Σ_k x[o, k, i] r[k, j], summed here by hand.
        let x = ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 3, 2]), |ix| {
            (ix[0] * 6 + ix[1] * 2 + ix[2]) as f64 - 5.0
        });
        for r in [a.clone(), AxisMap::Dense(a.to_dense() + 0.25)] {
            let m = r.to_dense();
            let want = ArrayD::from_shape_fn(ndarray::IxDyn(&[4, 2, 2]), |ix| {
                (0..3)
                    .map(|k| x[[ix[0], k, ix[2]]] * m[[k, ix[1]]])
                    .sum::<f64>()
            });
            assert_eq!(apply_axis(&x, 1, &r), want);
        }
    }
}
