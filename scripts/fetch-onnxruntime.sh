#!/usr/bin/env bash
# Fetches the ONNX Runtime shared library for the `ort` backend from the pinned PyPI wheel
# (no other download source is needed), checks the wheel's sha256 and extracts the library to
# DEST (default third_party/onnxruntime). Prints the library path. Idempotent.
set -euo pipefail
ORT_VERSION="${ORT_VERSION:-1.31.1}"
WHEEL_SHA256="${WHEEL_SHA256:-5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f}"
root="$(cd "$(dirname "$0")/.." && pwd)"
# The project's virtual environment (scripts/setup.sh) when there is one; pip only downloads.
py="${PYTHON:-$root/.venv/bin/python}"
[ -x "$py" ] || py=python3
DEST="${1:-$root/third_party/onnxruntime}"
mkdir -p "$DEST"
lib="$DEST/libonnxruntime.so.$ORT_VERSION"
if [ ! -f "$lib" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version 3.11 --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
        "onnxruntime==$ORT_VERSION" -d "$tmp" >&2
    whl="$(ls "$tmp"/onnxruntime-"$ORT_VERSION"-*.whl)"
    echo "$WHEEL_SHA256  $whl" | sha256sum -c --quiet - >&2
    "$py" - "$whl" "$DEST" "$ORT_VERSION" <<'PY'
import os, sys, zipfile
whl, dest, ver = sys.argv[1:]
name = f"onnxruntime/capi/libonnxruntime.so.{ver}"
with zipfile.ZipFile(whl) as z, z.open(name) as src:
    tmp = os.path.join(dest, os.path.basename(name) + ".part")
    with open(tmp, "wb") as out:
        out.write(src.read())
    os.replace(tmp, os.path.join(dest, os.path.basename(name)))
PY
fi
ln -sf "libonnxruntime.so.$ORT_VERSION" "$DEST/libonnxruntime.so.1"
ln -sf "libonnxruntime.so.1" "$DEST/libonnxruntime.so"
echo "$lib"
