//! Elementwise ops: every axis passes through; with broadcasting, each input axis of the
//! output's size joins the output axis it is aligned with (numpy rules: right-aligned).

use super::{fix_extra_outputs, input, need, output, present_inputs, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

pub fn unary(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    ctx.equal_all(x, y, "elementwise")?;
    fix_extra_outputs(ctx, node, "secondary output (mask/statistics)");
    Ok(())
}

/// Every non-empty input is broadcast against the output.
pub fn broadcast(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let y = need(output(node, 0), "output")?;
    let inputs: Vec<String> = present_inputs(node);
    for x in &inputs {
        broadcast_one(ctx, x, y)?;
    }
    Ok(())
}

/// `Expand`: input 0 broadcast to the output; input 1 is a shape.
pub fn expand(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    broadcast_one(ctx, x, y)
}

fn broadcast_one(ctx: &mut Ctx, x: &str, y: &str) -> RuleResult {
    let (sx, sy) = (ctx.axes(x)?, ctx.axes(y)?);
    if sx.len() > sy.len() {
        return Err(format!("'{x}' has a higher rank than the result '{y}'"));
    }
    let lead = sy.len() - sx.len();
    for (i, a) in sx.iter().enumerate() {
        ctx.slots.equal_opt(*a, sy[lead + i], "broadcast");
    }
    Ok(())
}
