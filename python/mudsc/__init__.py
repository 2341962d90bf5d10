"""mudsc from Python: merge ONNX models (MuDSC), discover and check their symmetry groups.

Every function runs the same code as the ``mudsc`` command (one Rust library underneath) and
returns the document the command prints with ``--json`` or writes with ``--report``, as a dict:

    import mudsc, numpy as np
    calib = dict(np.load("calib.npz"))                  # or the path "calib.npz"
    report = mudsc.merge(["a.onnx", "b.onnx"], "merged.onnx", calib=calib)
    mudsc.groups("a.onnx")["groups"]                     # the mudsc-groups/1 document
    mudsc.check("a.onnx")["verdict"]                     # "pass", "fail" or "inconclusive"
    mudsc.evaluate("merged.onnx", data="test.npz", tasks="0-4,5-9")

Data (``calib``, ``data``) is a path (.npz, .npy, .pb, test_data_set directory) or numpy arrays
keyed by graph input name (a single array for a single-input model). Options left as ``None``
take the command's defaults (``mudsc merge --help``). Errors raise :class:`BadInputError` (the
command's exit code 2: a bad model, data file, spec or option) or :class:`MudscError` (exit code
1), with the command's message, which names the file or tensor. The GIL is released while the
work runs; progress bars go to stderr when it is a terminal, as the command's do.

ONNX Runtime runs the models: its library is taken from the installed ``onnxruntime`` package
(unless ``ort_lib=`` or ``ORT_DYLIB_PATH`` names another); without it, the built-in tract engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Union

import numpy as np

from . import _native
from ._native import BadInputError, MudscError

__all__ = ["merge", "groups", "check", "evaluate", "main", "MudscError", "BadInputError"]
__version__ = _native.__version__

PathLike = Union[str, "os.PathLike[str]"]
Data = Union[PathLike, np.ndarray, Mapping[str, np.ndarray]]


def _onnxruntime_package() -> str | None:
    """The installed onnxruntime package's directory, found without importing it."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


_native.use_onnxruntime_package(_onnxruntime_package())


def main() -> int:
    """The ``mudsc`` command (same arguments, output and exit codes as the Rust binary)."""
    return _native.command_line(["mudsc", *sys.argv[1:]])


def _flag(argv: list[str], name: str, value: Any) -> None:
    """Appends ``--name value`` unless the value is None (the command's default then)."""
    if value is None or value is False:
        return
    flag = "--" + name.replace("_", "-")
    if value is True:
        argv.append(flag)
    elif isinstance(value, (list, tuple)):
        argv += [flag, *map(os.fspath, value)]
    else:
        argv += [flag, os.fspath(value) if isinstance(value, os.PathLike) else str(value)]


def _data(argv: list[str], name: str, value: Data | None) -> dict[str, np.ndarray] | None:
    """A path goes on the command line; arrays go in memory, named ``<name arrays>`` in
    messages."""
    if value is None:
        return None
    if isinstance(value, (str, os.PathLike)):
        _flag(argv, name, value)
        return None
    if isinstance(value, np.ndarray):
        value = {"input": value}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: give a path or numpy arrays keyed by input name, not {type(value).__name__}")
    _flag(argv, name, f"<{name} arrays>")
    return {str(k): np.asarray(v) for k, v in value.items()}


def _backend(argv: list[str], backend, ort_lib, batch, device) -> None:
    for name, value in (("backend", backend), ("ort_lib", ort_lib), ("batch", batch), ("device", device)):
        _flag(argv, name, value)


def _shapes(argv: list[str], shape: Mapping[str, Sequence[int]] | None) -> None:
    for name, dims in (shape or {}).items():
        argv += ["--shape", f"{name}={','.join(str(d) for d in dims)}"]


def _run(argv: list[str], arrays: dict[str, np.ndarray] | None = None) -> dict:
    return json.loads(_native.run_json(["mudsc", *argv], arrays))


