#!/usr/bin/env bash
# Installs everything mudsc's build, demo and tests need on a fresh machine, from the package
# registries only: the Python reference packages (PyPI) and the ONNX Runtime library (from its
# PyPI wheel). Cargo fetches the Rust crates itself. Idempotent and quiet when already done.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if ! python3 -c "import numpy, onnx, onnxruntime" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check -r "$root/scripts/requirements.txt"
fi
"$root/scripts/fetch-onnxruntime.sh" >/dev/null
