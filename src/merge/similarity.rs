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
use crate::symmetry::{Group, Member};

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

/// Per member of a group, in member order: `Ok(k)`, its block in the cache; `Err(i)`, the
/// `i`-th of the blocks computed and not kept (`Placed`'s second part; in `to_read`'s slots,
/// the `i`-th member to read).
type Order = Vec<Result<usize, usize>>;

/// A group's `Order` and the blocks computed and not kept.
type Placed = (Order, Vec<RowBlock>);

/// A member's vectors read into a buffer of their own: `[units, features]` and the buffer.
type Vectors = ((usize, usize), Vec<f64>);

/// A member's block once read: updated from the cache's stale one, or new.
enum Built {
    Updated {
        block: RowBlock,
        /// Its bytes before the update.
        before: usize,
        /// Columns re-correlated.
        changed: usize,
    },
    New(RowBlock),
}

impl Built {
    /// Member vectors `z` as a block: the cache's stale one updated by the columns that
    /// changed (a neighbour moved), or a new one, `updatable` where the cache may keep it.
    fn read(
        z: ArrayView2<f64>,
        stale: Option<RowBlock>,
        updatable: bool,
        models: usize,
        spare: &mut Vec<f32>,
    ) -> Built {
        match stale {
            Some(mut block) => {
                let before = block.bytes();
                let changed = block.update_reusing(z, spare);
                Built::Updated {
                    block,
                    before,
                    changed,
                }
            }
            None if updatable => Built::New(RowBlock::updatable(z, models)),
            None => Built::New(RowBlock::new(z, models)),
        }
    }
}

