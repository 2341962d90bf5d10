//! Weight-space similarity of a group's units, cached member by member across the iterative
//! loop's sweeps.
//!
//! A group's weight vectors are its member tensors side by side, each read with its *other*
//! axes mapped by the neighbours' current matchings (§2). Their correlation is a sum over
//! members (`stats::RowBlock`), and a member's block changes only when a matching it reads
//! changes. A residual stream has a member in every block it passes through, and some block's
//! matching moves in almost every sweep: caching whole groups recomputed the stream's every
//! member each time, caching members recomputes the one or two that moved.

use std::collections::HashMap;

use ndarray::{Array2, ArrayView2};

use super::bn_fold::Folded;
use super::units::{Layout, Matchings, Unmerge};
use super::weights::{member_vectors, Weights};
use crate::stats::{mirror_upper, row_correlation_upper_of_blocks, RowBlock};
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

/// Cached blocks beyond this many bytes are recomputed instead of kept. On the ResNet-50 pair
/// (11 sweeps from a 256-image shard, Grams kept by model pair) 1 GiB holds every member and
/// re-correlates 53 % of the columns read (matching 27.0 s, peak 2.04 GB), 512 MiB 70 %
/// (29.2 s, 1.80 GB): below calibration's own peak of a full merge either way.
pub const CACHE_BYTES: usize = 1 << 30;

/// A member with fewer features per unit than this is recomputed rather than cached: its
/// Gram costs little more than adding a cached one (biases, norm parameters, a 10-class head).
const MIN_CACHED_FEATURES: usize = 16;

/// What the cache saved: member blocks computed whole, updated by the columns that changed,
/// and taken unchanged; columns re-correlated, of the columns read.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub computed: usize,
    pub updated: usize,
    pub reused: usize,
    pub columns_correlated: usize,
    pub columns_read: usize,
    /// Matchings of the iterative loop not recomputed: what they read
    /// (`WeightSimilarity::inputs`) was what an earlier matching of theirs had read.
    pub matchings_kept: usize,
}

/// The matchings a member's block was computed under (the ones it reads), up to the
/// numbering of merged units (`Unmerge::canonical`).
type State = Vec<Option<Unmerge>>;

pub struct WeightSimilarity<'a> {
    layout: &'a Layout<'a>,
    slots: &'a Slots,
    weights: &'a Weights,
    /// BatchNorm-kept layers as if folded (`bn_fold`).
    folded: &'a Folded,
    /// Per group, per member: the matchings that member's vectors read.
    deps: HashMap<usize, Vec<Vec<(usize, bool)>>>,
    cache: HashMap<(usize, usize), (State, RowBlock)>,
    bytes: usize,
    /// What the cache may hold: `CACHE_BYTES`, less under a tight `--max-memory`.
    capacity: usize,
    /// The member vectors being read, reused from member to member: a ResNet-18's widest
    /// member is 38 MB of f64, and a fresh buffer per read cost its page faults every time.
    scratch: Vec<f64>,
    /// Centred f32 columns a block gave up at its last update, for the next (`RowBlock`).
    spare: Vec<f32>,
    pub counts: Counts,
}

impl<'a> WeightSimilarity<'a> {
    pub fn new(
        groups: &[Group],
        layout: &'a Layout<'a>,
        slots: &'a Slots,
        weights: &'a Weights,
        folded: &'a Folded,
    ) -> WeightSimilarity<'a> {
        let deps = groups
            .iter()
            .map(|g| {
                let per_member = g
                    .members
                    .iter()
                    .map(|member| {
                        let mut d = Vec::new();
                        for (a, s) in slots.of(&member.tensor).unwrap_or(&[]).iter().enumerate() {
                            if let (true, Some(s)) = (a != member.axis, s) {
                                layout.map_deps(layout.st.comp_of[*s], &mut d);
                            }
                        }
                        d.sort_unstable();
                        d.dedup();
                        d
                    })
                    .collect();
                (g.id, per_member)
            })
            .collect();
        WeightSimilarity {
            layout,
            slots,
            weights,
            folded,
            deps,
            cache: HashMap::new(),
            bytes: 0,
            capacity: CACHE_BYTES,
            scratch: Vec::new(),
            spare: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// The same with a cache of at most `bytes`.
    pub fn with_capacity(self, bytes: usize) -> WeightSimilarity<'a> {
        WeightSimilarity {
            capacity: bytes.min(CACHE_BYTES),
            ..self
        }
    }

