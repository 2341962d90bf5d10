#!/usr/bin/env bash
# The benchmark tables of the README: per bundled pair and method, seconds per phase, total,
# peak memory, the matching + rewrite overhead against the calibration forward passes, and
# merge quality beside the endpoints and the ensemble; then the kernel scaling tables
# (`cargo bench --bench scaling`).
# usage: scripts/bench.sh [pair ...]   (release build; about 20 minutes on 2 cores)
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
[ ${#pairs[@]} -gt 0 ] || pairs=(mlp resnet20_bn_folded resnet20_gn vit dwcnn)
methods=(avg rebasin act-align zipit weight-zip mudsc-align mudsc-zip)
score() { "$mudsc" eval "$@" --data fixtures/data/test.npz --tasks 0-4,5-9 --json; }

echo "Machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB"
echo
for pair in "${pairs[@]}"; do
    a="fixtures/models/${pair}_a.onnx"
    b="fixtures/models/${pair}_b.onnx"
    score "$a" "$b" --ensemble > "$tmp/endpoints.json"
    echo "### ${pair}"
    echo
    echo "| method | read | discovery | calibration | statistics | matching | rewrite | repair | write | total s | peak MiB | (matching+rewrite) ÷ calibration | joint % | task mean % |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    "$py" - "$tmp/endpoints.json" "$a" "$b" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
for name, key in (("A", sys.argv[2]), ("B", sys.argv[3]), ("ensemble", "ensemble")):
    r = d[key]
    print("| %s | | | | | | | | | | | | %.1f | %.1f |" % (name, 100 * r["top1"]["correct"] / r["top1"]["total"], 100 * r["task_mean"]))
EOF
    runs=()
    for m in "${methods[@]}"; do runs+=("$m|"); done
    runs+=("mudsc-zip|-1")
    for run in "${runs[@]}"; do
        m="${run%%|*}"
        cut="${run#*|}"
        extra=()
        label="$m"
        if [ -n "$cut" ]; then
            extra=(--zip-until="$cut")
            label="$m, partial $cut"
        fi
        "$mudsc" merge "$a" "$b" -o "$tmp/m.onnx" --calib fixtures/data/calib.npz --method "$m" \
            --report "$tmp/r.json" "${extra[@]}" >/dev/null 2>&1
        score "$tmp/m.onnx" > "$tmp/s.json"
        "$py" - "$tmp/r.json" "$tmp/s.json" "$label" <<'EOF'
import json, sys
r, s = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
t = r["seconds"]
phases = ["read", "discovery", "calibration", "statistics", "matching", "rewrite", "repair", "write"]
cells = ["%.2f" % t[p] if p in t else "–" for p in phases]
total = sum(t.values())
calib = t.get("calibration", 0)
over = "%.2f" % ((t.get("matching", 0) + t.get("rewrite", 0)) / calib) if calib > 0 else "–"
print("| %s | %s | %.2f | %.0f | %s | %.1f | %.1f |" % (
    sys.argv[3], " | ".join(cells), total, r["peak_rss_mib"], over,
    100 * s["top1"]["correct"] / s["top1"]["total"], 100 * s["task_mean"]))
EOF
    done
    echo
done
cargo bench --quiet --features ort --bench scaling
