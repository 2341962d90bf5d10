#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format check, then every test with the ONNX
# Runtime backend enabled.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo fmt --all -- --check
cargo test --features ort --no-fail-fast
