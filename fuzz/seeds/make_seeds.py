"""Seed inputs for the fuzz targets (before `cargo fuzz cmin`).

usage: make_seeds.py ONNX_OUT NPZ_OUT

ONNX seeds: the small models the test suite builds (tests/py), and a *skeleton* of every
fixture and zoo model: its graph with each initializer's data dropped (dims and dtype kept), so
that the real architectures are in the corpus without their megabytes of weights.
numpy seeds: .npz archives (stored and deflated) and .npy files of every accepted dtype and a few
refused ones, header versions 1-3, Fortran order, big-endian, 0-d and empty arrays.
"""
import io
import os
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import onnx

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
onnx_out, npz_out = sys.argv[1], sys.argv[2]
os.makedirs(onnx_out, exist_ok=True)
os.makedirs(npz_out, exist_ok=True)

# --- ONNX ---
with tempfile.TemporaryDirectory() as tmp:
    for script in ["make_models.py", "make_rule_models.py"]:
        d = os.path.join(tmp, script)
        subprocess.run([sys.executable, os.path.join(root, "tests/py", script), d], check=True)
        for name in sorted(os.listdir(d)):
            if name.endswith(".onnx"):
                with open(os.path.join(d, name), "rb") as f:
                    data = f.read()
                with open(os.path.join(onnx_out, f"py_{name}"), "wb") as f:
                    f.write(data)

for sub in ["fixtures/models", "fixtures/zoo"]:
    for name in sorted(os.listdir(os.path.join(root, sub))):
        if not name.endswith(".onnx") or name.endswith("_b.onnx"):
            continue
        m = onnx.load(os.path.join(root, sub, name))
        for t in m.graph.initializer:
            t.ClearField("raw_data")
            for field in ["float_data", "int32_data", "int64_data", "double_data", "uint64_data"]:
                t.ClearField(field)
        with open(os.path.join(onnx_out, f"skeleton_{name}"), "wb") as f:
            f.write(m.SerializeToString())

# --- numpy ---
rng = np.random.default_rng(0)
arrays = {
    "f32": rng.standard_normal((2, 3)).astype(np.float32),
    "f64": rng.standard_normal(3),
    "i64": np.arange(4, dtype=np.int64),
    "i32": np.arange(3, dtype=np.int32).reshape(3, 1),
    "u8": np.arange(6, dtype=np.uint8).reshape(1, 2, 3),
    "i8": np.array([-1, 2], np.int8),
    "i16": np.array([-3], np.int16),
    "u16": np.array([7], np.uint16),
    "u32": np.array([8], np.uint32),
    "u64": np.array([9], np.uint64),
    "bool": np.array([True, False]),
    "f16": np.ones(2, np.float16),  # refused: no float16 reader
    "scalar": np.float32(1.5),
    "empty": np.zeros((0, 3), np.float32),
    "fortran": np.asfortranarray(rng.standard_normal((2, 3)).astype(np.float32)),
    "bigendian": np.arange(3, dtype=">f4"),
    "complex": np.ones(1, np.complex64),  # refused
}


def npy_bytes(a, version=None):
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asanyarray(a), version=version, allow_pickle=True)
    return buf.getvalue()


for key, a in arrays.items():
    with open(os.path.join(npz_out, f"{key}.npy"), "wb") as f:
        f.write(npy_bytes(a))
for version in [(2, 0), (3, 0)]:
    with open(os.path.join(npz_out, f"v{version[0]}.npy"), "wb") as f:
        f.write(npy_bytes(arrays["f32"], version))
with open(os.path.join(npz_out, "object.npy"), "wb") as f:
    f.write(npy_bytes(np.array([{"a": 1}], dtype=object)))

np.savez(os.path.join(npz_out, "calib_like.npz"),
         input=rng.standard_normal((2, 1, 4, 4)).astype(np.float32),
         labels=np.array([0, 3], np.int64))
np.savez_compressed(os.path.join(npz_out, "compressed.npz"),
                    x=arrays["f32"], y=arrays["bool"], z=arrays["u8"])
np.savez(os.path.join(npz_out, "every_dtype.npz"),
         **{k: v for k, v in arrays.items() if k not in ("f16", "complex")})
np.savez(os.path.join(npz_out, "refused_dtype.npz"), h=arrays["f16"])
# A zip whose member is not an .npy, and an empty archive.
with zipfile.ZipFile(os.path.join(npz_out, "not_npy.npz"), "w") as z:
    z.writestr("readme.txt", "hello")
with zipfile.ZipFile(os.path.join(npz_out, "empty.npz"), "w"):
    pass
