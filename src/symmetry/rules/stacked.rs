//! Packed projections: one weight layer computes several tensors side by side (timm's `qkv`
//! Linear, `nn.MultiheadAttention`'s in-projection), a Reshape stacks them on a new axis
//! (`[…, 3·D] → […, 3, D]`), and constant indices take them apart again (Gather, or a Split
//! into ones). Read as a plain reshape, the stacked axis is a factor of the packed one, and
//! every part shares one permutation of the rest: Q, K and V in one within-head order. Here the
//! packed axis is read as ranges instead, one per index, each followed on its own to where its
//! index is taken: the freedom separate projections have (Q/K and V/O as two groups).
//!
//! Sound only when nothing but those takes reads the stacked values: every reader, through
//! layout ops that keep the stacked and content axes whole (Transpose, Squeeze, Unsqueeze, a
//! Reshape of size-1 axes, Identity), must be a constant-index take along the stacked axis or
//! a `Shape`. Otherwise the plain reshape rule applies.

use super::shape::{link_factors, refine};
use super::{attr_int, attr_ints, input, norm_axis, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;
use crate::symmetry::slots::{Piece, SlotId};

/// Where one index of the stacked axis is taken out.
struct Take {
    output: String,
    index: usize,
    /// The output's axes that hold the content, in the order of the packed factors.
    content: Vec<usize>,
}

/// How far the walk through layout ops may go before giving up (exporters put two or three
/// between the Reshape and the takes).
const MAX_CHAIN: usize = 64;

/// The packed reading of a Reshape, when the pattern holds: `None` leaves the node to the
/// plain rule.
pub fn unstack(ctx: &mut Ctx, node: &NodeProto) -> Option<RuleResult> {
    let x = input(node, 0)?;
    let y = output(node, 0)?;
    let (shx, shy) = (ctx.shape(x).ok()?, ctx.shape(y).ok()?);
    let (sx, sy) = (ctx.axes(x).ok()?, ctx.axes(y).ok()?);
    let (fine_in, fine_out) = refine(&shx, &shy).ok()?;
    let owner = |fine: &[Vec<usize>]| -> Vec<usize> {
        fine.iter()
            .enumerate()
            .flat_map(|(axis, f)| std::iter::repeat_n(axis, f.len()))
            .collect()
    };
    let (in_of, out_of) = (owner(&fine_in), owner(&fine_out));
    for w in 0..shx.len() {
        let factors: Vec<usize> = (0..in_of.len()).filter(|&f| in_of[f] == w).collect();
        // The packed axis splits into output axes of their own: the stack, then the content.
        if factors.len() < 2 || factors.iter().any(|&f| fine_out[out_of[f]].len() != 1) {
            continue;
        }
        let stack = out_of[factors[0]];
        let content: Vec<usize> = factors[1..].iter().map(|&f| out_of[f]).collect();
        let Some(takes) = trace(ctx, y, stack, &content) else {
            continue;
        };
        let packed = sx[w]?;
        let skip_out: Vec<usize> = std::iter::once(stack).chain(content.clone()).collect();
        let sizes: Vec<usize> = content.iter().map(|&a| shy[a]).collect();
        let parts = ranges(ctx, x, packed, shy[stack], &sizes);
        // The other axes as in the plain rule.
        let common: Vec<SlotId> = fine_in
            .iter()
            .flatten()
            .map(|&size| ctx.slots.fresh(y, size))
            .collect();
        link_factors(ctx, &sx, &fine_in, &common, &[w]);
        link_factors(ctx, &sy, &fine_out, &common, &skip_out);
        for &a in &skip_out {
            if let Some(s) = sy[a] {
                let reason = "stacked ranges of a packed projection (each followed on its own)";
                ctx.slots.fix(s, reason);
            }
        }
        for t in takes {
            let linked = t.content.into_iter().zip(parts[t.index].clone()).collect();
            ctx.unstacked.insert(t.output, linked);
        }
        return Some(Ok(()));
    }
    None
}

/// Cuts the packed axis into `count` ranges, each the row-major product of `sizes`; returns
/// each range's factor slots.
fn ranges(
    ctx: &mut Ctx,
    owner: &str,
    packed: SlotId,
    count: usize,
    sizes: &[usize],
) -> Vec<Vec<SlotId>> {
    let len: usize = sizes.iter().product();
    let mut pieces = Vec::with_capacity(count);
    let mut parts = Vec::with_capacity(count);
    for i in 0..count {
        let piece = ctx.slots.fresh(owner, len);
        let factors: Vec<SlotId> = if sizes.len() == 1 {
            vec![piece]
        } else {
            let f: Vec<SlotId> = sizes.iter().map(|&s| ctx.slots.fresh(owner, s)).collect();
            ctx.slots.factor(piece, f.clone());
            f
        };
        pieces.push(Piece {
            offset: i * len,
            size: len,
            slot: piece,
        });
        parts.push(factors);
    }
    ctx.slots.concat(packed, pieces);
    parts
}

/// Follows the stacked value to its takes; `None` when anything else reads it.
fn trace(ctx: &Ctx, start: &str, stack: usize, content: &[usize]) -> Option<Vec<Take>> {
    let outputs: Vec<&str> = ctx
        .graph
        .outputs()
        .iter()
        .filter_map(|o| o.name.as_deref())
        .collect();
    let mut todo = vec![(start.to_string(), stack, content.to_vec())];
    let mut takes = Vec::new();
    let mut visited = 0;
    while let Some((value, stack, content)) = todo.pop() {
        visited += 1;
        if visited > MAX_CHAIN || outputs.contains(&value.as_str()) {
            return None;
        }
        let shape = ctx.shape(&value).ok()?;
        let count = shape[stack];
        for &(n, slot) in ctx.graph.consumers(&value) {
            let node = ctx.graph.node(n);
            let op = node.op_type.as_deref().unwrap_or("");
            if !node.domain_is_default() || slot != 0 {
                return None;
            }
            if matches!(op, "Shape" | "Size") {
                continue;
            }
            let y = output(node, 0)?;
            match op {
                "Transpose" => {
                    let perm = attr_ints(node, "perm")
                        .unwrap_or_else(|| (0..shape.len() as i64).rev().collect());
                    let perm: Vec<usize> = perm
                        .iter()
                        .map(|&p| norm_axis(p, shape.len()).ok())
                        .collect::<Option<_>>()?;
                    let to = |a: usize| perm.iter().position(|&p| p == a);
                    let content = content.iter().map(|&a| to(a)).collect::<Option<_>>()?;
                    todo.push((y.to_string(), to(stack)?, content));
                }
                "Identity" | "Squeeze" | "Unsqueeze" | "Reshape" | "Flatten" => {
                    let to = unit_moves(&shape, &ctx.shape(y).ok()?)?;
                    let content = content.iter().map(|&a| to[a]).collect::<Option<_>>()?;
                    todo.push((y.to_string(), to[stack]?, content));
                }
                "Gather" => {
                    let axis = norm_axis(attr_int(node, "axis").unwrap_or(0), shape.len()).ok()?;
                    let indices = input(node, 1)?;
                    let (values, rank) = (ctx.const_ints(indices)?, ctx.shape(indices).ok()?.len());
                    if axis != stack || values.len() != 1 {
                        return None;
                    }
                    let index = usize::try_from(if values[0] < 0 {
                        values[0] + count as i64
                    } else {
                        values[0]
                    })
                    .ok()
                    .filter(|&i| i < count)?;
                    let content = content
                        .iter()
                        .map(|&a| if a < axis { a } else { a - 1 + rank })
                        .collect();
                    takes.push(Take {
                        output: y.to_string(),
                        index,
                        content,
                    });
                }
                "Split" => {
                    let axis = norm_axis(attr_int(node, "axis").unwrap_or(0), shape.len()).ok()?;
                    if axis != stack || node.output.len() != count {
                        return None;
                    }
                    for (index, o) in node.output.iter().enumerate() {
                        if o.is_empty() || ctx.shape(o).ok()?.get(axis) != Some(&1) {
                            return None;
                        }
                        takes.push(Take {
                            output: o.clone(),
                            index,
                            content: content.clone(),
                        });
                    }
                }
                _ => return None,
            }
        }
    }
    (!takes.is_empty()).then_some(takes)
}

/// For a reshape that only adds or drops size-1 axes: where each input axis of size > 1 goes
/// (`None` for size-1 axes); `None` when it regroups units.
fn unit_moves(from: &[usize], to: &[usize]) -> Option<Vec<Option<usize>>> {
    let big = |sh: &[usize]| -> Vec<usize> { (0..sh.len()).filter(|&a| sh[a] > 1).collect() };
    let (a, b) = (big(from), big(to));
    if a.len() != b.len() || a.iter().zip(&b).any(|(&i, &j)| from[i] != to[j]) {
        return None;
    }
    let mut moves = vec![None; from.len()];
    for (&i, &j) in a.iter().zip(&b) {
        moves[i] = Some(j);
    }
    Some(moves)
}
