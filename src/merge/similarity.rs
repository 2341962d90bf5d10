//! Weight-space similarity of a group's units, cached across the iterative loop's sweeps.
//!
//! A group's weight vectors read its member tensors with every *other* axis mapped by the
//! neighbours' current matchings, so they change only when one of those matchings changes.
//! Late in the loop most matchings are settled: recomputing only the groups whose neighbours
//! moved makes a sweep cost what changed (on a ResNet most groups are recomputed in the first
//! sweeps and few after).

use std::collections::HashMap;

use ndarray::Array2;

use super::units::{Layout, Matchings, Unmerge};
use super::weights::{unit_vectors, Weights};
use crate::symmetry::slots::Slots;
use crate::symmetry::Group;

/// Cached similarities beyond this many bytes are recomputed instead of kept (a ViT-B's
/// twelve 6,144-unit MLP groups would hold 3.6 GB of f64 matrices).
const CACHE_BYTES: usize = 1 << 30;

/// Per group: the neighbour matchings it was computed under, and the similarity.
type Entry = (Vec<Option<Unmerge>>, Option<Array2<f64>>);

pub struct WeightSimilarity<'a> {
    layout: &'a Layout<'a>,
    slots: &'a Slots,
    weights: &'a Weights,
    /// Per group, the matchings its weight vectors depend on.
    deps: HashMap<usize, Vec<(usize, bool)>>,
    cache: HashMap<usize, Entry>,
    bytes: usize,
    /// How many similarities were computed and how many came from the cache.
    pub computed: usize,
    pub reused: usize,
}

impl<'a> WeightSimilarity<'a> {
    pub fn new(
        groups: &[Group],
        layout: &'a Layout<'a>,
        slots: &'a Slots,
        weights: &'a Weights,
    ) -> WeightSimilarity<'a> {
        let deps = groups
            .iter()
            .map(|g| {
                let mut d = Vec::new();
                for member in &g.members {
                    let Some(axes) = slots.of(&member.tensor) else {
                        continue;
                    };
                    for (a, s) in axes.iter().enumerate() {
                        if let (true, Some(s)) = (a != member.axis, s) {
                            layout.map_deps(layout.st.comp_of[*s], &mut d);
                        }
                    }
                }
                d.sort_unstable();
                d.dedup();
                (g.id, d)
            })
            .collect();
        WeightSimilarity {
            layout,
            slots,
            weights,
            deps,
            cache: HashMap::new(),
            bytes: 0,
            computed: 0,
            reused: 0,
        }
    }

    /// Pearson correlation of group `g`'s unit weight vectors (all models stacked) under the
    /// matchings `m`; `None` where the group has no usable weight vectors.
    pub fn get(&mut self, g: &Group, m: &Matchings) -> Option<Array2<f64>> {
        let state: Vec<Option<Unmerge>> = self
            .deps
            .get(&g.id)
            .map(|d| {
                d.iter()
                    .map(|&(dep, block)| {
                        let table = if block { &m.blocks } else { &m.p };
                        table.get(&dep).cloned()
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some((seen, sim)) = self.cache.get(&g.id) {
            if *seen == state {
                self.reused += 1;
                return sim.clone();
            }
        }
        self.computed += 1;
        let sim = unit_vectors(g, self.layout, self.slots, self.weights, m)
            .map(|z| crate::stats::row_correlation_f32(z.view()));
        let size = sim.as_ref().map_or(0, |s| s.len() * 8);
        if let Some((_, old)) = self.cache.remove(&g.id) {
            self.bytes -= old.map_or(0, |s| s.len() * 8);
        }
        if self.bytes + size <= CACHE_BYTES {
            self.bytes += size;
            self.cache.insert(g.id, (state, sim.clone()));
        }
        sim
    }
}
