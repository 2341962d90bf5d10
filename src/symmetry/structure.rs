//! From slots and relations to *components*: sets of axes that share one unit permutation, each
//! either a leaf (permuted directly), the row-major product of finer components, or the
//! concatenation of ranges that are components themselves.
//!
//! Relations can disagree (an axis reshaped two different ways, two slices cutting it at
//! different points into kept ranges). Agreeing relations are merged; disagreeing ones fix the
//! axis. Fixedness flows from a whole to its parts: a whole that may not move cannot have moving
//! factors or ranges.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::slots::{SlotId, SlotKind, Slots};

pub type CompId = usize;

/// How a component is built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Def {
    Leaf,
    /// Row-major product, slowest first.
    Factor(Vec<CompId>),
    /// `(offset, size, component)` ranges laid end to end.
    Concat(Vec<(usize, usize, CompId)>),
}

#[derive(Clone, Debug)]
pub struct Comp {
    pub size: usize,
    pub slots: Vec<SlotId>,
    /// Why it may not move (empty when free).
    pub fixed: Vec<String>,
    pub def: Def,
    /// For a free leaf: the component whose index chooses this leaf's permutation (attention
    /// head for a head dimension, GroupNorm group for a channel within the group).
    pub block_of: Option<CompId>,
}

impl Comp {
    pub fn is_fixed(&self) -> bool {
        !self.fixed.is_empty()
    }
}

pub struct Structure {
    pub comps: Vec<Comp>,
    /// Slot → component.
    pub comp_of: Vec<CompId>,
}

