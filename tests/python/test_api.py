"""The Python package against the command line: the Rust binary (``$MUDSC_BIN``, else the
debug build) is the independent reference. Run by scripts/test.sh after the package is built
into the project's virtual environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import mudsc

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "fixtures" / "models"
CALIB = ROOT / "fixtures" / "data" / "calib.npz"
TEST = ROOT / "fixtures" / "data" / "test.npz"
A, B = MODELS / "mlp_a.onnx", MODELS / "mlp_b.onnx"


def binary() -> Path:
    path = os.environ.get("MUDSC_BIN")
    if path:
        return Path(path)
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    return target / "debug" / "mudsc"


def cli(*args: object, check: bool = True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(binary()), *map(str, args)], capture_output=True, text=True)
    if check:
        assert run.returncode == 0, run.stderr
    return run


def test_merge_from_numpy_arrays_equals_the_cli_byte_for_byte(tmp_path):
    cli("merge", A, B, "-o", tmp_path / "cli.onnx", "--calib", CALIB,
        "--report", tmp_path / "cli.json")
    with np.load(CALIB) as f:
        arrays = {"input": f["input"]}
    report = mudsc.merge([A, B], tmp_path / "py.onnx", calib=arrays)
    assert (tmp_path / "py.onnx").read_bytes() == (tmp_path / "cli.onnx").read_bytes()
    want = json.loads((tmp_path / "cli.json").read_text())
    assert report["method"] == want["method"] == "mudsc-zip"
    assert report["groups"] == want["groups"]
    assert report["calibration_samples"] == 1000
    # A path works too, and options reach the merge.
    report = mudsc.merge([str(A), str(B)], tmp_path / "avg.onnx", calib=CALIB, method="avg",
                         repair_samples=0)
    cli("merge", A, B, "-o", tmp_path / "avg_cli.onnx", "--calib", CALIB, "--method", "avg",
        "--repair-samples", "0")
    assert report["method"] == "avg"
    assert (tmp_path / "avg.onnx").read_bytes() == (tmp_path / "avg_cli.onnx").read_bytes()


def test_token_layer_repair_switches_from_python_as_from_the_cli(tmp_path):
    vit_a, vit_b = MODELS / "vit_a.onnx", MODELS / "vit_b.onnx"
    # The output layer refitted alone: layers the refit fits are left to it, not repaired.
    on = mudsc.merge([vit_a, vit_b], tmp_path / "on.onnx", calib=CALIB, max_sweeps=1,
                     refit_layers="output")
    off = mudsc.merge([vit_a, vit_b], tmp_path / "off.onnx", calib=CALIB, max_sweeps=1,
                      refit_layers="output", repair_token_layers=False)
    cli("merge", vit_a, vit_b, "-o", tmp_path / "off_cli.onnx", "--calib", CALIB,
        "--max-sweeps", "1", "--refit-layers", "output", "--repair-token-layers", "false")
    # Four blocks × (Q, K, V, attention output, fc1, fc2) token layers, on by default.
    assert on["repaired_layers"] >= off["repaired_layers"] + 24
    assert (tmp_path / "off.onnx").read_bytes() == (tmp_path / "off_cli.onnx").read_bytes()


def test_groups_round_trip_the_cli_json():
    want = json.loads(cli("groups", A, "--json").stdout)
    got = mudsc.groups(A)
    assert got["format"] == "mudsc-groups/1"
    assert got == want


def test_check_round_trips_the_cli_json():
    want = json.loads(cli("check", A, "--json", "--trials", "2").stdout)
    got = mudsc.check(A, trials=2)
    assert got["verdict"] == "pass"
    # The numbers are measurements of two runs of one engine: equal.
    assert got == want
    # With data as numpy arrays: the same as with the file.
    with np.load(CALIB) as f:
        x = f["input"][:64]
    np.savez(Path(os.environ.get("TMPDIR", "/tmp")) / "mudsc-pytest-x.npz", input=x)
    from_file = mudsc.check(A, Path(os.environ.get("TMPDIR", "/tmp")) / "mudsc-pytest-x.npz", trials=1)
    from_arrays = mudsc.check(A, {"input": x}, trials=1)
    assert from_arrays["trials"] == from_file["trials"]


def test_evaluate_equals_the_cli():
    want = json.loads(cli("eval", A, "--data", TEST, "--tasks", "0-4,5-9", "--json").stdout)
    assert mudsc.evaluate(A, TEST, tasks="0-4,5-9") == want
    with np.load(TEST) as f:
        arrays = dict(f)
    assert mudsc.evaluate([A], arrays, tasks="0-4,5-9") == want


def test_bad_input_raises_with_the_file_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(mudsc.BadInputError, match="broken.onnx"):
        mudsc.groups(bad)
    with pytest.raises(mudsc.BadInputError, match="broken.onnx"):
        mudsc.merge([A, bad], tmp_path / "m.onnx", calib=CALIB)
    assert not (tmp_path / "m.onnx").exists()
    # The same message as the command's.
    run = cli("groups", bad, check=False)
    assert run.returncode == 2
    with pytest.raises(mudsc.MudscError) as raised:
        mudsc.groups(bad)
    assert run.stderr.strip() == f"error: {raised.value}"
    # Arrays of the wrong shape name the input; a bad option names the option.
    with pytest.raises(mudsc.BadInputError, match="input"):
        mudsc.merge([A, B], tmp_path / "m.onnx", calib={"input": np.zeros((4, 3), np.float32)})
    with pytest.raises(mudsc.BadInputError, match="--method"):
        mudsc.merge([A, B], tmp_path / "m.onnx", calib=CALIB, method="nonsense")
    with pytest.raises(mudsc.BadInputError, match="object"):
        mudsc.check(A, {"input": np.array([object()])})


def test_the_mudsc_command_is_the_cli(tmp_path):
    command = shutil.which("mudsc", path=str(Path(os.sys.executable).parent))
    assert command, "the package installs a mudsc command"
    run = subprocess.run([command, "groups", A, "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == json.loads(cli("groups", A, "--json").stdout)
    run = subprocess.run([command, "groups", tmp_path / "missing.onnx"], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "missing.onnx" in run.stderr
