#!/usr/bin/env bash
# The main job on the bundled fixtures, from a fresh machine: install what is needed, build,
# then score the bundled Fashion-MNIST model pair (model A: classes 0-4, model B: classes 5-9)
# on the bundled test set: joint accuracy and per-task accuracy.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo build --release --features ort --quiet
mudsc=target/release/mudsc
pair="${1:-mlp}"
for role in a b; do
    "$mudsc" eval "fixtures/models/${pair}_${role}.onnx" --data fixtures/data/test.npz --tasks 0-4,5-9
done
