#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, format check, every Rust test with the ONNX
# Runtime backend enabled, then the Python package built into the project's virtual
# environment and its pytest tests (tests/python/).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
cargo fmt --all -- --check
cargo test --features ort --no-fail-fast
# The extension is built from the same target directory and dev profile as the tests above, with
# the same dependency features (see Cargo.toml): only mudsc itself compiles again, as a cdylib.
VIRTUAL_ENV="$root/.venv" .venv/bin/maturin develop
.venv/bin/python -m pytest -q tests/python
