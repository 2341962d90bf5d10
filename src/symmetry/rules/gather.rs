//! Gather: `out = data[..., indices, ...]` along `axis`. The gathered axis is indexed by data
//! (an embedding table's vocabulary, a constant head selector) and fixed; the other data axes
//! pass through, and the indices' axes become the output's middle axes.

use super::{attr_int, input, need, norm_axis, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

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
    for a in 0..axis {
        ctx.slots.equal_opt(sd[a], sy[a], "gather");
    }
    for (k, s) in si.iter().enumerate() {
        ctx.slots.equal_opt(*s, sy[axis + k], "gather indices");
    }
    for a in axis + 1..sd.len() {
        ctx.slots.equal_opt(sd[a], sy[a - 1 + si.len()], "gather");
    }
    Ok(())
}
