//! Normalisations. Each is equivariant under permutations of the normalised axes as long as its
//! affine parameters move with them; GroupNorm only under permutations that keep every channel
//! inside its group (a permutation of groups, then one within each group).

use super::{attr_int, fix_extra_outputs, input, need, norm_axis, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

/// BatchNormalization and InstanceNormalization: inputs 1.. are per-channel (axis 1).
pub fn per_channel(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    ctx.equal_all(x, y, "normalization")?;
    let sx = ctx.axes(x)?;
    let channel = sx.get(1).copied().flatten();
    for p in node.input.iter().skip(1).filter(|s| !s.is_empty()) {
        let sp = ctx.axes(p)?;
        if sp.len() != 1 {
            return Err(format!("parameter '{p}' is not 1-D"));
        }
        ctx.slots.equal_opt(sp[0], channel, "per-channel parameter");
    }
    fix_extra_outputs(ctx, node, "training-mode statistics");
    Ok(())
}

/// LayerNormalization / RMSNormalization: scale and bias cover the normalised trailing axes.
pub fn layer_norm(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    ctx.equal_all(x, y, "normalization")?;
    let sy = ctx.axes(y)?;
    let axis = norm_axis(attr_int(node, "axis").unwrap_or(-1), sy.len())?;
    for p in node.input.iter().skip(1).filter(|s| !s.is_empty()) {
        let sp = ctx.axes(p)?;
        let lead = sy
            .len()
            .checked_sub(sp.len())
            .filter(|&l| l >= axis || sp.iter().take(axis - l).all(Option::is_none))
            .ok_or_else(|| format!("parameter '{p}' does not fit the normalised axes"))?;
        for (i, s) in sp.iter().enumerate() {
            ctx.slots
                .equal_opt(*s, sy[lead + i], "normalization parameter");
        }
    }
    fix_extra_outputs(ctx, node, "normalization statistics");
    Ok(())
}

/// GroupNormalization: channels factor into (group, channel within group); scale and bias are
/// per group (opset 18) or per channel (opset 21), told apart by their size.
pub fn group_norm(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    ctx.equal_all(x, y, "normalization")?;
    let shape = ctx.shape(x)?;
    let channels = *shape
        .get(1)
        .ok_or("GroupNormalization input has rank < 2")?;
    let groups = attr_int(node, "num_groups").ok_or("num_groups missing")? as usize;
    if groups == 0 || channels % groups != 0 {
        return Err(format!(
            "{channels} channels do not split into {groups} groups"
        ));
    }
    let sx = ctx.axes(x)?;
    let Some(c) = sx[1] else { return Ok(()) };
    let (g, per_group) = if groups == 1 || groups == channels {
        (None, None)
    } else {
        let g = ctx.slots.fresh(x, groups);
        let cg = ctx.slots.fresh(x, channels / groups);
        ctx.slots.factor(c, vec![g, cg]);
        (Some(g), Some(cg))
    };
    let _ = per_group;
    for p in node.input.iter().skip(1).filter(|s| !s.is_empty()) {
        let sp = ctx.axes(p)?;
        let size = ctx.shape(p)?.iter().product::<usize>();
        let target = if size == channels {
            Some(c)
        } else if size == groups {
            if groups == 1 {
                None
            } else if groups == channels {
                Some(c)
            } else {
                g
            }
        } else {
            return Err(format!(
                "parameter '{p}' is neither per-group nor per-channel"
            ));
        };
        if sp.len() != 1 {
            return Err(format!("parameter '{p}' is not 1-D"));
        }
        ctx.slots.equal_opt(sp[0], target, "group-norm parameter");
    }
    Ok(())
}
