//! The raw material of discovery: one *slot* per axis of every tensor (activations and
//! weights), a union-find over slots, and the structural relations rules record between them.
//!
//! A slot stands for "the units along this axis". Rules say which slots must be permuted by the
//! same permutation (`equal`), which axis is the row-major product of finer ones (`factor`, from
//! Reshape/Flatten and the channel grouping of GroupNorm and grouped Conv), which is the
//! concatenation of others (`concat`, from Concat/Split/Slice), and which may not be permuted at
//! all (`fix`, with a reason). Axes of size 1 carry no units and get no slot.

use std::collections::HashMap;

pub type SlotId = usize;

/// What kind of tensor a slot belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotKind {
    /// A value computed at run time (or a graph input).
    Activation,
    /// A float initializer: rewritable when the group is permuted.
    Weight,
    /// A tensor we do not rewrite (integer initializer, `Constant` node output).
    Constant,
    /// A finer axis created by a rule (a factor of an axis, or a dropped slice range).
    Fresh,
}

#[derive(Clone, Debug)]
pub struct Slot {
    pub tensor: String,
    /// Axis in the tensor; `None` for fresh slots.
    pub axis: Option<usize>,
    pub size: usize,
    pub kind: SlotKind,
}

/// One part of a concatenated axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub offset: usize,
    pub size: usize,
    pub slot: SlotId,
}

#[derive(Default)]
pub struct Slots {
    pub(crate) slots: Vec<Slot>,
    by_tensor: HashMap<String, Vec<Option<SlotId>>>,
    parent: Vec<usize>,
    /// Reasons a slot's units must stay in place.
    pub(crate) fixed: Vec<(SlotId, String)>,
    /// `whole = parts[0] × parts[1] × …` (row-major: parts[0] is the slowest).
    pub(crate) factors: Vec<(SlotId, Vec<SlotId>)>,
    /// `whole = pieces` laid end to end.
    pub(crate) concats: Vec<(SlotId, Vec<Piece>)>,
}

impl Slots {
    /// Registers a tensor's axes; axes of size 1 get no slot.
    pub fn add_tensor(&mut self, name: &str, shape: &[usize], kind: SlotKind) {
        if self.by_tensor.contains_key(name) {
            return;
        }
        let ids = shape
            .iter()
            .enumerate()
            .map(|(axis, &size)| {
                (size > 1).then(|| {
                    self.push(Slot {
                        tensor: name.to_string(),
                        axis: Some(axis),
                        size,
                        kind,
                    })
                })
            })
            .collect();
        self.by_tensor.insert(name.to_string(), ids);
    }

    fn push(&mut self, slot: Slot) -> SlotId {
        self.slots.push(slot);
        self.parent.push(self.parent.len());
        self.slots.len() - 1
    }

    /// A new slot for a finer axis (a factor or a dropped range).
    pub fn fresh(&mut self, owner: &str, size: usize) -> SlotId {
        self.push(Slot {
            tensor: owner.to_string(),
            axis: None,
            size,
            kind: SlotKind::Fresh,
        })
    }

    /// The slots of a tensor's axes (`None` for size-1 axes); `None` if the tensor is unknown.
    pub fn of(&self, tensor: &str) -> Option<&[Option<SlotId>]> {
        self.by_tensor.get(tensor).map(Vec::as_slice)
    }

    pub fn slot(&self, tensor: &str, axis: usize) -> Option<SlotId> {
        self.of(tensor)?.get(axis).copied().flatten()
    }

    pub fn tensors(&self) -> impl Iterator<Item = (&String, &Vec<Option<SlotId>>)> {
        self.by_tensor.iter()
    }

    pub fn size(&self, s: SlotId) -> usize {
        self.slots[s].size
    }

    pub fn find(&self, mut s: SlotId) -> SlotId {
        while self.parent[s] != s {
            s = self.parent[s];
        }
        s
    }

    fn find_compress(&mut self, s: SlotId) -> SlotId {
        let root = self.find(s);
        let mut cur = s;
        while self.parent[cur] != root {
            let next = self.parent[cur];
            self.parent[cur] = root;
            cur = next;
        }
        root
    }

    /// The two slots hold the same units in the same order. Different sizes mean a rule's
    /// premise failed: both are fixed rather than trusted.
    pub fn equal(&mut self, a: SlotId, b: SlotId, why: &str) {
        if self.slots[a].size != self.slots[b].size {
            let reason = format!(
                "{why}: axis sizes {} and {} differ",
                self.slots[a].size, self.slots[b].size
            );
            self.fix(a, &reason);
            self.fix(b, &reason);
            return;
        }
        let (ra, rb) = (self.find_compress(a), self.find_compress(b));
        if ra != rb {
            self.parent[rb.max(ra)] = rb.min(ra);
        }
    }

    /// `equal` for optional slots: two absent (size-1) axes agree trivially; one absent and one
    /// present means the present one is broadcast and carries no constraint from the other.
    pub fn equal_opt(&mut self, a: Option<SlotId>, b: Option<SlotId>, why: &str) {
        if let (Some(a), Some(b)) = (a, b) {
            self.equal(a, b, why);
        }
    }

    pub fn fix(&mut self, s: SlotId, reason: &str) {
        self.fixed.push((s, reason.to_string()));
    }

    /// Fixes every axis of a tensor.
    pub fn fix_tensor(&mut self, tensor: &str, reason: &str) {
        let ids: Vec<SlotId> = self
            .of(tensor)
            .unwrap_or(&[])
            .iter()
            .flatten()
            .copied()
            .collect();
        for s in ids {
            self.fix(s, reason);
        }
    }

    pub fn factor(&mut self, whole: SlotId, parts: Vec<SlotId>) {
        let product: usize = parts.iter().map(|&p| self.size(p)).product();
        debug_assert_eq!(product, self.size(whole));
        if parts.len() == 1 {
            self.equal(whole, parts[0], "factor");
        } else {
            self.factors.push((whole, parts));
        }
    }

    pub fn concat(&mut self, whole: SlotId, pieces: Vec<Piece>) {
        self.concats.push((whole, pieces));
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}
