//! Gather: `out = data[..., indices, ...]` along `axis`. The gathered axis is indexed by data
//! (an embedding table's vocabulary, a constant head selector) and fixed; the other data axes
//! pass through, and the indices' axes become the output's middle axes.

use std::collections::HashMap;

use super::{attr_int, input, need, norm_axis, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;
use crate::symmetry::slots::SlotId;

pub fn gather(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let data = need(input(node, 0), "data")?;
    let idx = need(input(node, 1), "indices")?;
    let y = need(output(node, 0), "output")?;
    let (sd, si, sy) = (ctx.axes(data)?, ctx.axes(idx)?, ctx.axes(y)?);
    let axis = norm_axis(attr_int(node, "axis").unwrap_or(0), sd.len())?;
    if sy.len() != sd.len() - 1 + si.len() {
        return Err("Gather output rank".into());
    }
    if let Some(s) = sd[axis] {
        ctx.slots.fix(s, "gathered axis (indexed by data)");
    }
    // A part taken out of a packed projection holds its own range's units.
    let parts: HashMap<usize, SlotId> = ctx
        .unstacked
        .remove(y)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let pass = |ctx: &mut Ctx, from: Option<SlotId>, to: usize, why: &str| match parts.get(&to) {
        Some(&part) => ctx
            .slots
            .equal_opt(Some(part), sy[to], "range of a packed projection"),
        None => ctx.slots.equal_opt(from, sy[to], why),
    };
    for (a, &s) in sd.iter().enumerate().take(axis) {
        pass(ctx, s, a, "gather");
    }
    for (k, s) in si.iter().enumerate() {
        pass(ctx, *s, axis + k, "gather indices");
    }
    for (a, &s) in sd.iter().enumerate().skip(axis + 1) {
        pass(ctx, s, a - 1 + si.len(), "gather");
    }
    Ok(())
}
