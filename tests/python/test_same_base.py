"""Same-base merges against the numpy implementations of tests/py/same_base_ref.py, on random
tensors in a small ONNX graph: three fine-tunes of one base (some entries left at the base's
value, one tensor equal in every model and holding -inf, one integer tensor)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import mudsc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "py"))
import same_base_ref as ref  # noqa: E402

SHAPES = {"w1": (8, 16), "b1": (16,), "w2": (16, 4)}


def model(tensors: dict[str, np.ndarray], mask: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(v, k) for k, v in tensors.items()]
    inits.append(numpy_helper.from_array(mask, "mask"))
    inits.append(numpy_helper.from_array(np.array([-1, 4], dtype=np.int64), "shape"))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["o"]),
        helper.make_node("Add", ["o", "mask"], ["om"]),
        helper.make_node("Reshape", ["om", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes, written as ONNX files."""
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("same_base")
    mask = np.array([0, -np.inf, 0, 0], dtype=np.float32)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    models = []
    for _ in range(3):
        m = {}
        for k, v in base.items():
            delta = (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
            delta[rng.random(v.shape) < 0.2] = 0  # entries the fine-tune left alone
            m[k] = v + delta
        models.append(m)
    paths = []
    for i, tensors in enumerate([base, *models]):
        p = d / f"m{i}.onnx"
        onnx.save(model(tensors, mask), p)
        paths.append(p)
    return base, models, paths[0], paths[1:], d


def merged_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def check(out: Path, expected: dict[str, np.ndarray]) -> None:
    got = merged_tensors(out)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want.astype(np.float32), rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.array_equal(got["shape"], [-1, 4])
    assert got["mask"][1] == -np.inf and got["mask"][0] == 0


@pytest.mark.parametrize("density,lam,weights", [(0.3, 1.0, [1, 1, 1]), (0.7, 0.6, [0.5, 1.0, 2.0])])
def test_ties_equals_numpy(family, density, lam, weights):
    base, models, base_path, paths, d = family
    out = d / "ties.onnx"
    mudsc.merge(paths, out, method="ties", base=base_path, density=density, lambda_=lam, weights=weights)
    expected = {k: ref.ties(base[k], [m[k] for m in models], weights, density, lam) for k in SHAPES}
    check(out, expected)


@pytest.mark.parametrize("method,elect", [("dare-linear", False), ("dare-ties", True)])
def test_dare_equals_numpy(family, method, elect):
    base, models, base_path, paths, d = family
    out = d / f"{method}.onnx"
    density, lam, seed, weights = 0.6, 0.8, 11, [1.0, 1.0, 1.0]
    report = mudsc.merge(paths, out, method=method, base=base_path, density=density, lambda_=lam, seed=seed)
    expected = {
        k: ref.dare(base[k], [m[k] for m in models], weights, density, lam, seed, k, elect) for k in SHAPES
    }
    check(out, expected)
    # About `density` of the nonzero task-vector entries survive.
    assert abs(report["kept_fraction"] - density) < 0.1
    # Another seed drops other entries.
    other = d / f"{method}_other.onnx"
    mudsc.merge(paths, other, method=method, base=base_path, density=density, lambda_=lam, seed=seed + 1)
    assert not np.array_equal(merged_tensors(out)["w1"], merged_tensors(other)["w1"])