    /// Pearson correlation of group `g`'s unit weight vectors (all models stacked) under the
    /// matchings `m`; `None` where the group has no usable weight vectors.
    pub fn get(&mut self, g: &Group, m: &Matchings) -> Option<Array2<f64>> {
        self.get_upper(g, m).map(|mut s| {
            mirror_upper(&mut s);
            s
        })
    }

    /// `get` in its upper triangle and diagonal only (`row_correlation_upper_of_blocks`): for
    /// the loop's dual similarity, mirrored once after the blend.
    pub fn get_upper(&mut self, g: &Group, m: &Matchings) -> Option<Array2<f64>> {
        // Per member, in member order (so the sum's rounding does not depend on the cache):
        // its cached block, or its index among those computed and not kept.
        let mut fresh = Vec::new();
        let mut order: Vec<Result<usize, usize>> = Vec::new();
        for (k, member) in g.members.iter().enumerate() {
            if self.folded.left_out.contains(&member.tensor) {
                continue;
            }
            let state = self.state(g.id, k, m);
            if let Some((seen, _)) = self.cache.get(&(g.id, k)) {
                if *seen == state {
                    self.counts.reused += 1;
                    order.push(Ok(k));
                    continue;
                }
            }
            let dims = member_vectors(
                g,
                member,
                self.layout,
                self.slots,
                self.weights,
                self.folded,
                m,
                &mut self.scratch,
            )?;
            let z = ArrayView2::from_shape(dims, &self.scratch[..dims.0 * dims.1]).ok()?;
            if let Some((seen, block)) = self.cache.get_mut(&(g.id, k)) {
                // A neighbour moved: only the columns it moved change.
                let before = block.bytes();
                let changed = block.update_reusing(z.view(), &mut self.spare);
                self.counts.columns_correlated += changed;
                self.counts.columns_read += z.ncols();
                self.counts.updated += 1;
                *seen = state;
                self.bytes = self.bytes + block.bytes() - before;
                order.push(Ok(k));
                continue;
            }
            self.counts.computed += 1;
            self.counts.columns_correlated += z.ncols();
            self.counts.columns_read += z.ncols();
            let kept = RowBlock::updatable_bytes(z.dim(), m.models);
            if z.ncols() >= MIN_CACHED_FEATURES && self.bytes + kept <= self.capacity {
                let block = RowBlock::updatable(z.view(), m.models);
                self.bytes += block.bytes();
                self.cache.insert((g.id, k), (state, block));
                order.push(Ok(k));
            } else {
                order.push(Err(fresh.len()));
                fresh.push(RowBlock::new(z.view(), m.models));
            }
        }
        let blocks: Vec<&RowBlock> = order
            .iter()
            .filter_map(|source| match source {
                Ok(k) => self.cache.get(&(g.id, *k)).map(|(_, b)| b),
                Err(i) => fresh.get(*i),
            })
            .filter(|b| b.features() > 0)
            .collect();
        (!blocks.is_empty()).then(|| row_correlation_upper_of_blocks(&blocks))
    }

    /// Everything group `g`'s similarity is made of that can change during the loop: the
    /// matchings each member's vectors read. The activation correlations are fixed, so equal
    /// inputs give the same similarity, hence the same matching.
    pub fn inputs(&self, g: &Group, m: &Matchings) -> Vec<State> {
        (0..g.members.len())
            .map(|k| self.state(g.id, k, m))
            .collect()
    }

