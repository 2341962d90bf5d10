#!/usr/bin/env bash
# Accuracy against parameters on the bundled pairs: mudsc-zip at --width 1 … 2, spread evenly
# (`--widen all`, solid lines) and per parameter (`--widen per-parameter`, dashed), defaults
# otherwise (ONNX Runtime), each pair's ensemble beside it. Writes docs/width-curve.csv and
# draws docs/width-curve.png (matplotlib, installed into .venv-bench from PyPI if missing).
#   bash scripts/width-curve.sh            # ~8 minutes on 2 cores
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bin=target/release/mudsc
[ -x "$bin" ] || cargo build --release
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
csv=docs/width-curve.csv
echo "pair,spread,width,parameters,task_mean,joint" > "$csv"
score() { # model... -> "task_mean joint" (the ensemble of several models)
    "$bin" eval "$@" --data fixtures/data/test.npz --tasks 0-4,5-9 --json ${ENS:-} |
        python3 -c 'import json,sys; d=json.load(sys.stdin); d=d.get("ensemble",d); print(d["task_mean"]*100, d["top1"]["correct"]/d["top1"]["total"]*100)'
}
for pair in mlp resnet20_bn_folded resnet20_gn vit vit_mha dwcnn; do
    a=fixtures/models/${pair}_a.onnx b=fixtures/models/${pair}_b.onnx
    read -r t j < <(ENS=--ensemble score "$a" "$b")
    echo "$pair,ensemble,ensemble,2,$t,$j" >> "$csv"
    for spread in all per-parameter; do
        for w in 1 1.1 1.25 1.5 1.75 2; do
            "$bin" merge "$a" "$b" -o "$tmp/m.onnx" --calib fixtures/data/calib.npz --backend ort \
                --width "$w" --widen "$spread" --report "$tmp/r.json" > /dev/null 2>&1
            p=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["merged_parameters"]/r["model_parameters"])' "$tmp/r.json")
            read -r t j < <(score "$tmp/m.onnx")
            echo "$pair,$spread,$w,$p,$t,$j" >> "$csv"
            echo "$pair width $w ($spread): ${p}x parameters, task mean $t"
        done
    done
done
py=.venv-bench/bin/python
[ -x "$py" ] || { python3 -m venv .venv-bench; py=.venv-bench/bin/python; }
"$py" -c 'import matplotlib' 2>/dev/null || "$py" -m pip install -q matplotlib
"$py" - "$csv" docs/width-curve.png <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = list(csv.DictReader(open(sys.argv[1])))
fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
for i, pair in enumerate(dict.fromkeys(r["pair"] for r in rows)):
    ens = [r for r in rows if r["pair"] == pair and r["width"] == "ensemble"][0]
    color = None
    for spread, style in (("all", "o-"), ("per-parameter", "s--")):
        pts = [r for r in rows if r["pair"] == pair and r["spread"] == spread]
        x = [float(r["parameters"]) for r in pts]
        y = [float(r["task_mean"]) for r in pts]
        line, = ax.plot(x, y, style, color=color, ms=4, label=pair if spread == "all" else None)
        color = line.get_color()
    ax.axhline(float(ens["task_mean"]), color=color, ls=":", lw=1)
ax.set_xlabel("merged parameters ÷ one model's (--width 1 … 2)")
ax.set_ylabel("per-task mean accuracy (%)")
ax.set_title("mudsc-zip with --width: accuracy against size\n(solid: --widen all, dashed: per-parameter, dotted: ensemble)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(sys.argv[2])
PY
echo "wrote $csv and docs/width-curve.png"