/// Resolves relations into components. `slots` is mutated (unions of agreeing relations).
pub fn resolve(slots: &mut Slots) -> Structure {
    let mut conflicts: Vec<(SlotId, String)> = Vec::new();
    // Merge agreeing decompositions until nothing changes.
    for _ in 0..64 {
        let mut changed = false;
        // Factors: the same whole split the same way means the same parts.
        let mut by_whole: BTreeMap<SlotId, Vec<Vec<SlotId>>> = BTreeMap::new();
        for (w, parts) in &slots.factors {
            by_whole
                .entry(slots.find(*w))
                .or_default()
                .push(parts.clone());
        }
        for (w, splits) in &by_whole {
            let first = &splits[0];
            for other in &splits[1..] {
                let sizes = |p: &Vec<SlotId>| p.iter().map(|&s| slots.size(s)).collect::<Vec<_>>();
                if sizes(first) == sizes(other) {
                    for (a, b) in first.iter().zip(other) {
                        if slots.find(*a) != slots.find(*b) {
                            slots.equal(*a, *b, "same split");
                            changed = true;
                        }
                    }
                } else {
                    // Every factor of every reading must stay: fixing only the whole would
                    // leave the factors of the readings not kept as its definition free.
                    let reason = "axis is reshaped in incompatible ways";
                    conflicts.push((*w, reason.into()));
                    for p in splits.iter().flatten() {
                        conflicts.push((*p, format!("factor of an {reason}")));
                    }
                }
            }
        }
        // Concats: refine every cut of a whole; pieces over the same range are the same.
        let mut cuts: BTreeMap<SlotId, Vec<(usize, usize, SlotId)>> = BTreeMap::new();
        for (w, pieces) in &slots.concats {
            let e = cuts.entry(slots.find(*w)).or_default();
            e.extend(pieces.iter().map(|p| (p.offset, p.size, p.slot)));
        }
        for (w, pieces) in &cuts {
            let mut by_range: BTreeMap<(usize, usize), SlotId> = BTreeMap::new();
            let bounds: BTreeSet<usize> = pieces.iter().flat_map(|p| [p.0, p.0 + p.1]).collect();
            for &(off, size, s) in pieces {
                let spans = interior_cuts(&bounds, off, size);
                if spans > 0 {
                    // A dropped slice range may span kept ones; a kept range may not.
                    if slots.slots[s].kind != SlotKind::Fresh {
                        conflicts.push((*w, "axis is cut in incompatible ranges".into()));
                        for p in pieces {
                            conflicts
                                .push((p.2, "range of an axis cut in incompatible ways".into()));
                        }
                    }
                    continue;
                }
                match by_range.get(&(off, size)) {
                    Some(&t) if slots.find(t) != slots.find(s) => {
                        slots.equal(t, s, "same range");
                        changed = true;
                    }
                    Some(_) => {}
                    None => {
                        by_range.insert((off, size), s);
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }

    // Dense component ids.
    let roots: Vec<SlotId> = (0..slots.len()).map(|s| slots.find(s)).collect();
    let mut index: HashMap<SlotId, CompId> = HashMap::new();
    let mut comps: Vec<Comp> = Vec::new();
    let mut comp_of = vec![0; slots.len()];
    for (s, &r) in roots.iter().enumerate() {
        let id = *index.entry(r).or_insert_with(|| {
            comps.push(Comp {
                size: slots.size(r),
                slots: vec![],
                fixed: vec![],
                def: Def::Leaf,
                block_of: None,
            });
            comps.len() - 1
        });
        comps[id].slots.push(s);
        comp_of[s] = id;
    }
    let c = |s: SlotId| comp_of[s];

    // Definitions: every reading of each component.
    let mut defs: BTreeMap<CompId, Vec<Def>> = BTreeMap::new();
    for (w, parts) in &slots.factors {
        let def = Def::Factor(parts.iter().map(|&p| c(p)).collect());
        defs.entry(c(*w)).or_default().push(def);
    }
    let mut ranges: BTreeMap<CompId, BTreeMap<(usize, usize), CompId>> = BTreeMap::new();
    for (w, pieces) in &slots.concats {
        for p in pieces {
            let e = ranges.entry(c(*w)).or_default();
            e.entry((p.offset, p.size)).or_insert(c(p.slot));
        }
    }
    for (whole, by_range) in ranges {
        // Keep the finest ranges (those containing no cut).
        let bounds: BTreeSet<usize> = by_range.keys().flat_map(|&(o, s)| [o, o + s]).collect();
        let pieces: Vec<(usize, usize, CompId)> = by_range
            .iter()
            .filter(|((o, s), _)| interior_cuts(&bounds, *o, *s) == 0)
            .map(|(&(o, s), &comp)| (o, s, comp))
            .collect();
        let covered: usize = pieces.iter().map(|p| p.1).sum();
        if covered != comps[whole].size {
            let reason = "ranges of a cut axis are not all accounted for";
            comps[whole].fixed.push(reason.into());
        }
        defs.entry(whole).or_default().push(Def::Concat(pieces));
    }
    for (comp, readings) in defs {
        if readings.iter().all(|d| *d == readings[0]) {
            comps[comp].def = readings[0].clone();
        } else {
            let reason = "axis is both split and cut, or split two ways";
            comps[comp].fixed.push(reason.into());
            for p in readings.iter().flat_map(parts) {
                comps[p].fixed.push(format!("part of an {reason}"));
            }
        }
    }

    // Fixed: rules' reasons and conflicts.
    for (s, reason) in &slots.fixed {
        comps[c(*s)].fixed.push(reason.clone());
    }
    for (s, reason) in conflicts {
        comps[c(s)].fixed.push(reason);
    }
    fix_cycles(&mut comps);
    fix_without_activations(&mut comps, slots, &comp_of);
    propagate_fixed(&mut comps);
    for comp in &mut comps {
        comp.fixed.sort();
        comp.fixed.dedup();
    }
    let mut st = Structure { comps, comp_of };
    assign_blocks(&mut st, slots);
    st
}

/// How many cut points fall strictly inside the range `offset..offset + size`.
fn interior_cuts(bounds: &BTreeSet<usize>, offset: usize, size: usize) -> usize {
    if size < 2 {
        return 0;
    }
    bounds.range(offset + 1..offset + size).count()
}

fn parts(def: &Def) -> Vec<CompId> {
    match def {
        Def::Leaf => vec![],
        Def::Factor(p) => p.clone(),
        Def::Concat(p) => p.iter().map(|x| x.2).collect(),
    }
}

/// A component that (transitively) contains itself cannot be permuted consistently.
fn fix_cycles(comps: &mut [Comp]) {
    for start in 0..comps.len() {
        let mut stack = parts(&comps[start].def);
        let mut seen = BTreeSet::new();
        while let Some(c) = stack.pop() {
            if c == start {
                comps[start]
                    .fixed
                    .push("axis contains itself through reshapes".into());
                comps[start].def = Def::Leaf;
                break;
            }
            if seen.insert(c) {
                stack.extend(parts(&comps[c].def));
            }
        }
    }
}

/// Units that no activation carries (kernel taps, a weight feeding only an unknown path) are
/// not units of the network's computation: leave them in place.
fn fix_without_activations(comps: &mut [Comp], slots: &Slots, comp_of: &[CompId]) {
    let mut carried = vec![false; comps.len()];
    for (s, slot) in slots.slots.iter().enumerate() {
        if slot.kind == SlotKind::Activation {
            carried[comp_of[s]] = true;
        }
    }
    // A part of a carried whole is carried.
    loop {
        let mut changed = false;
        for w in 0..comps.len() {
            if carried[w] {
                for p in parts(&comps[w].def) {
                    if !carried[p] {
                        carried[p] = true;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for (c, comp) in comps.iter_mut().enumerate() {
        if !carried[c] {
            comp.fixed.push("no activation carries this axis".into());
        }
    }
}

fn propagate_fixed(comps: &mut [Comp]) {
    loop {
        let mut changed = false;
        for w in 0..comps.len() {
            if comps[w].is_fixed() {
                for p in parts(&comps[w].def) {
                    if !comps[p].is_fixed() {
                        let reason = "part of an axis that is fixed".to_string();
                        comps[p].fixed.push(reason);
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
}

impl Structure {
    /// The leaves along every way of reading an index of component `c` (one path per choice
    /// of concatenated range), capped at `limit` paths.
    pub fn leaf_paths(&self, c: CompId, limit: usize) -> Option<Vec<Vec<CompId>>> {
        match &self.comps[c].def {
            Def::Leaf => Some(vec![vec![c]]),
            Def::Factor(parts) => self.product_paths(parts.iter().copied(), limit),
            Def::Concat(pieces) => {
                let mut out = Vec::new();
                for &(_, _, p) in pieces {
                    out.extend(self.leaf_paths(p, limit)?);
                    if out.len() > limit {
                        return None;
                    }
                }
                Some(out)
            }
        }
    }

    /// Leaf paths of a whole tensor (all its axes).
    pub fn tensor_paths(&self, axes: &[Option<SlotId>], limit: usize) -> Option<Vec<Vec<CompId>>> {
        self.product_paths(axes.iter().flatten().map(|&s| self.comp_of[s]), limit)
    }

    /// Paths of a row-major product: every path of the first part followed by every path of
    /// the next, and so on.
    fn product_paths(
        &self,
        parts: impl Iterator<Item = CompId>,
        limit: usize,
    ) -> Option<Vec<Vec<CompId>>> {
        let mut acc: Vec<Vec<CompId>> = vec![vec![]];
        for p in parts {
            let sub = self.leaf_paths(p, limit)?;
            let mut next = Vec::new();
            for a in &acc {
                for b in &sub {
                    next.push(a.iter().chain(b).copied().collect());
                    if next.len() > limit {
                        return None;
                    }
                }
            }
            acc = next;
        }
        Some(acc)
    }
}

/// A free leaf M may take a different permutation in each block of J (each attention head,
/// each GroupNorm group) when J precedes M in a split and every tensor that holds M also holds
/// J, once, wherever M is read: then the block index is always at hand.
fn assign_blocks(st: &mut Structure, slots: &Slots) {
    const LIMIT: usize = 4096;
    let mut candidates: BTreeMap<CompId, BTreeSet<CompId>> = BTreeMap::new();
    for comp in &st.comps {
        if let Def::Factor(parts) = &comp.def {
            for w in parts.windows(2) {
                candidates.entry(w[1]).or_default().insert(w[0]);
            }
        }
    }
    let paths: Vec<Vec<Vec<CompId>>> = slots
        .tensors()
        .map(|(_, axes)| st.tensor_paths(axes, LIMIT).unwrap_or_default())
        .collect();
    let too_many = slots
        .tensors()
        .any(|(_, axes)| st.tensor_paths(axes, LIMIT).is_none());
    for (m, js) in candidates {
        if st.comps[m].is_fixed() || st.comps[m].def != Def::Leaf || js.len() != 1 || too_many {
            continue;
        }
        let j = *js.iter().next().unwrap_or(&m);
        if j == m {
            continue;
        }
        let ok = paths.iter().flatten().all(|path| {
            let count = |x: CompId| path.iter().filter(|&&c| c == x).count();
            count(m) == 0 || (count(m) == 1 && count(j) == 1)
        });
        if ok {
            st.comps[m].block_of = Some(j);
        }
    }
}
