"""One small model per symmetry rule family, with the number of unit groups discovery must
find, written with the official `onnx` package.

usage: make_rule_models.py OUT_DIR   (writes OUT_DIR/<name>.onnx and OUT_DIR/expected.json)
"""
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto as TP, helper as h, numpy_helper as nh

rng = np.random.default_rng(1)
MODELS = {}


def w(*shape, scale=0.5):
    return rng.standard_normal(shape).astype(np.float32) * scale


def model(name, groups, nodes, inputs, outputs, inits, opset=17, blocked=0):
    """Registers a model: `groups` unit groups expected, `blocked` of them block-structured."""
    g = h.make_graph(nodes, name, inputs, outputs, [nh.from_array(a, n) for n, a in inits.items()])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), h.make_opsetid("my.domain", 1)])
    m.ir_version = 10 if opset >= 21 else 8
    MODELS[name] = (m, {"groups": groups, "blocked": blocked})


def fin(name, *shape):
    return h.make_tensor_value_info(name, TP.FLOAT, list(shape))


IMG = fin("x", "N", 3, 6, 6)
Y = lambda *s: fin("y", "N", *s)  # noqa: E731

# Conv chain into a classifier through pooling and Flatten.
model("conv_chain", 2, [
    h.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["c1"], ["r1"]),
    h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["c2"], ["r2"]),
    h.make_node("GlobalAveragePool", ["r2"], ["p"]),
    h.make_node("Flatten", ["p"], ["f"]),
    h.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1),
], [IMG], [Y(4)], {"w1": w(8, 3, 3, 3), "b1": w(8), "w2": w(6, 8, 3, 3), "wf": w(4, 6), "bf": w(4)})

# Gemm without transB, MatMul with an initializer, and a residual Add.
model("residual_mlp", 2, [
    h.make_node("Gemm", ["v", "w1", "b1"], ["h"]),
    h.make_node("MatMul", ["h", "w2"], ["m"]),
    h.make_node("Tanh", ["m"], ["t"]),
    h.make_node("MatMul", ["t", "w3"], ["u"]),
    h.make_node("Add", ["h", "u"], ["s"]),
    h.make_node("Gemm", ["s", "w4"], ["y"], transB=1),
], [fin("v", "N", 5)], [Y(3)], {"w1": w(5, 16), "b1": w(16), "w2": w(16, 12), "w3": w(12, 16), "w4": w(3, 16)})

# BatchNorm and PRelu with per-channel parameters, then a Flatten of a 6x6 map into a Gemm.
model("bn_prelu_flatten", 1, [
    h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node("BatchNormalization", ["c1", "s", "b", "mu", "var"], ["bn"]),
    h.make_node("PRelu", ["bn", "slope"], ["a"]),
    h.make_node("Flatten", ["a"], ["f"]),
    h.make_node("Gemm", ["f", "wf"], ["y"], transB=1),
], [IMG], [Y(4)], {"w1": w(4, 3, 3, 3), "s": w(4) + 1, "b": w(4), "mu": w(4), "var": np.abs(w(4)) + 0.5,
                   "slope": w(4, 1, 1), "wf": w(4, 4 * 36)})

# LayerNormalization op and the decomposed form, Softmax over the unit axis.
model("layernorm", 2, [
    h.make_node("MatMul", ["v", "w1"], ["a"]),
    h.make_node("LayerNormalization", ["a", "g1", "b1"], ["n1"], axis=-1),
    h.make_node("MatMul", ["n1", "w2"], ["b"]),
    h.make_node("ReduceMean", ["b"], ["mean"], axes=[-1]),
    h.make_node("Sub", ["b", "mean"], ["d"]),
    h.make_node("Mul", ["d", "d"], ["d2"]),
    h.make_node("ReduceMean", ["d2"], ["var"], axes=[-1]),
    h.make_node("Add", ["var", "eps"], ["ve"]),
    h.make_node("Sqrt", ["ve"], ["sd"]),
    h.make_node("Div", ["d", "sd"], ["n2"]),
    h.make_node("Mul", ["n2", "g2"], ["n3"]),
    h.make_node("Softmax", ["n3"], ["sm"], axis=-1),
    h.make_node("MatMul", ["sm", "w3"], ["y"]),
], [fin("v", "N", 5)], [Y(3)], {"w1": w(5, 8), "g1": w(8) + 1, "b1": w(8), "w2": w(8, 6), "eps": np.array([1e-5], np.float32),
                                "g2": w(6) + 1, "w3": w(6, 3)})