/// Bytes of member vectors one wave of `read_side_by_side` may hold: a ViT-B stream group's
/// members hold every block's weights, 1.4 GB of f64 vectors for a pair.
const WAVE_BYTES: usize = 256 << 20;

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
    /// Members read side by side on this many cores (`stats::spread_cores`), or in turn.
    spread: Option<usize>,
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
            spread: crate::stats::spread_cores(),
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

    /// The same with members read side by side on `cores`, or in turn (`None`).
    #[cfg(test)]
    pub fn with_spread(self, cores: Option<usize>) -> WeightSimilarity<'a> {
        WeightSimilarity {
            spread: cores,
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
        let (order, fresh) = match self.spread {
            Some(cores) => self.read_side_by_side(g, m, cores)?,
            None => self.read_in_turn(g, m)?,
        };
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

    /// The members' blocks, read one after the other into one reused buffer; `None` at the
    /// first member without vectors (the blocks before it stay as they were updated).
    fn read_in_turn(&mut self, g: &Group, m: &Matchings) -> Option<Placed> {
        let (slots, todo) = self.to_read(g, m);
        let (mut placed, mut fresh) = (Vec::with_capacity(todo.len()), Vec::new());
        for (k, state) in todo {
            let Some(dims) = member_vectors(
                g,
                &g.members[k],
                self.layout,
                self.slots,
                self.weights,
                self.folded,
                m,
                &mut self.scratch,
            ) else {
                break;
            };
            let Ok(z) = ArrayView2::from_shape(dims, &self.scratch[..dims.0 * dims.1]) else {
                break;
            };
            let stale = self.cache.remove(&(g.id, k)).map(|(_, b)| b);
            let updatable = self.keeps(dims, m.models);
            let built = Built::read(z, stale, updatable, m.models, &mut self.spare);
            placed.push(self.place((g.id, k), state, dims, built, m.models, &mut fresh));
        }
        Some((self.order(slots, &placed)?, fresh))
    }

    /// `read_in_turn` with the members that need reading read side by side on `cores`: on
    /// sixteen cores the loop's reads (the scatter into unit rows, the centring, the column
    /// hashes) ran on one while the threaded GEMM had little to spread (ResNet-50 matching
    /// 33 s there against 28 s on two). Each block gets the same arithmetic and the cache
    /// the same decisions in member order, so the answer and the cache are bit for bit
    /// `read_in_turn`'s (tested). Members are read in waves of at most `cores` and
    /// `WAVE_BYTES` of vectors, all of a wave's vectors before any of its blocks changes: a
    /// member without vectors ends the read where `read_in_turn` ends it.
    fn read_side_by_side(&mut self, g: &Group, m: &Matchings, cores: usize) -> Option<Placed> {
        use rayon::prelude::*;
        let (slots, todo) = self.to_read(g, m);
        let (mut placed, mut fresh) = (Vec::with_capacity(todo.len()), Vec::new());
        let mut todo = todo.into_iter().peekable();
        let mut failed = false;
        while !failed && todo.peek().is_some() {
            let mut wave = Vec::new();
            let mut bytes = 0;
            while let Some((k, _)) = todo.peek() {
                let b = self.vector_bytes(&g.members[*k], m.models);
                if !wave.is_empty() && (wave.len() == cores || bytes + b > WAVE_BYTES) {
                    break;
                }
                bytes += b;
                wave.extend(todo.next());
            }
            let vectors: Vec<Option<Vectors>> = wave
                .par_iter()
                .map(|(k, _)| {
                    let mut z = Vec::new();
                    let dims = member_vectors(
                        g,
                        &g.members[*k],
                        self.layout,
                        self.slots,
                        self.weights,
                        self.folded,
                        m,
                        &mut z,
                    )?;
                    (dims.0 * dims.1 <= z.len()).then_some((dims, z))
                })
                .collect();
            failed = vectors.iter().any(Option::is_none);
            let jobs: Vec<_> = wave
                .into_iter()
                .zip(vectors.into_iter().map_while(|v| v))
                .map(|((k, state), (dims, z))| {
                    let stale = self.cache.remove(&(g.id, k)).map(|(_, b)| b);
                    (k, state, dims, z, stale)
                })
                .collect();
            let built: Vec<_> = jobs
                .into_par_iter()
                .map(|(k, state, dims, z, stale)| {
                    let z = ArrayView2::from_shape(dims, &z[..dims.0 * dims.1])
                        .expect("member_vectors sized the rows");
                    // Kept or not is decided in member order (`place`).
                    let updatable = dims.1 >= MIN_CACHED_FEATURES;
                    let built = Built::read(z, stale, updatable, m.models, &mut Vec::new());
                    (k, state, dims, built)
                })
                .collect();
            for (k, state, dims, built) in built {
                placed.push(self.place((g.id, k), state, dims, built, m.models, &mut fresh));
            }
        }
        Some((self.order(slots, &placed)?, fresh))
    }

    /// In member order, `Ok(k)` for a member whose cached block is current and `Err(j)` for
    /// the `j`-th member to read; and the members to read, with the matchings they read.
    fn to_read(&self, g: &Group, m: &Matchings) -> (Order, Vec<(usize, State)>) {
        let (mut slots, mut todo) = (Vec::new(), Vec::new());
        for (k, member) in g.members.iter().enumerate() {
            if self.folded.left_out.contains(&member.tensor) {
                continue;
            }
            let state = self.state(g.id, k, m);
            if matches!(self.cache.get(&(g.id, k)), Some((seen, _)) if *seen == state) {
                slots.push(Ok(k));
            } else {
                slots.push(Err(todo.len()));
                todo.push((k, state));
            }
        }
        (slots, todo)
    }

    /// `get_upper`'s member order from `to_read`'s slots and where each member read went
    /// (`placed`, up to the first without vectors): `None` at that member, the cached
    /// blocks before it counted as reused.
    fn order(&mut self, slots: Order, placed: &[Result<usize, usize>]) -> Option<Order> {
        let mut order = Vec::with_capacity(slots.len());
        for slot in slots {
            match slot {
                Ok(k) => {
                    self.counts.reused += 1;
                    order.push(Ok(k));
                }
                Err(j) => order.push(*placed.get(j)?),
            }
        }
        Some(order)
    }

    /// Whether a new block of `dims` is kept in the cache (and so built updatable): wide
    /// enough to be worth it, and within the capacity.
    fn keeps(&self, dims: (usize, usize), models: usize) -> bool {
        dims.1 >= MIN_CACHED_FEATURES
            && self.bytes + RowBlock::updatable_bytes(dims, models) <= self.capacity
    }

    /// Member `k`'s block, once read, into the cache or `fresh`, with what it cost in
    /// `counts`: where `order` finds it.
    fn place(
        &mut self,
        (group, k): (usize, usize),
        state: State,
        dims: (usize, usize),
        built: Built,
        models: usize,
        fresh: &mut Vec<RowBlock>,
    ) -> Result<usize, usize> {
        self.counts.columns_read += dims.1;
        match built {
            Built::Updated {
                block,
                before,
                changed,
            } => {
                self.counts.columns_correlated += changed;
                self.counts.updated += 1;
                self.bytes = self.bytes + block.bytes() - before;
                self.cache.insert((group, k), (state, block));
                Ok(k)
            }
            Built::New(block) => {
                self.counts.computed += 1;
                self.counts.columns_correlated += dims.1;
                if self.keeps(dims, models) {
                    self.bytes += block.bytes();
                    self.cache.insert((group, k), (state, block));
                    Ok(k)
                } else {
                    fresh.push(block.without_columns());
                    Err(fresh.len() - 1)
                }
            }
        }
    }

    /// An upper bound of the bytes of member vectors (f64, every model) a member reads.
    fn vector_bytes(&self, member: &Member, models: usize) -> usize {
        self.folded
            .get(self.weights, 0, &member.tensor)
            .map_or(0, |w| w.shape().iter().product::<usize>() * models * 8)
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

    /// The BN-folded ResNet-20 pair, prepared for matching.
    fn resnet20() -> crate::merge::Prepared {
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
        prepare(&models, &calib, &MergeOptions::default(), &mut Timer::new()).expect("prepare")
    }

    /// A weight similarity of `prep`'s groups, its cache empty.
    fn similarity<'a>(
        prep: &'a crate::merge::Prepared,
        layout: &'a Layout<'a>,
    ) -> WeightSimilarity<'a> {
        WeightSimilarity::new(
            &prep.disc.groups,
            layout,
            &prep.disc.slots,
            &prep.weights,
            &prep.folded,
        )
    }

    /// Two matchings of every group: model 0 identity, model 1 a permutation; then some
    /// groups' model-1 units swapped in pairs and others only renumbered.
    fn two_states(groups: &[Group]) -> (Matchings, Matchings) {
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
        (m, moved)
    }

    /// The cache's answers (reused, updated by changed columns, rebuilt) equal a fresh
    /// computation under matchings that moved some units and renumbered others.
    #[test]
    fn cached_similarities_equal_fresh_ones() {
        let prep = resnet20();
        let groups = &prep.disc.groups;
        let layout = Layout::new(&prep.disc.structure, groups);
        let (m, moved) = two_states(groups);
        let mut cached = similarity(&prep, &layout);
        for g in groups {
            cached.get(g, &m);
        }
        let mut compared = 0;
        for g in groups {
            let again = cached.get(g, &moved);
            let fresh = similarity(&prep, &layout).get(g, &moved);
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

    /// Members read side by side give the similarities of members read in turn, bit for
    /// bit, and leave the cache in the same state (the same counts), through new, reused
    /// and updated blocks, a cache too small for all of them, and waves cut by the cores.
    #[test]
    fn members_read_side_by_side_equal_members_read_in_turn() {
        let prep = resnet20();
        let groups = &prep.disc.groups;
        let layout = Layout::new(&prep.disc.structure, groups);
        let (m, moved) = two_states(groups);
        let run = |spread: Option<usize>| {
            let mut w = similarity(&prep, &layout)
                .with_capacity(200 << 10)
                .with_spread(spread);
            let mut out = Vec::new();
            for state in [&m, &moved, &m, &moved] {
                for g in groups {
                    out.push(w.get_upper(g, state).map(|s| s.mapv(f64::to_bits)));
                }
            }
            (out, w.counts, w.bytes)
        };
        let (one, counts, bytes) = run(None);
        for cores in [2, 3] {
            let (side, c, b) = run(Some(cores));
            assert!(one == side, "similarities differ on {cores} cores");
            assert_eq!(format!("{counts:?}"), format!("{c:?}"), "{cores} cores");
            assert_eq!(bytes, b, "{cores} cores");
        }
        // Every path of the cache was taken, and some blocks did not fit.
        assert!(
            counts.reused > 0 && counts.updated > 0 && counts.computed > 0,
            "{counts:?}"
        );
        assert!(
            bytes > 0 && counts.computed > groups.len(),
            "{counts:?}, {bytes} bytes"
        );
    }
}
