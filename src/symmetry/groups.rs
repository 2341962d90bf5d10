//! Unit groups, the objects matching works on, built from the resolved components: a plain
//! group is one free leaf component; a blocked group is a leaf whose permutation may differ per
//! block (head dimension per attention head, channel per GroupNorm group) together with the
//! component that orders the blocks. Blocked groups over the same block component share one
//! block permutation (Q/K and V/O of one attention layer share their head assignment).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::slots::{SlotKind, Slots};
use super::structure::{CompId, Def, Structure};
use crate::graph::Graph;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GroupKind {
    /// Any permutation of `width` units.
    Plain,
    /// `blocks × block_size` units: a permutation of blocks, then one within each block.
    /// `block_perm_shared_with` lists the groups that use the same block permutation.
    Blocked {
        blocks: usize,
        block_size: usize,
        block_perm_shared_with: Vec<usize>,
    },
}

/// One weight axis that a group's permutation rewrites.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub tensor: String,
    pub axis: usize,
    pub size: usize,
    /// How the axis is made of groups: `g3`, `g3 × 49`, `[0..64 g5 | 64..128 g6]` ...
    pub layout: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Group {
    pub id: usize,
    pub width: usize,
    #[serde(flatten)]
    pub kind: GroupKind,
    pub members: Vec<Member>,
    /// Activation values whose axis holds exactly this group's units, in graph order.
    pub taps: Vec<String>,
    /// The tap calibration reads (the input of the last weight layer that consumes the units).
    pub tap: Option<String>,
    /// The axis of `tap` that holds the units.
    pub tap_axis: Option<usize>,
    /// Internal: the leaf component and, for blocked groups, the block component.
    #[serde(skip)]
    pub leaf: CompId,
    #[serde(skip)]
    pub block: Option<CompId>,
}

/// Builds the groups: every free leaf with at least one weight axis depending on it.
pub fn build(st: &Structure, slots: &Slots, graph: &Graph) -> Vec<Group> {
    // Weight axes by the leaves they depend on.
    let mut weights_of: BTreeMap<CompId, Vec<usize>> = BTreeMap::new();
    for (s, slot) in slots.slots.iter().enumerate() {
        if slot.kind == SlotKind::Weight {
            let leaves: BTreeSet<CompId> = st
                .leaf_paths(st.comp_of[s], 4096)
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect();
            for leaf in leaves {
                weights_of.entry(leaf).or_default().push(s);
            }
        }
    }
    let is_block_of: BTreeSet<CompId> = st.comps.iter().filter_map(|c| c.block_of).collect();
    // Graph order: activation slots are registered in topological order.
    let min_slot = |c: CompId| {
        let comp = &st.comps[c];
        let acts = comp
            .slots
            .iter()
            .filter(|&&s| slots.slots[s].kind == SlotKind::Activation);
        acts.min()
            .or(comp.slots.iter().min())
            .copied()
            .unwrap_or(usize::MAX)
    };

    // Candidate leaves: free, leaf; block components stand with their minors, not alone.
    let mut leaves: Vec<CompId> = (0..st.comps.len())
        .filter(|&c| !st.comps[c].is_fixed() && st.comps[c].def == Def::Leaf)
        .filter(|&c| !is_block_of.contains(&c) || st.comps[c].block_of.is_some())
        .collect();
    // A free block component whose minors are all fixed is a plain group of blocks.
    leaves.sort_by_key(|&c| min_slot(c));

    let mut groups = Vec::new();
    for leaf in leaves {
        let block = st.comps[leaf].block_of;
        let mut axes: Vec<usize> = std::iter::once(leaf)
            .chain(block)
            .flat_map(|c| weights_of.get(&c).cloned().unwrap_or_default())
            .collect();
        axes.sort_unstable();
        axes.dedup();
        let members: Vec<Member> = axes
            .into_iter()
            .map(|s| {
                let slot = &slots.slots[s];
                Member {
                    tensor: slot.tensor.clone(),
                    axis: slot.axis.unwrap_or(0),
                    size: slot.size,
                    layout: String::new(),
                }
            })
            .collect();
        if members.is_empty() {
            continue;
        }
        let kind = match block {
            None => GroupKind::Plain,
            Some(j) => GroupKind::Blocked {
                blocks: st.comps[j].size,
                block_size: st.comps[leaf].size,
                block_perm_shared_with: vec![],
            },
        };
        let width = st.comps[leaf].size * block.map_or(1, |j| st.comps[j].size);
        groups.push(Group {
            id: groups.len(),
            width,
            kind,
            members,
            taps: vec![],
            tap: None,
            tap_axis: None,
            leaf,
            block,
        });
    }
    link_shared_blocks(&mut groups);
    let names = group_names(&groups);
    for g in &mut groups {
        for m in &mut g.members {
            let s = slots.slot(&m.tensor, m.axis).unwrap_or(0);
            m.layout = describe(st, st.comp_of[s], &names);
        }
    }
    choose_taps(&mut groups, st, slots, graph);
    groups
}

