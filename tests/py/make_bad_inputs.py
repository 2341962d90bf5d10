"""Builds the models and data of the bad-input matrix (tests/bad_inputs.rs) with the official
`onnx` package: a small MLP pair and variants of it that are each wrong, or unusual, in one way.

usage: make_bad_inputs.py OUT_DIR

  a.onnx, b.onnx          x[N,8] -> Gemm(16) -> Relu -> Gemm(16) -> Relu -> Gemm(4): the pair
  wide_b.onnx             B with 12 hidden units in layer 1 (another architecture)
  opset13_b.onnx          B importing opset 13 instead of 17
  ext_a.onnx              A with its weights in ext_a.weights (the test copies it alone)
  ext_x_a.onnx            A with its weights in ext_x.onnx.data
  dead_a.onnx, dead_b     A/B with constant hidden units: 4 dead (always 0 after Relu) and 2
                          stuck at 1 in layer 1, 3 dead in layer 2
  unknown_a.onnx, _b      the second Relu replaced by Atan (an ONNX op without a symmetry rule)
  custom_a.onnx, _b       ... by com.microsoft::FastGelu (a custom-domain op tract runs)
  mystery_a.onnx, _b      ... by my.domain::Mystery (a custom op no backend can run)
  if_a.onnx, if_b         the second Relu inside both branches of an If
  loop_a.onnx, loop_b     the second Relu inside the body of a Loop (one iteration)
  classes5_b.onnx         B with 5 classes
  dangling_output.onnx    a graph output no node produces
  bad_perm.onnx           a Transpose whose perm repeats an axis
  cycle.onnx              two nodes feeding each other
  calib.npz               x: float32 [64, 8], labels: int64 [64]
  shape.npz, f64.npz, int.npz, few_labels.npz, nan.npz, empty.npz: the same, wrong or odd
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(7)
F = TensorProto.FLOAT


def weights(h1=16, h2=16, seed=0, classes=4):
    r = np.random.default_rng(seed)
    return {
        "w1": r.standard_normal((h1, 8)).astype(np.float32),
        "b1": r.standard_normal(h1).astype(np.float32) * 0.1,
        "w2": r.standard_normal((h2, h1)).astype(np.float32) / 4,
        "b2": r.standard_normal(h2).astype(np.float32) * 0.1,
        "w3": r.standard_normal((classes, h2)).astype(np.float32) / 4,
        "b3": r.standard_normal(classes).astype(np.float32) * 0.1,
    }


def act2(kind):
    """The second activation (h2 -> r2) and the extra opset imports it needs."""
    if kind == "relu":
        return [helper.make_node("Relu", ["h2"], ["r2"], name="relu2")], []
    if kind == "atan":
        return [helper.make_node("Atan", ["h2"], ["r2"], name="atan2")], []
    if kind == "fastgelu":
        return ([helper.make_node("FastGelu", ["h2"], ["r2"], name="gelu2", domain="com.microsoft")],
                [helper.make_opsetid("com.microsoft", 1)])
    if kind == "mystery":
        return ([helper.make_node("Mystery", ["h2"], ["r2"], name="mystery2", domain="my.domain")],
                [helper.make_opsetid("my.domain", 1)])
    if kind == "if":
        branch = lambda name: helper.make_graph(
            [helper.make_node("Relu", ["h2"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", F, None)])
        return [
            helper.make_node("ReduceSum", ["h2"], ["s2"], keepdims=0, name="sum2"),
            helper.make_node("Greater", ["s2", "zero"], ["cond"], name="cond2"),
            helper.make_node("If", ["cond"], ["r2"], name="if2",
                             then_branch=branch("then"), else_branch=branch("else")),
        ], []
    if kind == "loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
             helper.make_node("Relu", ["carried"], ["carried_out"])],
            "body",
            [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
             helper.make_tensor_value_info("carried", F, None)],
            [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
             helper.make_tensor_value_info("carried_out", F, None)])
        return [helper.make_node("Loop", ["one", "true", "h2"], ["r2"], name="loop2", body=body)], []
    raise ValueError(kind)


def mlp(path, w, kind="relu", opset=17, **save_kw):
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"], name="fc2", transB=1),
    ]
    extra_nodes, extra_opsets = act2(kind)
    nodes += extra_nodes
    nodes.append(helper.make_node("Gemm", ["r2", "w3", "b3"], ["y"], name="fc3", transB=1))
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    if kind == "if":
        inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    if kind == "loop":
        inits += [numpy_helper.from_array(np.array(1, np.int64), "one"),
                  numpy_helper.from_array(np.array(True), "true")]
    g = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", F, ["N", 8])],
        [helper.make_tensor_value_info("y", F, ["N", len(w["b3"])])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)] + extra_opsets,
                          producer_name="make_bad_inputs")
    m.ir_version = 8
    if not extra_opsets:
        onnx.checker.check_model(m)
    onnx.save_model(m, os.path.join(out, path), **save_kw)


wa, wb = weights(seed=1), weights(seed=2)
mlp("a.onnx", wa)
mlp("b.onnx", wb)
mlp("wide_b.onnx", weights(h1=12, seed=2))
mlp("opset13_b.onnx", wb, opset=13)
mlp("classes5_b.onnx", weights(seed=2, classes=5))
mlp("ext_a.onnx", wa, save_as_external_data=True, all_tensors_to_one_file=True,
    location="ext_a.weights", size_threshold=0)
# Its data file is named as `-o ext_x.onnx --external-data` would name the output's.
mlp("ext_x_a.onnx", wa, save_as_external_data=True, all_tensors_to_one_file=True,
    location="ext_x.onnx.data", size_threshold=0)
for kind, name in [("atan", "unknown"), ("fastgelu", "custom"), ("mystery", "mystery"),
                   ("if", "if"), ("loop", "loop")]:
    mlp(f"{name}_a.onnx", wa, kind)
    mlp(f"{name}_b.onnx", wb, kind)


def dead(w):
    w = {k: v.copy() for k, v in w.items()}
    w["w1"][:6] = 0.0
    w["b1"][:4] = -1.0  # Relu(-1) = 0 on every input
    w["b1"][4:6] = 1.0  # stuck at 1
    w["w2"][:3] = 0.0
    w["b2"][:3] = -1.0
    return w


mlp("dead_a.onnx", dead(wa))
mlp("dead_b.onnx", dead(wb))

# Malformed graphs (not checked by onnx.checker, which would refuse them).
def raw_model(nodes, outputs, name):
    g = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info("x", F, ["N", 8])],
                          [helper.make_tensor_value_info(o, F, None) for o in outputs],
                          [numpy_helper.from_array(v, k) for k, v in wa.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, os.path.join(out, name))


raw_model([helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"], name="fc1", transB=1)],
          ["h1", "ghost"], "dangling_output.onnx")
raw_model([helper.make_node("Transpose", ["x"], ["y"], name="twist", perm=[1, 1])],
          ["y"], "bad_perm.onnx")
raw_model([helper.make_node("Add", ["x", "q"], ["p"], name="p_node"),
           helper.make_node("Relu", ["p"], ["q"], name="q_node")], ["q"], "cycle.onnx")

x = rng.standard_normal((64, 8)).astype(np.float32)
labels = rng.integers(0, 4, 64).astype(np.int64)


def data(name, x, labels=labels):
    np.savez(os.path.join(out, name), x=x, labels=labels)


# Every data file holds labels too, so that eval reads it like merge and run do.
data("calib.npz", x)
data("shape.npz", np.zeros((64, 3), np.float32))
data("f64.npz", x.astype(np.float64))
data("int.npz", np.ones((64, 8), np.int64))
data("few_labels.npz", x, labels[:10])
nan = x.copy()
nan[:8] = np.nan
nan[8:16] = np.inf
nan[16:20, 3] = -np.inf
data("nan.npz", nan)
data("empty.npz", np.zeros((0, 8), np.float32), labels[:0])

# Hardening, round 2 (see tests/bad_inputs.rs for what each is for).
#   wide50k_a/b.onnx     x[N,8] -> Gemm(50,000) -> Relu -> Gemm(4): a 2.4 MB pair with one very
#                        wide layer (its dense matrices need tens of GB)
#   dup_init.onnx        A with initializer 'b1' stored twice
#   ir3_a/b.onnx         A/B as IR 3 (initializers listed among the graph inputs)
#   init_out_a/b.onnx    A/B with the (remainder) weight 'w3' also a graph output
#   embed.onnx           int64 ids[N,6] -> Gather(table[3, 8]) -> ReduceMean -> Gemm, and an
#                        int64 mask[N,6] (BERT-style inputs for check's random data)
#   dup_member.npz       two members named 'x'
#   bomb.npz             a member whose header says float32[1] but that inflates to 64 MiB
#   labels_high.npz      calib.npz with every label 100 (outside any head)
def wide(path, seed, h=50000):
    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(r.standard_normal((h, 8)).astype(np.float32), "w1"),
             numpy_helper.from_array(r.standard_normal((4, h)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu1"),
             helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)]
    g = helper.make_graph(nodes, "wide", [helper.make_tensor_value_info("x", F, ["N", 8])],
                          [helper.make_tensor_value_info("y", F, ["N", 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save_model(m, os.path.join(out, path))


wide("wide50k_a.onnx", 1)
wide("wide50k_b.onnx", 2)

m = onnx.load(os.path.join(out, "a.onnx"))
m.graph.initializer.append(numpy_helper.from_array(np.zeros(16, np.float32), "b1"))
onnx.save_model(m, os.path.join(out, "dup_init.onnx"))

for ab in "ab":
    m = onnx.load(os.path.join(out, f"{ab}.onnx"))
    m.ir_version = 3
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("", 9))
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(m)
    onnx.save_model(m, os.path.join(out, f"ir3_{ab}.onnx"))
    m = onnx.load(os.path.join(out, f"{ab}.onnx"))
    m.graph.output.append(helper.make_tensor_value_info("w3", F, [4, 16]))
    onnx.checker.check_model(m)
    onnx.save_model(m, os.path.join(out, f"init_out_{ab}.onnx"))

r = np.random.default_rng(3)
g = helper.make_graph(
    [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
     helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT, name="cast"),
     helper.make_node("Unsqueeze", ["mf", "axes"], ["mu"], name="unsq"),
     helper.make_node("Mul", ["e", "mu"], ["em"], name="masked"),
     helper.make_node("ReduceMean", ["em"], ["p"], axes=[1], keepdims=0, name="pool"),
     helper.make_node("Gemm", ["p", "w1"], ["h"], name="fc1", transB=1),
     helper.make_node("Relu", ["h"], ["r"], name="relu"),
     helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc2", transB=1)],
    "embed",
    [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6]),
     helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 6])],
    [helper.make_tensor_value_info("y", F, ["N", 4])],
    [numpy_helper.from_array(r.standard_normal((3, 8)).astype(np.float32), "table"),
     numpy_helper.from_array(np.array([2], np.int64), "axes"),
     numpy_helper.from_array(r.standard_normal((16, 8)).astype(np.float32), "w1"),
     numpy_helper.from_array(r.standard_normal((4, 16)).astype(np.float32), "w2")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.checker.check_model(m)
onnx.save_model(m, os.path.join(out, "embed.onnx"))

import io
import zipfile
from numpy.lib import format as npformat


def npy_bytes(a):
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


with zipfile.ZipFile(os.path.join(out, "dup_member.npz"), "w") as z:
    z.writestr("x.npy", npy_bytes(x))
    z.writestr("x.npy", npy_bytes(x + 1))
head = io.BytesIO()
npformat.write_array_header_1_0(head, {"descr": "<f4", "fortran_order": False, "shape": (1,)})
with zipfile.ZipFile(os.path.join(out, "bomb.npz"), "w", compression=zipfile.ZIP_DEFLATED) as z:
    with z.open("x.npy", "w", force_zip64=True) as f:
        f.write(head.getvalue())
        for _ in range(64):
            f.write(b"\0" * (1 << 20))
data("labels_high.npz", x, np.full(64, 100, np.int64))
#   tract_panic.onnx     Flatten with axis 9 on a rank-2 input (tract panics preparing it)
#   tract_refuses.onnx   Reshape of [N, 8] to [3, 5] (tract refuses preparing it)
raw_model([helper.make_node("Flatten", ["x"], ["y"], name="flat", axis=9)], ["y"],
          "tract_panic.onnx")
g = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape")], "bad",
                      [helper.make_tensor_value_info("x", F, ["N", 8])],
                      [helper.make_tensor_value_info("y", F, None)],
                      [numpy_helper.from_array(np.array([3, 5], np.int64), "s")])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.save_model(m, os.path.join(out, "tract_refuses.onnx"))
#   deep.onnx            48 residual Gemm+Relu layers (outputs ~1e8) and an output that is the
#                        difference of two nearly equal rows: float32 rounding under a permutation
#                        exceeds rtol 1e-4 of that small output, not the model's own noise
r = np.random.default_rng(0)
W, nodes, inits, cur = 64, [], [], "x"
for i in range(48):
    inits += [numpy_helper.from_array((r.standard_normal((W, W)) / np.sqrt(W)).astype(np.float32), f"w{i}"),
              numpy_helper.from_array((r.standard_normal(W) * 0.1).astype(np.float32), f"b{i}")]
    nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
    nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
    nodes.append(helper.make_node("Add", [f"r{i}", cur], [f"s{i}"]) if i > 0
                 else helper.make_node("Identity", [f"r{i}"], [f"s{i}"]))
    cur = f"s{i}"
wo = (r.standard_normal((12, W)) / np.sqrt(W)).astype(np.float32)
wo[11] = wo[10] * (1 + 1e-4)
C = np.zeros((12, 11), np.float32)
C[:10, :10] = np.eye(10)
C[10, 10], C[11, 10] = 1, -1
inits += [numpy_helper.from_array(wo, "wo"), numpy_helper.from_array(C, "C")]
nodes += [helper.make_node("Gemm", [cur, "wo"], ["o"], transB=1),
          helper.make_node("MatMul", ["o", "C"], ["y"])]
g = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info("x", F, ["N", W])],
                      [helper.make_tensor_value_info("y", F, ["N", 11])], inits)
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
onnx.save_model(m, os.path.join(out, "deep.onnx"))
