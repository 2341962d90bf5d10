//! Reductions: a reduced axis may be permuted freely (sums, means, extrema and norms do not see
//! the order); kept axes pass through. Order-dependent ops fix their axis.

use super::{attr_int, attr_ints, input, need, norm_axis, output, Ctx, RuleResult};
use crate::onnx::proto::NodeProto;

pub fn reduce(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let y = need(output(node, 0), "output")?;
    let (sx, sy) = (ctx.axes(x)?, ctx.axes(y)?);
    let rank = sx.len();
    let axes = match attr_ints(node, "axes") {
        Some(a) => a,
        None => match input(node, 1) {
            Some(name) => ctx
                .const_ints(name)
                .ok_or("reduction axes are not a constant")?,
            None => vec![],
        },
    };
    let reduced: Vec<usize> = if axes.is_empty() {
        if attr_int(node, "noop_with_empty_axes").unwrap_or(0) != 0 {
            vec![]
        } else {
            (0..rank).collect()
        }
    } else {
        axes.iter()
            .map(|&a| norm_axis(a, rank))
            .collect::<Result<_, _>>()?
    };
    let keep = attr_int(node, "keepdims").unwrap_or(1) != 0;
    let mut out_axis = 0;
    for (i, s) in sx.iter().enumerate() {
        if reduced.contains(&i) {
            if keep {
                out_axis += 1;
            }
            continue;
        }
        let t = *sy.get(out_axis).ok_or("reduction output rank")?;
        ctx.slots.equal_opt(*s, t, "kept axis");
        out_axis += 1;
    }
    Ok(())
}

/// ArgMax/ArgMin/CumSum/TopK: the result depends on the order along `axis`.
pub fn order_dependent(ctx: &mut Ctx, node: &NodeProto) -> RuleResult {
    let x = need(input(node, 0), "input")?;
    let sx = ctx.axes(x)?;
    let axis = match attr_int(node, "axis") {
        Some(a) => norm_axis(a, sx.len())?,
        None if node.op_type.as_deref() == Some("CumSum") => {
            let a = input(node, 1).and_then(|n| ctx.const_ints(n));
            norm_axis(
                *a.and_then(|v| v.first().copied()).as_ref().ok_or("axis")?,
                sx.len(),
            )?
        }
        None => 0,
    };
    let op = node.op_type.clone().unwrap_or_default();
    for o in node.output.iter().filter(|o| !o.is_empty()) {
        let so = ctx.axes(o)?;
        if so.len() != sx.len() {
            return Err(format!("{op} without kept dimensions"));
        }
        for (i, (a, b)) in sx.iter().zip(&so).enumerate() {
            if i == axis {
                for s in [a, b].into_iter().flatten() {
                    ctx.slots
                        .fix(*s, &format!("{op} depends on the order along this axis"));
                }
            } else {
                ctx.slots.equal_opt(*a, *b, "kept axis");
            }
        }
    }
    Ok(())
}
