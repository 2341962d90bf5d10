//! One rule per op family, and the registry that maps an op type to its rule.
//!
//! A rule reads one node and records, on the slots of its inputs and outputs, which axes share
//! units (`equal`), how an axis splits into finer ones (`factor`) or into ranges (`concat`), and
//! which axes must stay in place (`fix`). A rule must account for every axis it touches: an
//! axis it leaves unrelated is only safe when the op is genuinely indifferent to its order.
//! When a rule's premise fails (a shape or constant it needs is unknown) it returns `Err`, and
//! the caller fixes every axis of the node: a missed group costs quality, a wrong one breaks
//! the model.
//!
//! Supporting a new op is one line in [`rule_for`] (and a function where it belongs).

mod elementwise;
mod gather;
mod linear;
mod norm;
mod pool;
mod reduce;
mod shape;
mod stacked;

use std::collections::HashMap;

use crate::graph::{Graph, ShapeMap};
use crate::onnx::proto::{AttributeProto, NodeProto};

use super::slots::{SlotId, Slots};

/// What a rule returns: `Err(reason)` fixes the whole node.
pub type RuleResult = Result<(), String>;
pub type Rule = fn(&mut Ctx, &NodeProto) -> RuleResult;

/// The rule for an op in the default ONNX domain; `None` means unknown (every axis fixed).
pub fn rule_for(op: &str) -> Option<Rule> {
    Some(match op {
        // Elementwise, one data input.
        "Relu" | "Gelu" | "Erf" | "Sigmoid" | "Tanh" | "Exp" | "Log" | "Sqrt" | "Neg" | "Abs"
        | "Reciprocal" | "LeakyRelu" | "Elu" | "Selu" | "Celu" | "ThresholdedRelu"
        | "HardSigmoid" | "HardSwish" | "Softplus" | "Softsign" | "Mish" | "Sin" | "Cos"
        | "Floor" | "Ceil" | "Round" | "Sign" | "Not" | "IsNaN" | "IsInf" | "Identity" | "Cast"
        | "CastLike" | "Dropout" | "Swish" => elementwise::unary,
        // Equivariant under any permutation of any axis, including the normalised one.
        "Softmax" | "LogSoftmax" | "Hardmax" => elementwise::unary,
        // Elementwise with numpy broadcasting, every input is data.
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "Max" | "Min" | "Sum" | "Mean" | "Equal"
        | "Greater" | "Less" | "GreaterOrEqual" | "LessOrEqual" | "And" | "Or" | "Xor" | "Mod"
        | "Where" | "PRelu" | "Clip" => elementwise::broadcast,
        "Expand" => elementwise::expand,
        "Conv" => linear::conv,
        "ConvTranspose" => linear::conv_transpose,
        "Gemm" => linear::gemm,
        "MatMul" => linear::matmul,
        "BatchNormalization" | "InstanceNormalization" => norm::per_channel,
        "LayerNormalization" | "RMSNormalization" => norm::layer_norm,
        "GroupNormalization" => norm::group_norm,
        "MaxPool" | "AveragePool" | "LpPool" | "GlobalAveragePool" | "GlobalMaxPool"
        | "GlobalLpPool" | "Resize" | "Upsample" => pool::spatial,
        "ReduceMean" | "ReduceSum" | "ReduceMax" | "ReduceMin" | "ReduceProd" | "ReduceL1"
        | "ReduceL2" | "ReduceLogSum" | "ReduceLogSumExp" | "ReduceSumSquare" => reduce::reduce,
        "ArgMax" | "ArgMin" | "CumSum" | "TopK" => reduce::order_dependent,
        "Reshape" | "Flatten" | "Squeeze" | "Unsqueeze" => shape::reshape,
        "Transpose" => shape::transpose,
        "Concat" => shape::concat,
        "Split" => shape::split,
        "Slice" => shape::slice,
        "Pad" => shape::pad,
        "Tile" => shape::tile,
        "Gather" => gather::gather,
        // Values that describe shapes or are made from nothing: never data units.
        "Shape" | "Size" | "Constant" | "ConstantOfShape" | "Range" | "EyeLike"
        | "RandomNormal" | "RandomUniform" | "RandomNormalLike" | "RandomUniformLike" => {
            shape::opaque_outputs
        }
        _ => return None,
    })
}

