"""Runs a model with ONNX Runtime's Python package (the reference) after checking it with
onnx.checker; writes the outputs to an npz keyed by output name.

usage: ort_run.py MODEL INPUT_NPZ OUTPUT_NPZ
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort

model_path, inp, outp = sys.argv[1:]
onnx.checker.check_model(model_path)
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
so.intra_op_num_threads = 1
sess = ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
data = np.load(inp)
names = [i.name for i in sess.get_inputs()]
feed = {n: data[n] for n in names} if all(n in data for n in names) else {names[0]: data[data.files[0]]}
outs = sess.run(None, feed)
np.savez(outp, **{o.name: v for o, v in zip(sess.get_outputs(), outs)})
