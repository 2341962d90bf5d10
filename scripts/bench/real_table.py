#!/usr/bin/env python3
"""The table of `scripts/bench-real.sh`: one markdown row per model pair, from the files the
script leaves in each pair's work directory.

Per pair directory (``WORK/<pair>``):
  ``groups.json``   ``mudsc groups A.onnx --json`` (format mudsc-groups/1): width and tap of
                    every group
  ``taps.npz``      ``mudsc run A.onnx --extra <taps>`` on one image: each tap's shape
  ``bare_a.time``, ``bare_b.time``  ``/usr/bin/time -f "%e %M"`` of ``mudsc run`` over the
                    calibration set (the bare forward passes of each endpoint)
  ``bare_merged.time``  the same for the merged model (optional: older runs lack it)
  ``report.json``   ``mudsc merge --report``: seconds per phase, peak resident memory
and the models themselves, ``CACHE/<pair>_a.onnx`` and ``_b.onnx``.

The physical limit of a merge is the bare forward passes of both endpoints over the
calibration set, plus the arithmetic of the statistics at the machine's GEMM peak: each group
accumulates Σxxᵀ over the units of both models side by side (2·width of them, the full matrix:
the issue's definition; mudsc computes its upper triangle, about half), one row per
calibration sample and tap position (every element of the tap that is neither the batch nor
the unit axis), 2 flops per multiply-add:
    Σ_groups 2 · samples · positions · (2·width)²  /  GEMM flop/s.
It leaves out the repair's forward passes, so the repair counts as overhead. A merge that
repairs (or refits a layer) needs one pass of the merged model besides: the column "÷ limit with it"
divides by the f64 limit plus that pass, measured as the endpoints' are. Two peaks give two
limits, shown as "f64 · f32" in one cell: the f64 peak (moments accumulated in f64, the
issue's reading) and the f32 peak (calibration multiplies in f32, so this is the limit its
own kernel could reach, the stricter one).

Usage: real_table.py CACHE WORK --samples N --gemm-gflops G --gemm-gflops-f32 G32 PAIR [PAIR ...]
"""

import argparse
import json
import os
import sys

import numpy as np
import onnx

PHASES_SHOWN = ("calibration", "matching", "repair", "refit")
COLUMNS = 18


def parameters(path: str) -> int:
    """Parameter count: elements of the floating-point initializers."""
    m = onnx.load(path, load_external_data=False)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    return sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type in floats)


def _last_line(path: str) -> str:
    """The last non-empty line of a text file (`/usr/bin/time` appends its own)."""
    with open(path) as f:
        lines = [l for l in f.read().splitlines() if l.strip()]
    return lines[-1]


def statistics_flops(groups: dict, taps: dict, samples: int, models: int = 2) -> tuple[float, list[str]]:
    """Flops of the Σxxᵀ accumulation over every calibrated group, and notes on groups whose
    tap shape is unknown (counted as one position per sample)."""
    flops = 0.0
    notes = []
    for g in groups["groups"]:
        tap, axis, width = g.get("tap"), g.get("tap_axis"), g["width"]
        if tap is None:
            continue
        if tap in taps and axis is not None:
            shape = taps[tap]
            positions = int(np.prod(shape)) // (shape[0] * shape[axis])
        else:
            positions = 1
            notes.append(f"group {g['id']}: shape of tap '{tap}' unknown, counted as 1 position")
        units = models * width
        flops += 2.0 * samples * positions * units * units
    return flops, notes