# GroupNormalization op, opset 18 (per-group scale) and 21 (per-channel scale).
for opset, per in [(18, 2), (21, 8)]:
    model(f"groupnorm_op{opset}", 1, [
        h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        h.make_node("GroupNormalization", ["c1", "gs", "gb"], ["gn"], num_groups=2),
        h.make_node("Relu", ["gn"], ["r"]),
        h.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
    ], [IMG], [fin("y", "N", 5, 6, 6)], {"w1": w(8, 3, 3, 3), "gs": w(per) + 1, "gb": w(per), "w2": w(5, 8, 3, 3)},
        opset=opset, blocked=1)

# GroupNorm as PyTorch exports it: Reshape → InstanceNormalization → Reshape → Mul → Add.
model("groupnorm_instancenorm", 1, [
    h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node("Reshape", ["c1", "s1"], ["rs"]),
    h.make_node("InstanceNormalization", ["rs", "ones", "zeros"], ["inn"]),
    h.make_node("Shape", ["c1"], ["shp"]),
    h.make_node("Reshape", ["inn", "shp"], ["back"]),
    h.make_node("Mul", ["back", "gamma"], ["sc"]),
    h.make_node("Add", ["sc", "beta"], ["gn"]),
    h.make_node("Relu", ["gn"], ["r"]),
    h.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1]),
], [IMG], [fin("y", "N", 5, 6, 6)], {"w1": w(8, 3, 3, 3), "s1": np.array([0, 2, -1], np.int64),
                                     "ones": np.ones(2, np.float32), "zeros": np.zeros(2, np.float32),
                                     "gamma": w(8, 1, 1) + 1, "beta": w(8, 1, 1), "w2": w(5, 8, 3, 3)}, blocked=1)

# Concat and Split on the channel axis.
model("concat_split", 4, [
    h.make_node("Conv", ["x", "wa"], ["a"], pads=[1, 1, 1, 1]),
    h.make_node("Conv", ["x", "wb"], ["b"], pads=[1, 1, 1, 1]),
    h.make_node("Concat", ["a", "b"], ["ab"], axis=1),
    h.make_node("Relu", ["ab"], ["r"]),
    h.make_node("Conv", ["r", "wc"], ["c"], pads=[1, 1, 1, 1]),
    h.make_node("Split", ["c", "sp"], ["c1", "c2"], axis=1),
    h.make_node("Sigmoid", ["c1"], ["s1"]),
    h.make_node("Conv", ["s1", "wd"], ["d1"]),
    h.make_node("Conv", ["c2", "we"], ["d2"]),
    h.make_node("Add", ["d1", "d2"], ["y"]),
], [IMG], [fin("y", "N", 2, 6, 6)], {"wa": w(4, 3, 3, 3), "wb": w(5, 3, 3, 3), "wc": w(7, 9, 3, 3), "sp": np.array([3, 4], np.int64),
                                     "wd": w(2, 3, 1, 1), "we": w(2, 4, 1, 1)}, opset=17)

# Multi-head attention with a packed QKV projection split by Slice.
T, D, H = 4, 8, 2
hd = D // H


def heads(src, dst):
    return [
        h.make_node("Reshape", [src, "hshape"], [dst + "_r"]),
        h.make_node("Transpose", [dst + "_r"], [dst], perm=[0, 2, 1, 3]),
    ]


def attend():
    """Unscaled softmax attention of heads `qh`, `kh`, `vh` ([N, H, T, hd]) and the output
    projection to `y`."""
    return [
        h.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2]),
        h.make_node("MatMul", ["qh", "kt"], ["sc"]),
        h.make_node("Softmax", ["sc"], ["p"], axis=-1),
        h.make_node("MatMul", ["p", "vh"], ["o"]),
        h.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        h.make_node("Reshape", ["ot", "dshape"], ["om"]),
        h.make_node("MatMul", ["om", "wo"], ["y"]),
    ]


model("attention_packed_qkv", 2, [
    h.make_node("MatMul", ["t", "wqkv"], ["qkv"]),
    h.make_node("Slice", ["qkv", "s0", "s1", "ax"], ["q"]),
    h.make_node("Slice", ["qkv", "s1", "s2", "ax"], ["k"]),
    h.make_node("Slice", ["qkv", "s2", "s3", "ax"], ["v"]),
    *heads("q", "qh"), *heads("k", "kh"), *heads("v", "vh"),
    *attend(),
], [fin("t", "N", T, 6)], [fin("y", "N", T, 5)], {
    "wqkv": w(6, 3 * D), "s0": np.array([0], np.int64), "s1": np.array([D], np.int64), "s2": np.array([2 * D], np.int64),
    "s3": np.array([3 * D], np.int64), "ax": np.array([2], np.int64), "hshape": np.array([0, 0, H, hd], np.int64),
    "dshape": np.array([0, 0, D], np.int64), "wo": w(D, 5)}, blocked=2)

