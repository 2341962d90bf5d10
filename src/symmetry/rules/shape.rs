//! Ops that move data between axes without computing: Reshape and its kin, Transpose, Concat,
//! Split, Slice, Pad, Tile, and the shape-computing ops whose outputs are never data units.

use super::{
    attr_int, attr_ints, input, need, norm_axis, output, present_inputs, stacked, Ctx, RuleResult,
};
use crate::onnx::proto::NodeProto;
use crate::symmetry::slots::{Piece, SlotId};

/// Reshape, Flatten, Squeeze, Unsqueeze. Both shapes are refined into their common row-major
/// factors (e.g. `[N, C, H, W] → [N, C·H·W]` gives factors `N, C, H, W`); every axis is then
/// the product of a run of those factors. Shapes with no common refinement (an axis size that
/// divides neither way) mix units, and fix every axis involved.
pub fn reshape(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    if let Some(done) = stacked::unstack(ctx, node) {
        return done;
    }
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (shx, shy) = (ctx.shape(x)?, ctx.shape(y)?);
    let (sx, sy) = (ctx.axes(x)?, ctx.axes(y)?);
    let (fine_in, fine_out) = refine(&shx, &shy)?;
    // One fresh slot per common factor, in order; both sides point at the same ones.
    let factors: Vec<SlotId> = fine_in
        .iter()
        .flatten()
        .map(|&size| ctx.slots.fresh(y, size))
        .collect();
    link_factors(ctx, &sx, &fine_in, &factors, &[]);
    link_factors(ctx, &sy, &fine_out, &factors, &[]);
    Ok(())
}

/// For every axis of a shape, the sizes of the common factors it is made of, in order.
pub(super) type Refinement = Vec<Vec<usize>>;

/// The common row-major refinement of two shapes (size-1 axes have no factors).
pub(super) fn refine(shx: &[usize], shy: &[usize]) -> Result<(Refinement, Refinement), String> {
    let non_unit = |sh: &[usize]| -> Vec<(usize, usize)> {
        sh.iter().copied().enumerate().filter(|d| d.1 > 1).collect()
    };
    let (ins, outs) = (non_unit(shx), non_unit(shy));
    let mut fine_in: Vec<Vec<usize>> = vec![vec![]; shx.len()];
    let mut fine_out: Vec<Vec<usize>> = vec![vec![]; shy.len()];
    let (mut i, mut j) = (0, 0);
    let mut rem_in = ins.first().map_or(1, |d| d.1);
    let mut rem_out = outs.first().map_or(1, |d| d.1);
    while i < ins.len() && j < outs.len() {
        let piece = if rem_in == rem_out {
            rem_in
        } else if rem_in.is_multiple_of(rem_out) {
            rem_out
        } else if rem_out.is_multiple_of(rem_in) {
            rem_in
        } else {
            return Err(format!("reshape {shx:?} → {shy:?} mixes axes"));
        };
        fine_in[ins[i].0].push(piece);
        fine_out[outs[j].0].push(piece);
        rem_in /= piece;
        rem_out /= piece;
        if rem_in == 1 {
            i += 1;
            rem_in = ins.get(i).map_or(1, |d| d.1);
        }
        if rem_out == 1 {
            j += 1;
            rem_out = outs.get(j).map_or(1, |d| d.1);
        }
    }
    if i != ins.len() || j != outs.len() {
        return Err(format!("reshape {shx:?} → {shy:?}: sizes differ"));
    }
    Ok((fine_in, fine_out))
}

/// Each axis (but those in `skip`) is the product of its run of common `factors`.
pub(super) fn link_factors(
    ctx: &mut Ctx,
    axes: &[Option<SlotId>],
    fine: &[Vec<usize>],
    factors: &[SlotId],
    skip: &[usize],
) {
    let mut k = 0;
    for (axis, sizes) in fine.iter().enumerate() {
        if let (Some(s), false) = (axes[axis], skip.contains(&axis)) {
            ctx.slots.factor(s, factors[k..k + sizes.len()].to_vec());
        }
        k += sizes.len();
    }
}

pub fn transpose(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (sx, sy) = (ctx.axes(x)?, ctx.axes(y)?);
    let perm = attr_ints(node, "perm").unwrap_or_else(|| (0..sx.len() as i64).rev().collect());
    if perm.len() != sy.len() || sx.len() != sy.len() {
        return Err("Transpose perm does not match the rank".into());
    }
    for (i, &p) in perm.iter().enumerate() {
        let p = norm_axis(p, sx.len())?;
        ctx.slots.equal_opt(sx[p], sy[i], "transpose");
    }
    Ok(())
}

/// Pieces laid end to end along `axis` of `parts`; size-1 pieces get fresh slots.
fn pieces(ctx: &mut Ctx, parts: &[String], axis: usize, owner: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut offset = 0;
    for p in parts {
        let size = *ctx.shape(p)?.get(axis).ok_or("rank")?;
        let slot = match ctx.axes(p)?[axis] {
            Some(s) => s,
            None => ctx.slots.fresh(owner, size),
        };
        out.push(Piece { offset, size, slot });
        // Sizes come from the file or from inference on it: a hostile one can overflow.
        offset = offset
            .checked_add(size)
            .ok_or("piece sizes overflow the axis")?;
    }
    Ok(out)
}

