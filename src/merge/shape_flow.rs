//! `--width` on groups whose sizes the graph reads at run time. Transformer exports compute
//! reshape targets from `Shape` of the residual stream (`x.reshape(B, N, C)` with `C` read off
//! the stream, for a tensor that holds the heads' units), so widening the stream would hand
//! those reshapes its new width. This module follows the small integer "shape values" made
//! from `Shape`, element by element, from the values of candidate groups: a Reshape's target
//! that carries a width is later replaced by constants from the merged shapes ([`pin`]); any
//! other use of a width (an attention scale from the head size, a Range, a Split's sizes)
//! keeps the group at one model's width. Elements that carry no width (batch, token counts)
//! may go anywhere.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::graph::{Graph, ShapeMap};
use crate::onnx::TensorData;
use crate::symmetry::rules::{attr_int, input};
use crate::symmetry::structure::Def;
use crate::symmetry::{Discovery, GroupKind};

/// One element of a shape value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Elem {
    Known(i64),
    /// Depends on the batch size (and on nothing widened).
    Batch,
    /// Computed from the widths of these groups.
    Width(BTreeSet<usize>),
    /// Not followed (and carrying no width).
    Unknown,
}

impl Elem {
    fn widths(&self) -> BTreeSet<usize> {
        match self {
            Elem::Width(g) => g.clone(),
            _ => BTreeSet::new(),
        }
    }
}

/// What an axis holds of a group that may widen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holds {
    /// All its units (a plain group's, or a blocked group's blocks × block units).
    Units(usize),
    /// Its blocks (attention heads), one per index.
    Blocks(usize),
}

impl Holds {
    pub fn group(self) -> usize {
        match self {
            Holds::Units(g) | Holds::Blocks(g) => g,
        }
    }
}

/// Which axis of which value holds which group's units or blocks, and the shapes of every
/// value at two batch sizes (axes whose sizes differ depend on the batch).
pub struct Axes<'a> {
    disc: &'a Discovery,
    by_comp: HashMap<usize, Holds>,
    pub shapes: &'a ShapeMap,
    pub shapes_other_batch: &'a ShapeMap,
}

