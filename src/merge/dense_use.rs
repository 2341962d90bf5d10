//! Whether a group's weight tensors are used only as dense layers use them: the weight or bias
//! of a Conv with one group, a Gemm or a MatMul, or an added term. Those uses carry any change
//! of the units' basis (CCA's linear maps) or of their number (`--width`) through the weights
//! alone; a per-unit scale (BatchNorm, LayerNorm, GroupNorm parameters, layer scales) or a
//! grouped convolution does not.

use crate::graph::Graph;
use crate::symmetry::rules::attr_int;
use crate::symmetry::Group;

/// `Ok` when every consumer of every member tensor of `g` is a dense use or one of the ops in
/// `also`; else which tensor feeds what.
pub fn only_dense_use(g: &Group, graph: &Graph, also: &[&str]) -> Result<(), String> {
    for member in &g.members {
        for &(node, slot) in graph.consumers(&member.tensor) {
            let n = graph.node(node);
            let op = n.op_type.as_deref().unwrap_or("");
            let dense = match op {
                "Conv" => attr_int(n, "group").unwrap_or(1) == 1 && slot >= 1,
                "Gemm" | "MatMul" | "Add" | "Sub" => true,
                _ => also.contains(&op),
            };
            if !dense {
                let grouped = if op == "Conv" { " (grouped)" } else { "" };
                return Err(format!("'{}' feeds {op}{grouped}", member.tensor));
            }
        }
    }
    Ok(())
}