/// The non-split axes of `a` and `b` are equal; `axis` is handled by the caller. An axis of
/// `b` in `parts` holds a range of a packed projection (`stacked`) and is linked there instead.
fn equal_except(
    ctx: &mut Ctx,
    a: &str,
    b: &str,
    axis: usize,
    parts: &[(usize, SlotId)],
) -> RuleResult {
    let (sa, sb) = (ctx.axes(a)?, ctx.axes(b)?);
    if sa.len() != sb.len() {
        return Err("ranks differ".into());
    }
    for (i, (p, q)) in sa.iter().zip(&sb).enumerate() {
        match parts.iter().find(|l| l.0 == i) {
            Some(&(_, part)) => ctx
                .slots
                .equal_opt(Some(part), *q, "range of a packed projection"),
            None if i != axis => ctx.slots.equal_opt(*p, *q, "concat/split"),
            None => {}
        }
    }
    Ok(())
}

pub fn concat(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let y = need(output(node, 0), "output")?;
    let rank = ctx.axes(y)?.len();
    let axis = norm_axis(attr_int(node, "axis").ok_or("axis")?, rank)?;
    let inputs: Vec<String> = present_inputs(node);
    for x in &inputs {
        equal_except(ctx, x, y, axis, &[])?;
    }
    if let Some(whole) = ctx.axes(y)?[axis] {
        let p = pieces(ctx, &inputs, axis, y)?;
        ctx.slots.concat(whole, p);
    }
    Ok(())
}

pub fn split(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let rank = ctx.axes(x)?.len();
    let axis = norm_axis(attr_int(node, "axis").unwrap_or(0), rank)?;
    let outputs: Vec<String> = node
        .output
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect();
    if outputs.len() != node.output.len() {
        return Err("Split with an unused output".into());
    }
    for y in &outputs {
        // A part taken out of a packed projection holds its own range's units.
        let parts = ctx.unstacked.remove(y.as_str()).unwrap_or_default();
        equal_except(ctx, x, y, axis, &parts)?;
    }
    if let Some(whole) = ctx.axes(x)?[axis] {
        let p = pieces(ctx, &outputs, axis, x)?;
        ctx.slots.concat(whole, p);
    }
    Ok(())
}

/// Slice with constant bounds and step 1: the output is one range of the input axis, the rest
/// is dropped (fresh slots stand for the dropped ranges).
pub fn slice(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (shx, sx, sy) = (ctx.shape(x)?, ctx.axes(x)?, ctx.axes(y)?);
    let rank = shx.len();
    let get = |i: usize, attr: &str| -> Result<Option<Vec<i64>>, String> {
        if let Some(v) = attr_ints(node, attr) {
            return Ok(Some(v));
        }
        match input(node, i) {
            Some(n) => ctx
                .const_ints(n)
                .map(Some)
                .ok_or_else(|| format!("slice {attr} are not constant")),
            None => Ok(None),
        }
    };
    let starts = get(1, "starts")?.ok_or("starts")?;
    let ends = get(2, "ends")?.ok_or("ends")?;
    let axes = get(3, "axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = get(4, "steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    let mut sliced = vec![None; rank];
    for k in 0..starts.len() {
        let a = norm_axis(*axes.get(k).ok_or("axes")?, rank)?;
        if *steps.get(k).ok_or("steps")? != 1 {
            return Err("slice with a step".into());
        }
        let dim = shx[a] as i64;
        let clamp = |v: i64| (if v < 0 { v + dim } else { v }).clamp(0, dim) as usize;
        sliced[a] = Some((clamp(starts[k]), clamp(ends[k])));
    }
    for a in 0..rank {
        match sliced[a] {
            Some((s, e)) if !(s == 0 && e == shx[a]) => {
                let Some(whole) = sx[a] else { continue };
                let len = e.saturating_sub(s);
                let mut p = Vec::new();
                if s > 0 {
                    p.push(Piece {
                        offset: 0,
                        size: s,
                        slot: ctx.slots.fresh(x, s),
                    });
                }
                let kept = match sy[a] {
                    Some(k) => k,
                    None => ctx.slots.fresh(y, len.max(1)),
                };
                p.push(Piece {
                    offset: s,
                    size: len,
                    slot: kept,
                });
                if e < shx[a] {
                    p.push(Piece {
                        offset: e,
                        size: shx[a] - e,
                        slot: ctx.slots.fresh(x, shx[a] - e),
                    });
                }
                ctx.slots.concat(whole, p);
            }
            _ => ctx.slots.equal_opt(sx[a], sy[a], "unsliced axis"),
        }
    }
    Ok(())
}

/// Pad: unpadded axes pass through; padded ones are fixed.
pub fn pad(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (shx, shy, sx, sy) = (ctx.shape(x)?, ctx.shape(y)?, ctx.axes(x)?, ctx.axes(y)?);
    if shx.len() != shy.len() {
        return Err("Pad ranks differ".into());
    }
    for a in 0..shx.len() {
        if shx[a] == shy[a] {
            ctx.slots.equal_opt(sx[a], sy[a], "unpadded axis");
        } else {
            for s in [sx[a], sy[a]].into_iter().flatten() {
                ctx.slots.fix(s, "padded axis");
            }
        }
    }
    Ok(())
}

/// Tile: axes repeated once pass through; repeated ones are fixed.
pub fn tile(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    pad(ctx, node)
}

/// Outputs that describe shapes or are generated: fixed, so nothing downstream treats them as
/// permutable units.
pub fn opaque_outputs(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let op = node.op_type.clone().unwrap_or_default();
    for o in node.output.iter().filter(|o| !o.is_empty()) {
        ctx.fix_value(o, &format!("output of {op}"));
    }
    Ok(())
}
