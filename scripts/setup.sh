#!/usr/bin/env bash
# Installs everything mudsc's build, demo and tests need on a fresh machine, from the package
# registries only, inside this checkout: a virtual environment `.venv/` holding the Python
# packages of scripts/requirements.txt (never the system interpreter, which distributions that
# mark their Python externally managed refuse to pip-install into), and the ONNX Runtime
# library (from its PyPI wheel). Cargo fetches the Rust crates itself. Idempotent and quiet
# when already done: the venv is reused, and pip runs again only when requirements.txt changes.
#
# What the machine must already have: a Rust toolchain (cargo, rustc >= 1.92) and python3
# >= 3.11 with its venv module (Debian/Ubuntu: apt-get install python3 python3-venv).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

missing() {
    echo "scripts/setup.sh: $1" >&2
    exit 1
}

command -v cargo >/dev/null 2>&1 && command -v rustc >/dev/null 2>&1 ||
    missing "no Rust toolchain on PATH (cargo, rustc >= 1.92); install one with rustup (https://rustup.rs)"
rustc_minor="$(rustc --version | sed -n 's/^rustc 1\.\([0-9]*\).*/\1/p')"
[ -n "$rustc_minor" ] && [ "$rustc_minor" -ge 92 ] ||
    missing "$(rustc --version) is too old: mudsc needs rustc >= 1.92 (rustup update)"
command -v python3 >/dev/null 2>&1 ||
    missing "no python3 on PATH: install Python >= 3.11 with its venv module (apt-get install python3 python3-venv)"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    missing "$(python3 --version 2>&1) is too old: the pinned packages need Python >= 3.11"
python3 -c 'import venv, ensurepip' 2>/dev/null ||
    missing "python3 has no venv/ensurepip module: install it (apt-get install python3-venv)"

venv="$root/.venv"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
    python3 -m venv "$venv" || { rm -rf "$venv"; missing "python3 -m venv $venv failed"; }
fi
stamp="$venv/.mudsc-requirements.sha256"
want="$(sha256sum "$root/scripts/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$py" -m pip install --quiet --disable-pip-version-check -r "$root/scripts/requirements.txt"
    echo "$want" >"$stamp"
fi
PYTHON="$py" "$root/scripts/fetch-onnxruntime.sh" >/dev/null