def row(cache: str, work: str, pair: str, samples: int, peaks: tuple[float, float]) -> tuple[str, list[str]]:
    d = os.path.join(work, pair)
    a, b = (os.path.join(cache, f"{pair}_{s}.onnx") for s in "ab")
    failed = os.path.join(d, "failed")
    if os.path.exists(failed):
        with open(failed) as f:
            why = " / ".join(l.strip() for l in f if l.strip())
        size_a = os.path.getsize(a)
        cells = [pair, "%.1f" % (parameters(a) / 1e6), "%.0f" % (size_a / 2**20), "%d" % samples]
        cells += ["merge failed"] + [""] * (COLUMNS - len(cells) - 1)
        return "| " + " | ".join(cells) + " |", [f"{pair}: merge failed: {why}"]
    with open(os.path.join(d, "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(d, "groups.json")) as f:
        groups = json.load(f)
    with np.load(os.path.join(d, "taps.npz")) as z:
        taps = {k: z[k].shape for k in z.files}
    bare = sum(float(_last_line(os.path.join(d, f"bare_{s}.time")).split()[0]) for s in "ab")
    used = report.get("calibration_samples", samples)
    flops, notes = statistics_flops(groups, taps, used)
    stats_s = [flops / (gflops * 1e9) for gflops in peaks]
    limits = [bare + s for s in stats_s]
    merged_time = os.path.join(d, "bare_merged.time")
    merged = float(_last_line(merged_time).split()[0]) if os.path.exists(merged_time) else None
    needs_merged = report.get("repaired_layers", 0) > 0 or bool(report.get("refitted_layers"))
    with_merged = limits[0] + (merged if needs_merged else 0.0) if merged is not None else None
    seconds = report["seconds"]
    total = sum(seconds.values())
    shown = [seconds.get(p, 0.0) for p in PHASES_SHOWN]
    other = total - sum(shown)
    size_a, size_b = os.path.getsize(a), os.path.getsize(b)
    peak = report["peak_rss_mib"]
    cells = [
        pair,
        "%.1f" % (parameters(a) / 1e6),
        "%.0f" % (size_a / 2**20),
        "%d" % used,
        "%.1f" % bare,
        " · ".join("%.2f" % s for s in stats_s),
        " · ".join("%.1f" % l for l in limits),
        *("%.1f" % s for s in shown),
        "%.1f" % other,
        "%.1f" % total,
        " · ".join("%.2f" % (total / l) if l > 0 else "–" for l in limits),
        "–" if merged is None else "%.1f" % merged + ("" if needs_merged else " (not needed)"),
        "–" if not with_merged else "%.2f" % (total / with_merged),
        "%.0f" % peak,
        "%.2f" % (peak * 2**20 / (size_a + size_b)),
    ]
    notes = [f"{pair}: {n}" for n in notes]
    notes.append(
        f"{pair}: engine {report.get('engine', '?')}; {len(groups['groups'])} groups ({report.get('fixed_weight_axes', '?')} fixed weight axes, "
        f"{report.get('repaired_layers', '?')} repaired layers, {report.get('sweeps', '?')} sweeps"
        + (f", unknown ops {report['unknown_ops']}" if report.get("unknown_ops") else "")
        + "); seconds per phase: "
        + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items())
    )
    log = os.path.join(d, "merge.log")
    if os.path.exists(log):
        with open(log) as f:
            notes += [f"{pair}: mudsc said: {l.strip()}" for l in f if "warn" in l.lower()]
    return "| " + " | ".join(cells) + " |", notes


HEADER = (
    "| pair | params per model (M) | model MiB | samples | bare passes s | Σxxᵀ at peak s (f64 · f32) | limit s (f64 · f32) "
    "| calibration | matching | repair | refit | other | total s | total ÷ limit (f64 · f32) | merged pass s | ÷ limit with it | peak RSS MiB "
    "| peak ÷ model bytes |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache")
    p.add_argument("work")
    p.add_argument("pairs", nargs="+")
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--gemm-gflops", type=float, required=True, help="f64 GEMM peak")
    p.add_argument("--gemm-gflops-f32", type=float, required=True, help="f32 GEMM peak")
    p.add_argument("--notes", help="file to write per-pair notes (phase seconds, unknown tap shapes) to")
    args = p.parse_args()
    print(HEADER)
    all_notes = []
    for pair in args.pairs:
        line, notes = row(args.cache, args.work, pair, args.samples, (args.gemm_gflops, args.gemm_gflops_f32))
        print(line)
        all_notes += notes
    if args.notes:
        with open(args.notes, "w") as f:
            f.write("".join(n + "\n" for n in all_notes))


if __name__ == "__main__":
    sys.exit(main())