/// What rules see: the slots, the graph, concrete shapes.
pub struct Ctx<'a, 'm> {
    pub slots: &'a mut Slots,
    pub graph: &'a Graph<'m>,
    pub shapes: &'a ShapeMap,
    /// Axes of values that take one part out of a packed projection, and the range slots
    /// they hold ([`stacked`]): the take's rule links them there instead of to its input.
    pub unstacked: &'a mut Unstacked,
}

/// Value name → `(axis, slot)` links recorded by the packed-projection reading.
pub type Unstacked = HashMap<String, Vec<(usize, SlotId)>>;

impl Ctx<'_, '_> {
    /// Shape of a value; `Err` when inference did not give one.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, String> {
        self.shapes
            .get(name)
            .cloned()
            .ok_or_else(|| format!("shape of '{name}' unknown"))
    }

    /// Slots of a value's axes (`None` for size-1 axes).
    pub fn axes(&self, name: &str) -> Result<Vec<Option<SlotId>>, String> {
        self.slots
            .of(name)
            .map(<[_]>::to_vec)
            .ok_or_else(|| format!("'{name}' has no shape"))
    }

    /// Integer contents of a constant input (initializer or Constant node).
    pub fn const_ints(&self, name: &str) -> Option<Vec<i64>> {
        self.graph.const_ints(name)
    }

    /// Marks the axes of `a` and `b` equal one by one (same rank).
    pub fn equal_all(&mut self, a: &str, b: &str, why: &str) -> RuleResult {
        let (sa, sb) = (self.axes(a)?, self.axes(b)?);
        if sa.len() != sb.len() {
            return Err(format!("'{a}' and '{b}' differ in rank"));
        }
        for (x, y) in sa.into_iter().zip(sb) {
            self.slots.equal_opt(x, y, why);
        }
        Ok(())
    }

    pub fn fix_value(&mut self, name: &str, reason: &str) {
        self.slots.fix_tensor(name, reason);
    }
}

pub fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

/// The attribute `name` of `node`, to rewrite (a widened `group` or `num_groups`).
pub fn attr_mut<'n>(node: &'n mut NodeProto, name: &str) -> Option<&'n mut AttributeProto> {
    node.attribute
        .iter_mut()
        .find(|a| a.name.as_deref() == Some(name))
}

pub fn attr_ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .map(|a| a.ints.clone())
}

/// Normalises a possibly negative axis.
pub fn norm_axis(axis: i64, rank: usize) -> Result<usize, String> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < rank)
        .ok_or_else(|| format!("axis {axis} out of range for rank {rank}"))
}

/// Input `i` of a node, if present and non-empty.
pub fn input(node: &NodeProto, i: usize) -> Option<&str> {
    node.input
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

/// Every input that is present (ONNX leaves optional inputs as empty names).
pub fn present_inputs(node: &NodeProto) -> Vec<String> {
    node.input
        .iter()
        .filter(|s| !s.is_empty())
        .cloned()
        .collect()
}

pub fn output(node: &NodeProto, i: usize) -> Option<&str> {
    node.output
        .get(i)
        .map(String::as_str)
        .filter(|s| !s.is_empty())
}

pub fn need<'n>(v: Option<&'n str>, what: &str) -> Result<&'n str, String> {
    v.ok_or_else(|| format!("missing {what}"))
}

/// Fixes every output beyond the first (masks, saved statistics, indices).
pub fn fix_extra_outputs(ctx: &mut Ctx, node: &NodeProto, reason: &str) {
    for out in node.output.iter().skip(1).filter(|o| !o.is_empty()) {
        ctx.fix_value(out, reason);
    }
}