    /// The current matchings that member `k` of group `group` reads.
    fn state(&self, group: usize, k: usize, m: &Matchings) -> State {
        self.deps
            .get(&group)
            .and_then(|d| d.get(k))
            .map(|d| {
                d.iter()
                    .map(|&(dep, block)| {
                        let table = if block { &m.blocks } else { &m.p };
                        table.get(&dep).map(Unmerge::canonical)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::{prepare, MergeOptions, Timer};
    use crate::symmetry::permute::SplitMix;
    use crate::symmetry::GroupKind;

    /// The cache's answers (reused, updated by changed columns, rebuilt) equal a fresh
    /// computation under matchings that moved some units and renumbered others.
    #[test]
    fn cached_similarities_equal_fresh_ones() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let models: Vec<_> = ["a", "b"]
            .iter()
            .map(|s| {
                crate::onnx::load(root.join(format!("fixtures/models/resnet20_bn_folded_{s}.onnx")))
                    .expect("fixture")
            })
            .collect();
        let data = root.join("fixtures/data/calib.npz");
        let calib =
            crate::data::bind_inputs(&crate::data::read(&data).expect("calib"), &models[0], &data)
                .expect("bound");
        let opts = MergeOptions::default();
        let prep = prepare(&models, &calib, &opts, &mut Timer::new()).expect("prepare");
        let groups = &prep.disc.groups;
        let layout = Layout::new(&prep.disc.structure, groups);
        // Every group: model 0 identity, model 1 a permutation; then some groups' model-1
        // units swapped in pairs and others only renumbered.
        let mut rng = SplitMix(7);
        let mut m = Matchings {
            models: 2,
            ..Default::default()
        };
        let mut moved = Matchings {
            models: 2,
            ..Default::default()
        };
        for g in groups {
            let w = g.width;
            let mut perm: Vec<usize> = (0..w).collect();
            if !matches!(g.kind, GroupKind::Blocked { .. }) {
                rng.shuffle(&mut perm);
            }
            let p = Unmerge {
                target: (0..w as u32)
                    .chain(perm.iter().map(|&u| u as u32))
                    .collect(),
                merged: w,
            };
            let mut q = p.clone();
            match g.id % 3 {
                0 => {
                    for k in (0..w / 4).step_by(2) {
                        q.target.swap(w + k, w + k + 1);
                    }
                }
                1 => {
                    let relabel: Vec<u32> = (0..w as u32).rev().collect();
                    q.target.iter_mut().for_each(|t| *t = relabel[*t as usize]);
                }
                _ => {}
            }
            m.p.insert(g.id, p);
            moved.p.insert(g.id, q);
            if let GroupKind::Blocked { blocks, .. } = g.kind {
                let b = Unmerge {
                    target: (0..2 * blocks as u32).map(|k| k % blocks as u32).collect(),
                    merged: blocks,
                };
                m.blocks.insert(g.id, b.clone());
                moved.blocks.insert(g.id, b);
            }
        }
        let mut cached = WeightSimilarity::new(
            groups,
            &layout,
            &prep.disc.slots,
            &prep.weights,
            &prep.folded,
        );
        for g in groups {
            cached.get(g, &m);
        }
        let mut compared = 0;
        for g in groups {
            let again = cached.get(g, &moved);
            let fresh = WeightSimilarity::new(
                groups,
                &layout,
                &prep.disc.slots,
                &prep.weights,
                &prep.folded,
            )
            .get(g, &moved);
            match (again, fresh) {
                (Some(a), Some(f)) => {
                    let d = (&a - &f).iter().fold(0f64, |x, v| x.max(v.abs()));
                    assert!(d < 1e-5, "group {}: cached differs by {d}", g.id);
                    compared += 1;
                }
                (None, None) => {}
                _ => panic!(
                    "group {}: cached and fresh disagree on having vectors",
                    g.id
                ),
            }
        }
        let c = cached.counts;
        assert!(compared > 5, "{compared} groups compared");
        assert!(c.reused > 0 && c.updated > 0, "paths exercised: {c:?}");
        assert!(c.columns_correlated < c.columns_read, "{c:?}");
    }
}
