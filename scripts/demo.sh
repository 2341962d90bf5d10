#!/usr/bin/env bash
# The main job on the bundled fixtures, from a fresh machine: install what is needed, build,
# merge the bundled Fashion-MNIST pair (model A: classes 0-4, model B: classes 5-9, different
# seeds) with MuDSC, then score A, B, their ensemble and the merged model on the test set:
# joint accuracy (argmax over all 10 classes) and per-task accuracy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release --quiet
mudsc="${CARGO_TARGET_DIR:-target}/release/mudsc"
pair="${1:-mlp}"
method="${2:-mudsc-zip}"
out="${TMPDIR:-/tmp}/mudsc-demo-${pair}-${method}.onnx"
a="fixtures/models/${pair}_a.onnx"
b="fixtures/models/${pair}_b.onnx"
"$mudsc" merge "$a" "$b" -o "$out" --calib fixtures/data/calib.npz --method "$method"
echo
"$mudsc" eval "$a" "$b" --ensemble --data fixtures/data/test.npz --tasks 0-4,5-9
"$mudsc" eval "$out" --data fixtures/data/test.npz --tasks 0-4,5-9
