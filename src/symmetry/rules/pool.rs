//! Pooling and resizing: batch and channel axes pass through, spatial positions are fixed.

use super::{fix_extra_outputs, input, need, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

pub fn spatial(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (sx, sy) = (ctx.axes(x)?, ctx.axes(y)?);
    if sx.len() != sy.len() || sx.len() < 2 {
        return Err("pooling ranks differ".into());
    }
    ctx.slots.equal_opt(sx[0], sy[0], "batch");
    ctx.slots.equal_opt(sx[1], sy[1], "channel");
    for s in sx[2..].iter().chain(&sy[2..]).flatten() {
        ctx.slots.fix(*s, "spatial position");
    }
    fix_extra_outputs(ctx, node, "pooling indices");
    Ok(())
}
