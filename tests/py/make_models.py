"""Builds small ONNX models and reference data for the Rust tests, with the official `onnx`
Python package (an independent writer of the format).

usage: make_models.py OUT_DIR
"""
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = [helper.make_opsetid("", 17)]
rng = np.random.default_rng(0)


def save(model, path, **kw):
    onnx.checker.check_model(model)
    onnx.save_model(model, path, **kw)


def mlp(out):
    """x[N,8] -> Gemm(16) -> Relu -> MatMul(4) + bias."""
    w1 = rng.standard_normal((16, 8)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    b2 = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["m"], name="fc2"),
        helper.make_node("Add", ["m", "b2"], ["y"], name="bias2"),
    ]
    g = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2")]],
    )
    m = helper.make_model(g, opset_imports=OPSET, producer_name="make_models")
    m.ir_version = 8
    save(m, os.path.join(out, "mlp.onnx"))
    # The same model with every weight in an external file, written by onnx itself.
    save(m, os.path.join(out, "mlp_ext.onnx"), save_as_external_data=True,
         all_tensors_to_one_file=True, location="mlp_ext.weights", size_threshold=0)
    np.savez(os.path.join(out, "mlp_input.npz"), x=rng.standard_normal((10, 8)).astype(np.float32))


def convnet(out):
    """x[N,3,8,8] -> Conv -> BatchNorm -> Relu -> GlobalAveragePool -> Flatten -> Gemm, with a
    Constant node and an intermediate value 'feat' that tests tap as an extra output."""
    w = rng.standard_normal((16, 3, 3, 3)).astype(np.float32)
    scale = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    bias = rng.standard_normal(16).astype(np.float32)
    mean = rng.standard_normal(16).astype(np.float32)
    var = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    fc = rng.standard_normal((5, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Relu", ["bn"], ["feat"], name="relu"),
        helper.make_node("GlobalAveragePool", ["feat"], ["gp"], name="gap"),
        helper.make_node("Flatten", ["gp"], ["flat"], name="flatten"),
        helper.make_node("Constant", [], ["fcb"], name="const_bias",
                         value=numpy_helper.from_array(np.arange(5, dtype=np.float32), "fcb_v")),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"], name="head", transB=1),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in
             [(w, "w"), (scale, "s"), (bias, "b"), (mean, "m"), (var, "v"), (fc, "fc")]]
    g = helper.make_graph(
        nodes, "convnet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    m = helper.make_model(g, opset_imports=OPSET, producer_name="make_models")
    m.ir_version = 8
    save(m, os.path.join(out, "convnet.onnx"))
    np.savez(os.path.join(out, "convnet_input.npz"),
             x=rng.standard_normal((7, 3, 8, 8)).astype(np.float32))
    # The same input as an ONNX test-data directory.
    d = os.path.join(out, "convnet_test_data_set_0")
    os.makedirs(d, exist_ok=True)
    x = np.load(os.path.join(out, "convnet_input.npz"))["x"]
    with open(os.path.join(d, "input_0.pb"), "wb") as f:
        f.write(numpy_helper.from_array(x, "x").SerializeToString())


def two_inputs(out):
    """y = a * b + c (c an initializer also listed as a graph input, as old exporters do)."""
    c = rng.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["ab"]),
        helper.make_node("Add", ["ab", "c"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")]
        + [helper.make_tensor_value_info("c", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(c, "c")],
    )
    m = helper.make_model(g, opset_imports=OPSET)
    m.ir_version = 8
    save(m, os.path.join(out, "two_inputs.onnx"))
    np.savez(os.path.join(out, "two_inputs_input.npz"),
             a=rng.standard_normal((3, 4)).astype(np.float32),
             b=rng.standard_normal((3, 4)).astype(np.float32))


def with_if(out):
    """A model whose If node carries two subgraphs."""
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    g = helper.make_graph(
        nodes, "with_if",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")],
    )
    m = helper.make_model(g, opset_imports=OPSET)
    m.ir_version = 8
    save(m, os.path.join(out, "with_if.onnx"))


DTYPES = {
    "float32": np.float32, "float64": np.float64, "float16": np.float16,
    "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
    "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
}


def dtypes(out):
    """Initializers of every dtype, each twice: as raw_data and in the typed repeated field.
    The expected values go to an npz (bfloat16 as its float32 value)."""
    inits, expected = [], {}
    for name, dt in DTYPES.items():
        if dt == np.bool_:
            a = rng.integers(0, 2, (2, 3)).astype(np.bool_)
        elif np.issubdtype(dt, np.integer):
            info = np.iinfo(dt)
            a = rng.integers(max(info.min, -1000), min(info.max, 1000), (2, 3)).astype(dt)
            a.flat[0] = info.max
            a.flat[1] = info.min
        else:
            a = (rng.standard_normal((2, 3)) * 10).astype(dt)
        # numpy's float16 has no reader on the Rust side: the expected values go as float32.
        expected[name] = a.astype(np.float32) if dt == np.float16 else a
        inits.append(numpy_helper.from_array(a, f"{name}_raw"))
        onnx_type = helper.np_dtype_to_tensor_dtype(a.dtype)
        inits.append(helper.make_tensor(f"{name}_typed", onnx_type, a.shape, a.flatten().tolist(), raw=False))
    # bfloat16: numpy has no such type; build it from float32 values that bf16 holds exactly.
    bf = (rng.integers(-64, 64, (2, 3)) / 8.0).astype(np.float32)
    expected["bfloat16"] = bf
    bits = (bf.view(np.uint32) >> 16).astype(np.uint16)
    inits.append(helper.make_tensor("bfloat16_raw", TensorProto.BFLOAT16, bf.shape, bits.tobytes(), raw=True))
    inits.append(helper.make_tensor("bfloat16_typed", TensorProto.BFLOAT16, bf.shape, bf.flatten().tolist(), raw=False))
    g = helper.make_graph(
        [helper.make_node("Identity", ["float32_raw"], ["y"])], "dtypes", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits,
    )
    m = helper.make_model(g, opset_imports=OPSET)
    m.ir_version = 8
    save(m, os.path.join(out, "dtypes.onnx"))
    np.savez(os.path.join(out, "dtypes_expected.npz"), **expected)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for build in (mlp, convnet, two_inputs, with_if, dtypes):
        build(out)