fn link_shared_blocks(groups: &mut [Group]) {
    let mut by_block: BTreeMap<CompId, Vec<usize>> = BTreeMap::new();
    for g in groups.iter() {
        if let Some(b) = g.block {
            by_block.entry(b).or_default().push(g.id);
        }
    }
    for g in groups.iter_mut() {
        if let (
            Some(b),
            GroupKind::Blocked {
                block_perm_shared_with,
                ..
            },
        ) = (g.block, &mut g.kind)
        {
            *block_perm_shared_with = by_block[&b]
                .iter()
                .copied()
                .filter(|&i| i != g.id)
                .collect();
        }
    }
}

/// Leaf component → the label used in layouts.
fn group_names(groups: &[Group]) -> BTreeMap<CompId, String> {
    let mut names = BTreeMap::new();
    for g in groups {
        names.insert(g.leaf, format!("g{}", g.id));
        if let Some(b) = g.block {
            names
                .entry(b)
                .or_insert_with(|| format!("blocks(g{})", g.id));
        }
    }
    names
}

/// A readable formula for how an axis is made of groups.
pub fn describe(st: &Structure, c: CompId, names: &BTreeMap<CompId, String>) -> String {
    let comp = &st.comps[c];
    if let Some(n) = names.get(&c) {
        return n.clone();
    }
    match &comp.def {
        Def::Leaf => format!(
            "{}{}",
            comp.size,
            if comp.is_fixed() { " fixed" } else { "" }
        ),
        Def::Factor(parts) => parts
            .iter()
            .map(|&p| {
                let d = describe(st, p, names);
                if matches!(st.comps[p].def, Def::Concat(_)) {
                    format!("({d})")
                } else {
                    d
                }
            })
            .collect::<Vec<_>>()
            .join(" × "),
        Def::Concat(pieces) => format!(
            "[{}]",
            pieces
                .iter()
                .map(|&(o, s, p)| format!("{}..{} {}", o, o + s, describe(st, p, names)))
                .collect::<Vec<_>>()
                .join(" | ")
        ),
    }
}

/// Taps: activation values with an axis that is exactly the group's units (the leaf itself, or
/// the product block × leaf). Preferred: values read by a weight layer (Conv/Gemm/MatMul with an
/// initializer), as the reference implementation reads the input of the consuming layer.
fn choose_taps(groups: &mut [Group], st: &Structure, slots: &Slots, graph: &Graph) {
    let mut order = BTreeMap::new();
    for (pos, &n) in graph.topological_order().iter().enumerate() {
        for o in &graph.node(n).output {
            order.insert(o.clone(), pos);
        }
    }
    // Activation tensors by the component of each of their axes, and by product components.
    let mut by_comp: BTreeMap<CompId, BTreeSet<&String>> = BTreeMap::new();
    for (name, axes) in slots.tensors() {
        if !order.contains_key(name) {
            continue;
        }
        for &s in axes.iter().flatten() {
            if slots.slots[s].kind == SlotKind::Activation {
                by_comp.entry(st.comp_of[s]).or_default().insert(name);
            }
        }
    }
    let mut products: BTreeMap<(CompId, CompId), Vec<CompId>> = BTreeMap::new();
    for (c, comp) in st.comps.iter().enumerate() {
        if let Def::Factor(parts) = &comp.def {
            if let [b, l] = parts[..] {
                products.entry((b, l)).or_default().push(c);
            }
        }
    }
    for g in groups.iter_mut() {
        // A blocked group's units are whole only where block × leaf is one axis.
        let comps = match g.block {
            None => vec![g.leaf],
            Some(b) => products.get(&(b, g.leaf)).cloned().unwrap_or_default(),
        };
        let names: BTreeSet<&String> = comps
            .iter()
            .filter_map(|c| by_comp.get(c))
            .flatten()
            .copied()
            .collect();
        let mut taps: Vec<(usize, String, bool)> = names
            .into_iter()
            .map(|name| (order[name], name.clone(), read_by_layer(graph, name)))
            .collect();
        taps.sort();
        g.tap = taps
            .iter()
            .rev()
            .find(|t| t.2)
            .or_else(|| taps.last())
            .map(|t| t.1.clone());
        g.taps = taps.into_iter().map(|t| t.1).collect();
        g.tap_axis = g.tap.as_ref().and_then(|t| {
            let axes = slots.of(t)?;
            axes.iter()
                .position(|s| s.is_some_and(|s| comps.contains(&st.comp_of[s])))
        });
    }
}

/// Whether `value` is the data input of a Conv, Gemm or MatMul with an initializer weight:
/// where a layer reads a group's units (discovery's tap, and calibration's token taps).
pub(crate) fn read_by_layer(graph: &Graph, value: &str) -> bool {
    graph.consumers(value).iter().any(|&(n, slot)| {
        let node = graph.node(n);
        slot == 0
            && matches!(node.op_type.as_deref(), Some("Conv" | "Gemm" | "MatMul"))
            && node
                .input
                .get(1)
                .is_some_and(|w| graph.initializer(w).is_some())
    })
}