# The same attention, packed the way timm and nn.MultiheadAttention export it: the packed
# output is reshaped to stack Q, K and V on an axis of their own, moved to the front, and taken
# apart by constant Gathers (timm's `qkv[0]`) or by a Split into ones and Squeezes (`unbind`).
# Q/K and V/O must still come out as two blocked groups.
def stacked_attention(name, take):
    model(name, 2, [
        h.make_node("MatMul", ["t", "wqkv"], ["qkv"]),
        h.make_node("Reshape", ["qkv", "sshape"], ["st"]),
        h.make_node("Transpose", ["st"], ["stt"], perm=[2, 0, 3, 1, 4]),
        *take,
        *attend(),
    ], [fin("t", "N", T, 6)], [fin("y", "N", T, 5)], {
        "wqkv": w(6, 3 * D), "sshape": np.array([0, 0, 3, H, hd], np.int64),
        "i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "i2": np.array(-1, np.int64),
        "ones": np.array([1, 1, 1], np.int64), "ax0": np.array([0], np.int64),
        "dshape": np.array([0, 0, D], np.int64), "wo": w(D, 5)}, blocked=2)


stacked_attention("attention_stacked_gather", [
    h.make_node("Gather", ["stt", "i0"], ["qh"], axis=0),
    h.make_node("Gather", ["stt", "i1"], ["kh"], axis=0),
    h.make_node("Gather", ["stt", "i2"], ["vh"], axis=0),
])
stacked_attention("attention_stacked_split", [
    h.make_node("Split", ["stt", "ones"], ["q1", "k1", "v1"], axis=0),
    h.make_node("Squeeze", ["q1", "ax0"], ["qh"]),
    h.make_node("Squeeze", ["k1", "ax0"], ["kh"]),
    h.make_node("Squeeze", ["v1", "ax0"], ["vh"]),
])

# Embedding lookup tied to the output projection.
model("tied_embedding", 2, [
    h.make_node("Gather", ["emb", "ids"], ["e"]),
    h.make_node("MatMul", ["e", "w1"], ["a"]),
    h.make_node("Relu", ["a"], ["r"]),
    h.make_node("MatMul", ["r", "w2"], ["b"]),
    h.make_node("Gemm", ["b", "emb"], ["y"], transB=1),
], [h.make_tensor_value_info("ids", TP.INT64, ["N"])], [fin("y", "N", 11)],
    {"emb": w(11, 6), "w1": w(6, 9), "w2": w(9, 6)})

# Depthwise and grouped convolutions.
model("depthwise_grouped", 2, [
    h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["c1"], ["r1"]),
    h.make_node("Conv", ["r1", "wd"], ["dw"], group=8, pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["dw"], ["r2"]),
    h.make_node("Conv", ["r2", "wg"], ["g"], group=2, pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["g"], ["r3"]),
    h.make_node("Conv", ["r3", "w3"], ["y"]),
], [IMG], [fin("y", "N", 3, 6, 6)], {"w1": w(8, 3, 3, 3), "wd": w(8, 1, 3, 3), "wg": w(6, 4, 3, 3), "w3": w(3, 6, 1, 1)},
    blocked=2)

# An op without a rule (custom domain) between two convs: their shared axis stays fixed.
model("unknown_op", 1, [
    h.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
    h.make_node("Relu", ["c1"], ["r1"]),
    h.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
    h.make_node("Mystery", ["c2"], ["m"], domain="my.domain"),
    h.make_node("Conv", ["m", "w3"], ["y"]),
], [IMG], [fin("y", "N", 2, 6, 6)], {"w1": w(4, 3, 3, 3), "w2": w(5, 4, 3, 3), "w3": w(2, 5, 1, 1)})

if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    expected = {}
    for name, (m, exp) in MODELS.items():
        # The custom op has no schema; opset-18 GroupNormalization is flagged deprecated.
        if name not in ("unknown_op", "groupnorm_op18"):
            onnx.checker.check_model(m, full_check=True)
        onnx.save_model(m, os.path.join(out, name + ".onnx"))
        expected[name] = exp
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
