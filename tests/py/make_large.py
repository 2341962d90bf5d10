"""Large models for the opt-in scale tests (tests/large.rs), written with onnx.helper and numpy
only, random weights, two seeds per pair.

usage: make_large.py vit-b OUT_DIR     ViT-B/16 sized: 12 blocks, d 768, 12 heads, MLP 3072,
                                        224x224 input, ~86 M parameters (~345 MB per model)
       make_large.py vit-l OUT_DIR     ViT-L/16 sized: 24 blocks, d 1024, 16 heads, MLP 4096,
                                        ~304 M parameters (~1.2 GB per model)
       make_large.py wide-conv OUT_DIR  > 2 GiB per model: 12 Conv layers (11 of 1024->1024 7x7) on 8x8
                                        maps, saved with external data
Each writes <kind>_a.onnx, <kind>_b.onnx and <kind>_calib.npz (input `input`).
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


VIT_SIZES = {
    # d, heads, MLP, depth
    "vit-b": (768, 12, 3072, 12),
    "vit-l": (1024, 16, 4096, 24),
}


def vit(seed, kind):
    rng = np.random.default_rng(seed)
    (d, heads, mlp, depth), patch, image = VIT_SIZES[kind], 16, 224
    tokens = (image // patch) ** 2 + 1
    inits, nodes = [], []

    def w(name, *shape, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(shape[0] if len(shape) > 1 else 1)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def c(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def n(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def ln(x, p):
        g = w(p + ".g", d, scale=0.0)
        inits[-1] = numpy_helper.from_array(np.ones(d, np.float32) + 0.1 * rng.standard_normal(d).astype(np.float32), g)
        b = w(p + ".b", d, scale=0.1)
        return n("LayerNormalization", [x, g, b], p + ".out", axis=-1, epsilon=1e-6)

    def linear(x, p, i, o):
        y = n("MatMul", [x, w(p + ".w", i, o)], p + ".mm")
        return n("Add", [y, w(p + ".bias", o, scale=0.02)], p + ".out")

    x = n("Conv", ["input", w("patch.w", d, 3, patch, patch, scale=1 / np.sqrt(3 * patch * patch)), w("patch.b", d, scale=0.02)],
          "patch.conv", strides=[patch, patch])
    x = n("Reshape", [x, c("shape.flat", np.array([0, d, -1], np.int64))], "patch.flat")
    x = n("Transpose", [x], "patch.tokens", perm=[0, 2, 1])
    cls = n("Expand", [w("cls", 1, 1, d, scale=0.02), n("Concat", [n("Slice", [n("Shape", [x], "shape.x"),
            c("s0", np.array([0], np.int64)), c("s1", np.array([1], np.int64))], "shape.batch"),
            c("shape.cls", np.array([1, d], np.int64))], "shape.expand", axis=0)], "cls.batch")
    x = n("Concat", [cls, x], "tokens", axis=1)
    x = n("Add", [x, w("pos", 1, tokens, d, scale=0.02)], "embed")
    hd = d // heads
    split_shape = c("shape.heads", np.array([0, 0, heads, hd], np.int64))
    merge_shape = c("shape.merge", np.array([0, 0, d], np.int64))
    scale = c("attn.scale", np.array(1 / np.sqrt(hd), np.float32))
    for k in range(depth):
        p = f"block{k}"
        h = ln(x, p + ".ln1")
        q = n("Transpose", [n("Reshape", [linear(h, p + ".q", d, d), split_shape], p + ".q.h")], p + ".q.t", perm=[0, 2, 1, 3])
        kk = n("Transpose", [n("Reshape", [linear(h, p + ".k", d, d), split_shape], p + ".k.h")], p + ".k.t", perm=[0, 2, 3, 1])
        v = n("Transpose", [n("Reshape", [linear(h, p + ".v", d, d), split_shape], p + ".v.h")], p + ".v.t", perm=[0, 2, 1, 3])
        a = n("Softmax", [n("Mul", [n("MatMul", [q, kk], p + ".qk"), scale], p + ".qk.s")], p + ".attn", axis=-1)
        o = n("Transpose", [n("MatMul", [a, v], p + ".av")], p + ".av.t", perm=[0, 2, 1, 3])
        o = linear(n("Reshape", [o, merge_shape], p + ".av.m"), p + ".proj", d, d)
        x = n("Add", [x, o], p + ".res1")
        h = ln(x, p + ".ln2")
        h = n("Relu", [linear(h, p + ".fc1", d, mlp)], p + ".act")
        x = n("Add", [x, linear(h, p + ".fc2", mlp, d)], p + ".res2")
    x = ln(x, "final.ln")
    first = n("Gather", [x, c("zero", np.array(0, np.int64))], "cls.out", axis=1)
    logits = linear(first, "head", d, 10)
    graph = helper.make_graph(
        nodes, kind.replace("-", "_"),
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, image, image])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["N", 10])], inits)
    # IR 9 (opset 17's own): the onnx package's default IR is newer than ONNX Runtime 1.31 reads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def wide_conv(seed):
    rng = np.random.default_rng(seed)
    c, layers, k = 1024, 12, 7
    inits, nodes = [], []
    x = "input"
    cin = 3
    for i in range(layers):
        wname, bname = f"conv{i}.w", f"conv{i}.b"
        w = rng.standard_normal((c, cin, k, k), dtype=np.float32) * np.float32(1 / np.sqrt(cin * k * k))
        inits.append(numpy_helper.from_array(w, wname))
        inits.append(numpy_helper.from_array((0.02 * rng.standard_normal(c)).astype(np.float32), bname))
        nodes.append(helper.make_node("Conv", [x, wname, bname], [f"conv{i}"], name=f"conv{i}", pads=[3, 3, 3, 3]))
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}"))
        x, cin = f"relu{i}", c
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flat"))
    inits.append(numpy_helper.from_array((rng.standard_normal((10, c)) / 32).astype(np.float32), "head.w"))
    inits.append(numpy_helper.from_array(np.zeros(10, np.float32), "head.b"))
    nodes.append(helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["logits"], name="head", transB=1))
    graph = helper.make_graph(
        nodes, "wide_conv",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    # IR 9, as the ViTs: onnx 1.23's default (IR 14) is newer than ONNX Runtime 1.31 reads.
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def main():
    kind, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    if kind in VIT_SIZES:
        for tag, seed in (("a", 1), ("b", 2)):
            onnx.save(vit(seed, kind), os.path.join(out, f"{kind}_{tag}.onnx"))
        np.savez(os.path.join(out, f"{kind}_calib.npz"), input=rng.standard_normal((8, 3, 224, 224)).astype(np.float32))
    elif kind == "wide-conv":
        for tag, seed in (("a", 1), ("b", 2)):
            onnx.save(wide_conv(seed), os.path.join(out, f"wide-conv_{tag}.onnx"),
                      save_as_external_data=True, all_tensors_to_one_file=True,
                      location=f"wide-conv_{tag}.onnx.data", size_threshold=1024)
        np.savez(os.path.join(out, "wide-conv_calib.npz"), input=rng.standard_normal((8, 3, 8, 8)).astype(np.float32))
    else:
        sys.exit(f"unknown kind {kind}")


if __name__ == "__main__":
    main()
