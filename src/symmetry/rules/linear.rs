//! The ops that cut a chain: Conv, ConvTranspose, Gemm and MatMul. Their output unit axis is
//! one group and their input unit axis another; the weight carries both.

use super::{attr_int, input, need, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

const WINDOW: &str = "convolution window / spatial position";

pub fn conv(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let w = need(input(node, 1), "weight")?;
    let y = need(output(node, 0), "output")?;
    let (sx, sw, sy) = (ctx.axes(x)?, ctx.axes(w)?, ctx.axes(y)?);
    let (shx, shw) = (ctx.shape(x)?, ctx.shape(w)?);
    if sx.len() < 3 || sw.len() != sx.len() || sy.len() != sx.len() {
        return Err("unexpected Conv ranks".into());
    }
    for s in sx[2..].iter().chain(&sy[2..]).chain(&sw[2..]).flatten() {
        ctx.slots.fix(*s, WINDOW);
    }
    ctx.slots.equal_opt(sx[0], sy[0], "batch");
    // Output channels: Y axis 1 = W axis 0 = bias.
    ctx.slots.equal_opt(sy[1], sw[0], "conv output channel");
    if let Some(b) = input(node, 2) {
        let sb = ctx.axes(b)?;
        ctx.slots
            .equal_opt(sb.first().copied().flatten(), sw[0], "conv bias");
    }
    let groups = attr_int(node, "group").unwrap_or(1).max(1) as usize;
    let (cin, cout, cin_g) = (shx[1], shw[0], shw[1]);
    if groups == 1 {
        ctx.slots.equal_opt(sx[1], sw[1], "conv input channel");
    } else if cin_g == 1 && groups == cin {
        // Depthwise: output channel c·m + j reads input channel c only.
        let m = cout / cin.max(1);
        match (sx[1], sy[1], m) {
            (a, b, 1) => ctx.slots.equal_opt(a, b, "depthwise channel"),
            (Some(a), Some(b), m) => {
                let j = ctx.slots.fresh(y, m);
                ctx.slots.fix(j, "depthwise channel multiplier");
                ctx.slots.factor(b, vec![a, j]);
            }
            _ => {}
        }
    } else {
        // Grouped: channels are (group, index within group) on both sides, the group index
        // shared; the within-group input index is W's axis 1.
        if cin % groups != 0 || cout % groups != 0 {
            return Err(format!("channels not divisible by group={groups}"));
        }
        let (Some(xc), Some(yc)) = (sx[1], sy[1]) else {
            return Err("grouped conv on size-1 channels".into());
        };
        let g = ctx.slots.fresh(y, groups);
        let ci = ctx.slots.fresh(x, cin / groups);
        let co = ctx.slots.fresh(y, cout / groups);
        ctx.slots.factor(xc, vec![g, ci]);
        ctx.slots.factor(yc, vec![g, co]);
        if let Some(wi) = sw[1] {
            ctx.slots.equal(wi, ci, "grouped conv input channel");
        }
    }
    Ok(())
}

pub fn conv_transpose(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    if attr_int(node, "group").unwrap_or(1) != 1 {
        return Err("grouped ConvTranspose is not supported".into());
    }
    let x = need(input(node, 0), "input")?;
    let w = need(input(node, 1), "weight")?;
    let y = need(output(node, 0), "output")?;
    let (sx, sw, sy) = (ctx.axes(x)?, ctx.axes(w)?, ctx.axes(y)?);
    if sx.len() < 3 || sw.len() != sx.len() || sy.len() != sx.len() {
        return Err("unexpected ConvTranspose ranks".into());
    }
    for s in sx[2..].iter().chain(&sy[2..]).chain(&sw[2..]).flatten() {
        ctx.slots.fix(*s, WINDOW);
    }
    ctx.slots.equal_opt(sx[0], sy[0], "batch");
    ctx.slots
        .equal_opt(sx[1], sw[0], "conv-transpose input channel");
    ctx.slots
        .equal_opt(sy[1], sw[1], "conv-transpose output channel");
    if let Some(b) = input(node, 2) {
        let sb = ctx.axes(b)?;
        ctx.slots
            .equal_opt(sb.first().copied().flatten(), sw[1], "conv-transpose bias");
    }
    Ok(())
}

pub fn gemm(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let a = need(input(node, 0), "A")?;
    let b = need(input(node, 1), "B")?;
    let y = need(output(node, 0), "output")?;
    let (sa, sb, sy) = (ctx.axes(a)?, ctx.axes(b)?, ctx.axes(y)?);
    if sa.len() != 2 || sb.len() != 2 || sy.len() != 2 {
        return Err("Gemm operands must be 2-D".into());
    }
    let ta = attr_int(node, "transA").unwrap_or(0) != 0;
    let tb = attr_int(node, "transB").unwrap_or(0) != 0;
    let (am, ak) = if ta { (sa[1], sa[0]) } else { (sa[0], sa[1]) };
    let (bk, bn) = if tb { (sb[1], sb[0]) } else { (sb[0], sb[1]) };
    ctx.slots.equal_opt(am, sy[0], "Gemm rows");
    ctx.slots.equal_opt(ak, bk, "Gemm contraction");
    ctx.slots.equal_opt(bn, sy[1], "Gemm output unit");
    if let Some(c) = input(node, 2) {
        let sc = ctx.axes(c)?;
        let lead = 2usize.checked_sub(sc.len()).ok_or("Gemm C has rank > 2")?;
        for (i, s) in sc.iter().enumerate() {
            ctx.slots.equal_opt(*s, sy[lead + i], "Gemm bias");
        }
    }
    Ok(())
}

/// numpy matmul: the last axis of A contracts with the second-last of B; leading axes
/// broadcast. Covers weight products and attention's batched products alike.
pub fn matmul(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let a = need(input(node, 0), "A")?;
    let b = need(input(node, 1), "B")?;
    let y = need(output(node, 0), "output")?;
    let (sa, sb, sy) = (ctx.axes(a)?, ctx.axes(b)?, ctx.axes(y)?);
    let (ra, rb, ry) = (sa.len(), sb.len(), sy.len());
    if ra == 0 || rb == 0 {
        return Err("MatMul of a scalar".into());
    }
    let ak = sa[ra - 1];
    let bk = if rb == 1 { sb[0] } else { sb[rb - 2] };
    ctx.slots.equal_opt(ak, bk, "MatMul contraction");
    // Output unit axes.
    let mut y_batch_end = ry;
    if rb >= 2 {
        ctx.slots
            .equal_opt(sb[rb - 1], sy[ry - 1], "MatMul output unit");
        y_batch_end -= 1;
    }
    if ra >= 2 {
        ctx.slots
            .equal_opt(sa[ra - 2], sy[y_batch_end - 1], "MatMul rows");
        y_batch_end -= 1;
    }
    // Batch axes, right-aligned.
    for (s, batch) in [(&sa, ra.saturating_sub(2)), (&sb, rb.saturating_sub(2))] {
        let lead = y_batch_end
            .checked_sub(batch)
            .ok_or("MatMul batch ranks inconsistent")?;
        for i in 0..batch {
            ctx.slots.equal_opt(s[i], sy[lead + i], "MatMul batch");
        }
    }
    Ok(())
}