def merge(
    models: Sequence[PathLike],
    output: PathLike,
    calib: Data | None = None,
    *,
    method: str | None = None,
    base: PathLike | None = None,
    lambda_: float | None = None,
    density: float | None = None,
    t: float | None = None,
    weights: Sequence[float] | None = None,
    align_first: bool = False,
    cca_ridge: float | None = None,
    alpha: float | str | None = None,
    zip_until: str | int | None = None,
    repair_samples: int | None = None,
    output_fit: int | None = None,
    refit_layers: str | None = None,
    backend: str | None = None,
    report: PathLike | None = None,
    card: PathLike | None = None,
    eval_data: PathLike | None = None,
    eval_labels: str | None = None,
    tasks: str | None = None,
    seed: int | None = None,
    samples: int | None = None,
    calib_labels: str | None = None,
    stats: Sequence[PathLike] | None = None,
    external_data: bool = False,
    zip_a: float | None = None,
    zip_b: float | None = None,
    max_sweeps: int | None = None,
    repair_passes: int | None = None,
    repair_batch: int | None = None,
    tap_positions: int | None = None,
    taps: str | None = None,
    repair_token_layers: bool | None = None,
    ort_lib: PathLike | None = None,
    batch: int | None = None,
    device: str | None = None,
) -> dict:
    """``mudsc merge``: merges ``models`` into ``output`` and returns the merge report (what
    ``--report`` writes: per group width, kind, similarity and merge value; seconds per phase;
    the engine that ran).

    The same-base methods (``method=`` "task-arithmetic", "ties", "dare-linear", "dare-ties",
    "slerp", "linear") take ``base``, ``lambda_`` (the command's ``--lambda``), ``density``,
    ``t`` and ``weights``, and need ``calib`` only with ``align_first``."""
    argv = ["merge", *map(os.fspath, models), "--output", os.fspath(output)]
    arrays = _data(argv, "calib", calib)
    if weights is not None:
        argv += ["--weights", ",".join(repr(float(w)) for w in weights)]
    options = dict(method=method, base=base, density=density, t=t, align_first=align_first,
                   cca_ridge=cca_ridge, alpha=alpha, zip_until=zip_until, repair_samples=repair_samples,
                   output_fit=output_fit, refit_layers=refit_layers,
                   report=report, card=card, eval_data=eval_data, eval_labels=eval_labels,
                   tasks=tasks, seed=seed,
                   samples=samples, calib_labels=calib_labels, stats=stats,
                   external_data=external_data, zip_a=zip_a, zip_b=zip_b, max_sweeps=max_sweeps,
                   repair_passes=repair_passes, repair_batch=repair_batch,
                   tap_positions=tap_positions, taps=taps)
    for name, value in options.items():
        _flag(argv, name, value)
    if repair_token_layers is not None:  # a valued switch: --repair-token-layers true|false
        argv += ["--repair-token-layers", "true" if repair_token_layers else "false"]
    _flag(argv, "lambda", lambda_)
    _backend(argv, backend, ort_lib, batch, device)
    return _run(argv, arrays)


def groups(
    model: PathLike,
    data: Data | None = None,
    *,
    shape: Mapping[str, Sequence[int]] | None = None,
    spec: PathLike | None = None,
) -> dict:
    """``mudsc groups --json``: the ``mudsc-groups/1`` document of the model's discovered
    groups (``spec``: a document to override discovery with, as ``--groups``)."""
    argv = ["groups", os.fspath(model)]
    arrays = _data(argv, "data", data)
    _shapes(argv, shape)
    _flag(argv, "groups", spec)
    return _run(argv, arrays)


def check(
    model: PathLike,
    data: Data | None = None,
    *,
    trials: int | None = None,
    seed: int | None = None,
    samples: int | None = None,
    shape: Mapping[str, Sequence[int]] | None = None,
    spec: PathLike | None = None,
    backend: str | None = None,
    ort_lib: PathLike | None = None,
    batch: int | None = None,
    device: str | None = None,
) -> dict:
    """``mudsc check --json``: the ``mudsc-check/1`` verdict (``verdict`` is ``pass``, ``fail``
    or ``inconclusive``; a failed check is returned, not raised)."""
    argv = ["check", os.fspath(model)]
    arrays = _data(argv, "data", data)
    _shapes(argv, shape)
    for name, value in dict(groups=spec, trials=trials, seed=seed, samples=samples).items():
        _flag(argv, name, value)
    _backend(argv, backend, ort_lib, batch, device)
    return _run(argv, arrays)


def evaluate(
    models: PathLike | Sequence[PathLike],
    data: Data,
    *,
    labels: str | None = None,
    tasks: str | None = None,
    classes: str | None = None,
    ensemble: bool = False,
    backend: str | None = None,
    ort_lib: PathLike | None = None,
    batch: int | None = None,
    device: str | None = None,
) -> dict:
    """``mudsc eval --json``: top-1 accuracy (joint and per task with ``tasks="0-4,5-9"``) of one
    model, or a dict by model (and ``ensemble``) for several. Labels are the integer array under
    ``labels`` (default ``"labels"``) in ``data``."""
    if isinstance(models, (str, os.PathLike)):
        models = [models]
    argv = ["eval", *map(os.fspath, models)]
    arrays = _data(argv, "data", data)
    for name, value in dict(labels=labels, tasks=tasks, classes=classes, ensemble=ensemble).items():
        _flag(argv, name, value)
    _backend(argv, backend, ort_lib, batch, device)
    return _run(argv, arrays)
