//! Whether a group's weight tensors are used only as dense layers use them: the weight or bias
//! of a Conv with one group, a Gemm or a MatMul, or an added term. Those uses carry any change
//! of the units' basis (CCA's linear maps) or of their number (`--width`) through the weights
//! alone; a per-unit scale (BatchNorm, LayerNorm, GroupNorm parameters, layer scales) or a
//! grouped convolution does not.

use crate::graph::Graph;
use crate::onnx::proto::NodeProto;
use crate::symmetry::rules::attr_int;
use crate::symmetry::Group;

/// In `also`: a depthwise convolution (one filter per channel) counts as a dense use; its
/// `group` attribute then has to follow the width ([`set_depthwise_groups`]).
pub const DEPTHWISE: &str = "depthwise Conv";

/// A Conv with one filter per channel: weight `[C, 1, k…]` and `group` = C > 1.
pub fn is_depthwise(n: &NodeProto, graph: &Graph) -> bool {
    let group = attr_int(n, "group").unwrap_or(1);
    let dims = n
        .input
        .get(1)
        .and_then(|w| graph.initializer(w))
        .map(|t| t.dims.clone())
        .unwrap_or_default();
    group > 1 && dims.len() >= 3 && dims[0] == group && dims[1] == 1
}

/// `Ok` when every consumer of every member tensor of `g` is a dense use or one of the ops in
/// `also`; else which tensor feeds what.
pub fn only_dense_use(g: &Group, graph: &Graph, also: &[&str]) -> Result<(), String> {
    g.members
        .iter()
        .try_for_each(|member| dense_uses(&member.tensor, graph, also))
}

/// Every consumer of `value` is a dense use; an Identity (how exporters share one parameter
/// between layers) passes its value on, so its consumers are checked in its place.
fn dense_uses(value: &str, graph: &Graph, also: &[&str]) -> Result<(), String> {
    for &(node, slot) in graph.consumers(value) {
        let n = graph.node(node);
        let op = n.op_type.as_deref().unwrap_or("");
        let dense = match op {
            "Identity" => {
                for out in &n.output {
                    dense_uses(out, graph, also)?;
                }
                true
            }
            "Conv" if also.contains(&DEPTHWISE) && is_depthwise(n, graph) => true,
            "Conv" => attr_int(n, "group").unwrap_or(1) == 1 && slot >= 1,
            "Gemm" | "MatMul" | "Add" | "Sub" => true,
            _ => also.contains(&op),
        };
        if !dense {
            let grouped = if op == "Conv" { " (grouped)" } else { "" };
            return Err(format!("'{value}' feeds {op}{grouped}"));
        }
    }
    Ok(())
}