impl<'a> Axes<'a> {
    pub fn new(disc: &'a Discovery, shapes: &'a ShapeMap, other: &'a ShapeMap) -> Axes<'a> {
        let st = &disc.structure;
        let mut by_comp = HashMap::new();
        for g in &disc.groups {
            match (g.kind.clone(), g.block) {
                (GroupKind::Plain, _) => {
                    by_comp.insert(g.leaf, Holds::Units(g.id));
                }
                (GroupKind::Blocked { .. }, Some(b)) => {
                    by_comp.entry(b).or_insert(Holds::Blocks(g.id));
                    for (c, comp) in st.comps.iter().enumerate() {
                        if matches!(&comp.def, Def::Factor(parts) if parts[..] == [b, g.leaf]) {
                            by_comp.insert(c, Holds::Units(g.id));
                        }
                    }
                }
                _ => {}
            }
        }
        Axes {
            disc,
            by_comp,
            shapes,
            shapes_other_batch: other,
        }
    }

    /// The group whose units or blocks lie along `axis` of `value`, if one does alone.
    pub fn group_at(&self, value: &str, axis: usize) -> Option<Holds> {
        let s = self.disc.slots.slot(value, axis)?;
        self.by_comp.get(&self.disc.structure.comp_of[s]).copied()
    }

    /// The size of `axis` of `value` in the merged model (`widths`: merged units of each
    /// widened group), from the structure discovery proved: a widened group's units or blocks
    /// at their merged count, products and concatenations of them (a packed projection's
    /// Q, K and V rows, heads × head size) from their parts, anything else as it was.
    pub fn merged_size(&self, value: &str, axis: usize, widths: &BTreeMap<usize, usize>) -> usize {
        match self.disc.slots.slot(value, axis) {
            Some(s) => self.comp_size(self.disc.structure.comp_of[s], widths),
            None => self
                .shapes
                .get(value)
                .and_then(|v| v.get(axis))
                .copied()
                .unwrap_or(1),
        }
    }

    fn comp_size(&self, c: usize, widths: &BTreeMap<usize, usize>) -> usize {
        match self.by_comp.get(&c) {
            Some(Holds::Units(g)) if widths.contains_key(g) => return widths[g],
            Some(Holds::Blocks(g)) if widths.contains_key(g) => {
                return widths[g] / self.block_size(*g)
            }
            _ => {}
        }
        let comp = &self.disc.structure.comps[c];
        match &comp.def {
            Def::Leaf => comp.size,
            Def::Factor(parts) => parts.iter().map(|&p| self.comp_size(p, widths)).product(),
            Def::Concat(pieces) => pieces
                .iter()
                .map(|&(_, _, p)| self.comp_size(p, widths))
                .sum(),
        }
    }

    /// The block size of group `g` (1 for a plain group).
    fn block_size(&self, g: usize) -> usize {
        match self.disc.groups[g].kind {
            GroupKind::Blocked { block_size, .. } => block_size.max(1),
            GroupKind::Plain => 1,
        }
    }

    fn batch_dependent(&self, value: &str, axis: usize) -> bool {
        let a = self.shapes.get(value).and_then(|s| s.get(axis));
        let b = self.shapes_other_batch.get(value).and_then(|s| s.get(axis));
        a != b
    }
}

/// The shape values of a graph and the uses of widths that no rewrite can follow.
pub struct Flow {
    pub values: HashMap<String, Vec<Elem>>,
    /// Per group: why a value computed from its width stops it from widening.
    pub blocked: BTreeMap<usize, String>,
}

/// Follows every shape value of `graph` computed from `Shape` of a value that holds a group
/// in `candidates`.
pub fn follow(graph: &Graph, axes: &Axes, candidates: &BTreeSet<usize>) -> Flow {
    let mut flow = Flow {
        values: HashMap::new(),
        blocked: BTreeMap::new(),
    };
    for &n in graph.topological_order() {
        let node = graph.node(n);
        let op = node.op_type.as_deref().unwrap_or("");
        let out = match op {
            "Shape" => shape_of(node, axes, candidates),
            _ => {
                let ins: Vec<Option<Vec<Elem>>> = (0..node.input.len())
                    .map(|i| flow.ints(graph, input(node, i)?))
                    .collect();
                // Nodes that read a followed shape value, and integer constants computed
                // from constants alone (a Slice's bounds made by Mod and Reshape).
                let followed = node
                    .input
                    .iter()
                    .any(|i| !i.is_empty() && flow.values.contains_key(i));
                let constant_only = node
                    .input
                    .iter()
                    .zip(&ins)
                    .all(|(name, v)| name.is_empty() || v.is_some());
                if !followed && !constant_only {
                    continue;
                }
                match fold(op, node, &ins) {
                    Some(v) => Some(v),
                    None if !followed => continue,
                    None => {
                        let widths: BTreeSet<usize> = node
                            .input
                            .iter()
                            .filter_map(|i| flow.values.get(i))
                            .flatten()
                            .flat_map(Elem::widths)
                            .collect();
                        let is_target = op == "Reshape"
                            && node
                                .input
                                .first()
                                .is_some_and(|i| !flow.values.contains_key(i));
                        if !is_target {
                            let name = node.name.as_deref().unwrap_or("");
                            for g in widths {
                                flow.blocked
                                    .entry(g)
                                    .or_insert_with(|| format!("its width feeds {op} '{name}'"));
                            }
                        }
                        continue;
                    }
                }
            }
        };
        if let (Some(v), Some(o)) = (out, node.output.first()) {
            flow.values.insert(o.clone(), v);
        }
    }
    flow
}

impl Flow {
    /// The elements of `name`: a followed shape value, or an integer constant.
    pub fn ints(&self, graph: &Graph, name: &str) -> Option<Vec<Elem>> {
        self.values
            .get(name)
            .cloned()
            .or_else(|| constant(graph, name))
    }
}

fn constant(graph: &Graph, name: &str) -> Option<Vec<Elem>> {
    let ints = graph.const_ints(name)?;
    Some(ints.into_iter().map(Elem::Known).collect())
}

fn shape_of(
    node: &crate::onnx::proto::NodeProto,
    axes: &Axes,
    candidates: &BTreeSet<usize>,
) -> Option<Vec<Elem>> {
    let value = input(node, 0)?;
    let shape = axes.shapes.get(value)?;
    let rank = shape.len() as i64;
    let clamp = |v: i64| (if v < 0 { v + rank } else { v }).clamp(0, rank) as usize;
    let start = clamp(attr_int(node, "start").unwrap_or(0));
    let end = clamp(attr_int(node, "end").unwrap_or(rank));
    Some(
        (start..end.max(start))
            .map(|axis| match axes.group_at(value, axis).map(Holds::group) {
                Some(g) if candidates.contains(&g) => Elem::Width(BTreeSet::from([g])),
                _ if axes.batch_dependent(value, axis) => Elem::Batch,
                _ => Elem::Known(shape[axis] as i64),
            })
            .collect(),
    )
}

/// The output of `op` on shape values, element by element; `None` for an op this module does
/// not follow.
fn fold(
    op: &str,
    node: &crate::onnx::proto::NodeProto,
    ins: &[Option<Vec<Elem>>],
) -> Option<Vec<Elem>> {
    let arg = |i: usize| ins.get(i).cloned().flatten();
    let known = |i: usize| -> Option<Vec<i64>> {
        arg(i)?
            .into_iter()
            .map(|e| match e {
                Elem::Known(v) => Some(v),
                _ => None,
            })
            .collect()
    };
    match op {
        "Identity" | "Cast" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" => arg(0),
        "Concat" => ins.iter().try_fold(Vec::new(), |mut acc, v| {
            acc.extend(v.clone()?);
            Some(acc)
        }),
        "Gather" => {
            let data = arg(0)?;
            let idx = known(1)?;
            if attr_int(node, "axis").unwrap_or(0) != 0 {
                return None;
            }
            idx.into_iter()
                .map(|i| {
                    let i = if i < 0 { i + data.len() as i64 } else { i };
                    data.get(usize::try_from(i).ok()?).cloned()
                })
                .collect()
        }
        "Slice" => {
            let data = arg(0)?;
            let (starts, ends) = (known(1)?, known(2)?);
            let steps = match ins.get(4) {
                Some(Some(_)) => known(4)?,
                _ => vec![1],
            };
            if starts.len() != 1 || ends.len() != 1 || steps != [1] {
                return None;
            }
            let n = data.len() as i64;
            let at = |v: i64| (if v < 0 { v + n } else { v }).clamp(0, n) as usize;
            let (s, e) = (at(starts[0]), at(ends[0]));
            Some(data[s..e.max(s)].to_vec())
        }
        "ConstantOfShape" => {
            let dims = known(0)?;
            let count: i64 = dims.iter().product();
            let value = attr_tensor_int(node).unwrap_or(0);
            Some(vec![Elem::Known(value); usize::try_from(count).ok()?])
        }
        "Add" | "Sub" | "Mul" | "Div" | "Mod" | "Equal" => {
            let (a, b) = (arg(0)?, arg(1)?);
            let len = a.len().max(b.len());
            let pick = |v: &[Elem], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
            if (a.len() != len && a.len() != 1) || (b.len() != len && b.len() != 1) {
                return None;
            }
            Some(
                (0..len)
                    .map(|i| arith(op, &pick(&a, i), &pick(&b, i)))
                    .collect(),
            )
        }
        "Where" => {
            let (c, a, b) = (arg(0)?, arg(1)?, arg(2)?);
            let len = c.len().max(a.len()).max(b.len());
            let pick = |v: &[Elem], i: usize| v[if v.len() == 1 { 0 } else { i }].clone();
            Some(
                (0..len)
                    .map(|i| match pick(&c, i) {
                        Elem::Known(0) => pick(&b, i),
                        Elem::Known(_) => pick(&a, i),
                        cond => {
                            let w: BTreeSet<usize> = [cond, pick(&a, i), pick(&b, i)]
                                .iter()
                                .flat_map(Elem::widths)
                                .collect();
                            if w.is_empty() {
                                Elem::Unknown
                            } else {
                                Elem::Width(w)
                            }
                        }
                    })
                    .collect(),
            )
        }
        _ => None,
    }
}

fn arith(op: &str, a: &Elem, b: &Elem) -> Elem {
    match (a, b) {
        (Elem::Known(x), Elem::Known(y)) => match op {
            "Add" => Elem::Known(x + y),
            "Sub" => Elem::Known(x - y),
            "Mul" => Elem::Known(x * y),
            "Div" if *y != 0 => Elem::Known(x / y),
            // Integer Mod takes the divisor's sign (`fmod` 0).
            "Mod" if *y != 0 => Elem::Known(((x % y) + y) % y),
            "Equal" => Elem::Known(i64::from(x == y)),
            _ => Elem::Unknown,
        },
        _ => {
            let w: BTreeSet<usize> = a.widths().union(&b.widths()).copied().collect();
            if !w.is_empty() {
                Elem::Width(w)
            } else if matches!((a, b), (Elem::Batch, Elem::Known(1)) if op == "Mul" || op == "Div")
            {
                Elem::Batch
            } else {
                Elem::Unknown
            }
        }
    }
}

fn attr_tensor_int(node: &crate::onnx::proto::NodeProto) -> Option<i64> {
    let t = node
        .attribute
        .iter()
        .find(|a| a.name.as_deref() == Some("value"))?
        .t
        .as_ref()?;
    TensorData::from_proto(t)
        .ok()?
        .to_labels()?
        .first()
        .copied()
}

/// The constant target that makes Reshape `node` produce its output at the merged widths
/// (`widths`: merged width of each widened group): the output's unit axes at their merged
/// widths, its batch axis copied (0) or inferred (−1), every other axis at its size. `Ok(None)`
/// when the Reshape touches no widened group.
pub fn pin(
    node: &crate::onnx::proto::NodeProto,
    axes: &Axes,
    flow: &Flow,
    widths: &BTreeMap<usize, usize>,
) -> Result<Option<Vec<i64>>, String> {
    let name = node.name.as_deref().unwrap_or("");
    let (Some(x), Some(target), Some(o)) = (input(node, 0), input(node, 1), node.output.first())
    else {
        return Ok(None);
    };
    let widened: BTreeSet<usize> = widths.keys().copied().collect();
    // Touched: an axis of the input or output whose size the widths change (whole units,
    // heads, or a product or concatenation that holds them), or a target that reads a width.
    let changes = |v: &str| {
        axes.shapes.get(v).is_some_and(|shape| {
            shape
                .iter()
                .enumerate()
                .any(|(a, &size)| axes.merged_size(v, a, widths) != size)
        })
    };
    let reads = flow
        .values
        .get(target)
        .is_some_and(|t| t.iter().any(|e| !e.widths().is_disjoint(&widened)));
    if !(changes(x) || changes(o) || reads) {
        return Ok(None);
    }
    if attr_int(node, "allowzero") == Some(1) {
        return Err(format!("Reshape '{name}' has allowzero set"));
    }
    let (out, out2) = match (axes.shapes.get(o), axes.shapes_other_batch.get(o)) {
        (Some(a), Some(b)) if a.len() == b.len() => (a, b),
        _ => return Err(format!("Reshape '{name}': shape of '{o}' unknown")),
    };
    let (inp, inp2) = (axes.shapes.get(x), axes.shapes_other_batch.get(x));
    let mut pinned: Vec<i64> = Vec::with_capacity(out.len());
    let mut inferred = 0;
    for i in 0..out.len() {
        let dim = if out[i] != out2[i] {
            // A batch axis (or batch × heads, as a sequence-first attention folds them):
            // copied from the input where it stands there alone, else inferred.
            let copied = match (inp, inp2) {
                (Some(a), Some(b)) => a.get(i) == Some(&out[i]) && b.get(i) == Some(&out2[i]),
                _ => false,
            };
            if copied {
                0
            } else {
                inferred += 1;
                -1
            }
        } else {
            axes.merged_size(o, i, widths) as i64
        };
        pinned.push(dim);
    }
    if inferred > 1 {
        return Err(format!(
            "Reshape '{name}': more than one batch-dependent axis to infer"
        ));
    }
    // The merged input must fill the pinned shape: a size the components do not describe
    // (an axis that stacks several groups by index, as a packed projection's [3, C] does)
    // would make a target that runs but mixes units, or one that fails.
    let Some(rank) = inp.map(Vec::len) else {
        return Err(format!("Reshape '{name}': shape of '{x}' unknown"));
    };
    // At the calibration batch (a batch × heads axis is a product of the two).
    let merged_in: Vec<usize> = (0..rank).map(|j| axes.merged_size(x, j, widths)).collect();
    let volume: usize = merged_in.iter().product();
    let fits = |pinned: &[i64]| {
        let known: usize = pinned
            .iter()
            .enumerate()
            .map(|(i, &d)| match d {
                0 => merged_in.get(i).copied().unwrap_or(0),
                -1 => 1,
                d => d as usize,
            })
            .product();
        if inferred == 0 {
            known == volume
        } else {
            known > 0 && volume.is_multiple_of(known)
        }
    };
    if !fits(&pinned) {
        // A packed projection's rows split as [pieces, piece] ([3, C] for Q, K and V): the
        // pieces at their (equal) merged size, where the split is exactly the packed axis.
        let restacked = inp
            .and_then(|inp| stacked_pieces(axes, x, inp, out, &pinned, widths))
            .filter(|p| fits(p));
        match restacked {
            Some(p) => pinned = p,
            None => {
                return Err(format!(
                    "Reshape '{name}': its widened input does not fill {pinned:?}"
                ))
            }
        }
    }
    Ok(Some(pinned))
}

/// `pinned` with a packed axis's piece size widened: input axis `j` of `x` is a concatenation
/// of `k` pieces of one size (a packed projection's Q, K and V rows), all widened to one merged
/// size, and the Reshape splits exactly that axis into adjacent `[k, piece]` axes, or `[k,
/// heads, head_dim]` (the sizes before them hold the same elements on both sides). Each index
/// of the `k` axis then holds one piece at its merged width, as the rewrite lays the pieces out
/// end to end. `None` otherwise (pieces widened unequally cannot be stacked on one axis).
fn stacked_pieces(
    axes: &Axes,
    x: &str,
    inp: &[usize],
    out: &[usize],
    pinned: &[i64],
    widths: &BTreeMap<usize, usize>,
) -> Option<Vec<i64>> {
    for (j, &size) in inp.iter().enumerate() {
        let Some(slot) = axes.disc.slots.slot(x, j) else {
            continue;
        };
        let Def::Concat(pieces) = &axes.disc.structure.comps[axes.disc.structure.comp_of[slot]].def
        else {
            continue;
        };
        let (k, piece) = (pieces.len(), pieces.first().map_or(0, |p| p.1));
        if k < 2 || pieces.iter().any(|p| p.1 != piece) {
            continue;
        }
        let merged: BTreeSet<usize> = pieces
            .iter()
            .map(|&(_, _, c)| axes.comp_size(c, widths))
            .collect();
        let [merged] = merged.into_iter().collect::<Vec<_>>()[..] else {
            continue;
        };
        let before: usize = inp[..j].iter().product();
        if size != k * piece {
            continue;
        }
        for i in 0..out.len().saturating_sub(1) {
            let aligned = out[..i].iter().product::<usize>() == before;
            if !aligned || out[i] != k || pinned[i] != k as i64 {
                continue;
            }
            // The piece as one axis ([k, C]: nn.MultiheadAttention's [N, B, 3, C]) or as
            // factors ([k, heads, head_dim]: timm's [B, N, 3, heads, head_dim]). The rewrite
            // widens a piece by whole blocks, block-major, so the outer factor takes the merged
            // size over the inner ones, which stay.
            let mut end = i + 1;
            let mut product = 1;
            while end < out.len() && product < piece {
                product *= out[end];
                end += 1;
            }
            let unchanged = (i + 1..end).all(|a| pinned[a] == out[a] as i64);
            let inner: usize = out[i + 2..end].iter().product();
            if product == piece && unchanged && inner > 0 && merged.is_multiple_of(inner) {
                let mut p = pinned.to_vec();
                p[i + 1] = (merged / inner) as i64;
                return Some(p);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::NodeProto;

    fn known(v: &[i64]) -> Option<Vec<Elem>> {
        Some(v.iter().map(|&x| Elem::Known(x)).collect())
    }

    fn width(g: usize) -> Elem {
        Elem::Width(BTreeSet::from([g]))
    }

    #[test]
    fn widths_survive_arithmetic_and_constants_fold() {
        assert_eq!(
            arith("Mod", &Elem::Known(-3), &Elem::Known(5)),
            Elem::Known(2)
        );
        assert_eq!(arith("Div", &width(4), &Elem::Known(2)), width(4));
        assert_eq!(arith("Mul", &Elem::Batch, &Elem::Known(1)), Elem::Batch);
        assert_eq!(arith("Mul", &Elem::Batch, &Elem::Known(4)), Elem::Unknown);
        let node = NodeProto::default();
        // Gather picks elements (negative indices from the end); Slice cuts a range.
        let shape = Some(vec![Elem::Batch, Elem::Known(17), width(0)]);
        let got = fold("Gather", &node, &[shape.clone(), known(&[-1, 0])]);
        assert_eq!(got, Some(vec![width(0), Elem::Batch]));
        let got = fold("Slice", &node, &[shape, known(&[1]), known(&[9])]);
        assert_eq!(got, Some(vec![Elem::Known(17), width(0)]));
        // Where on a known condition takes one side; on an unknown one, any width taints it.
        let cond = Some(vec![Elem::Known(1), Elem::Known(0), Elem::Unknown]);
        let a = Some(vec![Elem::Known(1), Elem::Known(2), width(3)]);
        let b = known(&[7, 8, 9]);
        let got = fold("Where", &node, &[cond, a, b]);
        assert_eq!(got, Some(vec![Elem::Known(1), Elem::Known(8), width(3)]));
    }
}
