#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format check, every Rust test with the ONNX
# Runtime backend enabled, then the Python package built into the project's virtual
# environment and its pytest tests.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo fmt --all -- --check
cargo test --features ort --no-fail-fast
