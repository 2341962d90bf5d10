#!/usr/bin/env bash
# Merges every bundled pair with every method and prints a markdown table of joint accuracy
# and per-task mean accuracy on the bundled test set (the README's results table).
# usage: scripts/results.sh [pair ...]   (release build; about 10 minutes on 2 cores)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release --quiet
mudsc="${CARGO_TARGET_DIR:-target}/release/mudsc"
py=.venv/bin/python  # the project's virtual environment (scripts/setup.sh)
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pairs=("$@")
[ ${#pairs[@]} -gt 0 ] || pairs=(mlp resnet20_bn_folded resnet20_bn_kept resnet20_bn_dynamo resnet20_gn vit vit_mha dwcnn)
methods=(avg rebasin act-align zipit weight-zip mudsc-align mudsc-zip)
score() { "$mudsc" eval "$@" --data fixtures/data/test.npz --tasks 0-4,5-9 --json; }
printf '| pair | A (task mean) | B | ensemble joint / task mean |'
printf ' %s |' "${methods[@]}"
printf '\n|---|---|---|---|'
printf -- '---|%.0s' "${methods[@]}"
printf '\n'
for pair in "${pairs[@]}"; do
    a="fixtures/models/${pair}_a.onnx"
    b="fixtures/models/${pair}_b.onnx"
    row=$(score "$a" "$b" --ensemble | "$py" -c '
import json, sys
d = json.load(sys.stdin)
f = lambda r: "%.1f" % (100 * r["task_mean"])
a, b, e = d[sys.argv[1]], d[sys.argv[2]], d["ensemble"]
print("%s | %s | %.1f / %s" % (f(a), f(b), 100 * e["top1"]["correct"] / e["top1"]["total"], f(e)))
' "$a" "$b")
    printf '| %s | %s |' "$pair" "$row"
    for m in "${methods[@]}"; do
        "$mudsc" merge "$a" "$b" -o "$tmp/m.onnx" --calib fixtures/data/calib.npz --method "$m" >/dev/null 2>&1
        cell=$(score "$tmp/m.onnx" | "$py" -c '
import json, sys
r = json.load(sys.stdin)
print("%.1f / %.1f" % (100 * r["top1"]["correct"] / r["top1"]["total"], 100 * r["task_mean"]))')
        printf ' %s |' "$cell"
    done
    printf '\n'
done
