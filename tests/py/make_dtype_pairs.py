"""Two-layer Gemm model pairs in float16 and float64, with and without biases, for the merge's
dtype tests (statistics repair must keep the graph's float type).

usage: make_dtype_pairs.py OUT_DIR
Writes {f16,f64}_{bias,nobias}_{a,b}.onnx (input `x` float32 [N, 8], output `y` float32 [N, 4])
and calib.npz.
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def pair(out, dt, code, bias):
    for seed, ab in ((1, "a"), (2, "b")):
        rng = np.random.default_rng(seed)
        inits = [
            numpy_helper.from_array(rng.standard_normal((16, 8)).astype(dt), "w1"),
            numpy_helper.from_array(rng.standard_normal((4, 16)).astype(dt), "w2"),
        ]
        fc1, fc2 = ["xc", "w1"], ["r", "w2"]
        if bias:
            inits += [
                numpy_helper.from_array(rng.standard_normal(16).astype(dt), "b1"),
                numpy_helper.from_array(rng.standard_normal(4).astype(dt), "b2"),
            ]
            fc1.append("b1")
            fc2.append("b2")
        nodes = [
            helper.make_node("Cast", ["x"], ["xc"], to=code),
            helper.make_node("Gemm", fc1, ["h"], name="fc1", transB=1),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", fc2, ["yc"], name="fc2", transB=1),
            helper.make_node("Cast", ["yc"], ["y"], to=TensorProto.FLOAT),
        ]
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        onnx.checker.check_model(m, full_check=True)
        name = "%s_%s" % ("f16" if dt == np.float16 else "f64", "bias" if bias else "nobias")
        onnx.save(m, os.path.join(out, "%s_%s.onnx" % (name, ab)))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for dt, code in ((np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)):
        for bias in (True, False):
            pair(out, dt, code, bias)
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    np.savez(os.path.join(out, "calib.npz"), x=x)


if __name__ == "__main__":
    main()
