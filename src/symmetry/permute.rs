//! Applying unit permutations to tensors. A permutation assignment gives each free leaf
//! component a permutation (or one per block, for blocked leaves); the permutation of any axis
//! follows from its structure: a product permutes each factor, a concatenation each range in
//! place. Element `m` of a tensor moves to `σ(m)`, the same rule for every tensor, so that a
//! consistent assignment leaves the network's function unchanged.

use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};

use super::slots::{SlotId, Slots};
use super::structure::{CompId, Def, Structure};
use crate::onnx::TensorData;

/// Permutations of leaf components. `perm[i]` is where unit `i` goes.
#[derive(Clone, Debug, Default)]
pub struct Assignment {
    /// One permutation per leaf (uniform over blocks).
    pub uniform: HashMap<CompId, Vec<usize>>,
    /// For blocked leaves: one permutation per block, indexed by the block's original index.
    pub per_block: HashMap<CompId, Vec<Vec<usize>>>,
}

impl Assignment {
    pub fn is_empty(&self) -> bool {
        self.uniform.is_empty() && self.per_block.is_empty()
    }
}

/// Original leaf indices of one element, read off all its axes.
type Context = Vec<(CompId, usize)>;

impl Structure {
    /// The index of each factor in `index` of their row-major product (slowest first).
    fn digits(&self, parts: &[CompId], index: usize) -> Vec<usize> {
        let mut rest = index;
        let mut digits = vec![0; parts.len()];
        for (k, &p) in parts.iter().enumerate().rev() {
            digits[k] = rest % self.comps[p].size;
            rest /= self.comps[p].size;
        }
        digits
    }

    /// The leaf indices an index of component `c` decomposes into (one path of ranges).
    pub fn collect_leaves(&self, c: CompId, index: usize, ctx: &mut Vec<(CompId, usize)>) {
        self.collect(c, index, ctx)
    }

    fn collect(&self, c: CompId, index: usize, ctx: &mut Context) {
        match &self.comps[c].def {
            Def::Leaf => ctx.push((c, index)),
            Def::Factor(parts) => {
                for (&p, d) in parts.iter().zip(self.digits(parts, index)) {
                    self.collect(p, d, ctx);
                }
            }
            Def::Concat(pieces) => {
                if let Some(&(o, _, p)) =
                    pieces.iter().find(|(o, s, _)| index >= *o && index < o + s)
                {
                    self.collect(p, index - o, ctx);
                }
            }
        }
    }

    fn map(&self, c: CompId, index: usize, a: &Assignment, ctx: &Context) -> usize {
        let comp = &self.comps[c];
        if comp.is_fixed() {
            return index;
        }
        match &comp.def {
            Def::Leaf => {
                if let Some(j) = comp.block_of {
                    let block = ctx.iter().find(|(k, _)| *k == j).map(|x| x.1);
                    if let (Some(perms), Some(b)) = (a.per_block.get(&c), block) {
                        return perms[b][index];
                    }
                    return index;
                }
                a.uniform.get(&c).map_or(index, |p| p[index])
            }
            Def::Factor(parts) => parts
                .iter()
                .zip(self.digits(parts, index))
                .fold(0, |acc, (&p, d)| {
                    acc * self.comps[p].size + self.map(p, d, a, ctx)
                }),
            Def::Concat(pieces) => pieces
                .iter()
                .find(|(o, s, _)| index >= *o && index < o + s)
                .map_or(index, |&(o, _, p)| o + self.map(p, index - o, a, ctx)),
        }
    }

    /// Whether any axis of the tensor moves under `a`.
    pub fn touches(&self, axes: &[Option<SlotId>], a: &Assignment) -> bool {
        axes.iter().flatten().any(|&s| {
            self.leaf_paths(self.comp_of[s], 4096)
                .unwrap_or_default()
                .iter()
                .flatten()
                .any(|c| a.uniform.contains_key(c) || a.per_block.contains_key(c))
        })
    }

    /// The tensor with its elements moved by the assignment.
    pub fn permute(&self, axes: &[Option<SlotId>], t: &TensorData, a: &Assignment) -> TensorData {
        fn go<T: Clone>(
            st: &Structure,
            axes: &[Option<SlotId>],
            x: &ArrayD<T>,
            a: &Assignment,
        ) -> ArrayD<T> {
            let shape = x.shape().to_vec();
            let mut out = x.clone();
            let mut ctx = Context::new();
            let mut target = vec![0usize; shape.len()];
            for (idx, v) in x.indexed_iter() {
                ctx.clear();
                for (k, s) in axes.iter().enumerate() {
                    if let Some(s) = s {
                        st.collect(st.comp_of[*s], idx[k], &mut ctx);
                    }
                }
                for (k, s) in axes.iter().enumerate() {
                    target[k] = match s {
                        Some(s) => st.map(st.comp_of[*s], idx[k], a, &ctx),
                        None => idx[k],
                    };
                }
                out[IxDyn(&target)] = v.clone();
            }
            out
        }
        match t {
            TensorData::F32(x) => TensorData::F32(go(self, axes, x, a)),
            TensorData::F64(x) => TensorData::F64(go(self, axes, x, a)),
            TensorData::F16(x) => TensorData::F16(go(self, axes, x, a)),
            TensorData::BF16(x) => TensorData::BF16(go(self, axes, x, a)),
            other => other.clone(),
        }
    }
}

/// A random assignment: every free leaf in `leaves` gets a uniform permutation, every blocked
/// leaf one per block, and every block component its own permutation.
pub fn random_assignment(
    st: &Structure,
    leaves: &[(CompId, Option<CompId>)],
    seed: u64,
) -> Assignment {
    let mut rng = SplitMix(seed);
    let mut a = Assignment::default();
    for &(leaf, block) in leaves {
        let n = st.comps[leaf].size;
        match block {
            None => {
                a.uniform.insert(leaf, rng.permutation(n));
            }
            Some(j) => {
                let perms = (0..st.comps[j].size).map(|_| rng.permutation(n)).collect();
                a.per_block.insert(leaf, perms);
                if !st.comps[j].is_fixed() && !a.uniform.contains_key(&j) {
                    a.uniform.insert(j, rng.permutation(st.comps[j].size));
                }
            }
        }
    }
    a
}

/// SplitMix64, written out because its output is fixed forever: `rand`'s `StdRng` may change
/// its stream between versions, and a seed must give the same permutations (and so the same
/// merged bytes) on every build.
pub(crate) struct SplitMix(pub(crate) u64);

impl SplitMix {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform draw in (0, 1), 53 bits: never 0, so a logarithm of it is finite (tests draw
    /// their random matrices from it).
    #[cfg(test)]
    pub(crate) fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Fisher–Yates shuffle in place.
    pub(crate) fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }

    /// Fisher–Yates, never the identity when n > 1 (so every check really moves units).
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        loop {
            for i in (1..n).rev() {
                let j = (self.next() % (i as u64 + 1)) as usize;
                p.swap(i, j);
            }
            if n < 2 || p.iter().enumerate().any(|(i, &v)| i != v) {
                return p;
            }
        }
    }
}

/// Slots of a tensor, for callers holding the slot table.
pub fn tensor_axes<'a>(slots: &'a Slots, name: &str) -> Option<&'a [Option<SlotId>]> {
    slots.of(name)
}
