#!/usr/bin/env bash
# Benchmarks mudsc on real-size model pairs at their real input sizes: torchvision resnet18 and
# resnet50 and timm vit_base_patch16_224 at 224×224, and transformers' bert-base (12 layers,
# d 768) on 128-token sequences, two random-init seeds each (scripts/bench/make_real.py;
# bert_base only when asked for by --models). Per pair:
# the bare forward passes of both endpoints over the calibration set (`mudsc run`, ONNX
# Runtime, same batch as the merge), the merge (`mudsc merge --backend ort`, default method
# mudsc-zip) with its report (seconds per phase, peak memory), and the physical limit: bare
# passes + the Σxxᵀ statistics arithmetic at the machine's GEMM peak (see
# scripts/bench/real_table.py). Prints a markdown table; --write also saves it as the first
# section of docs/benchmarks-real.md (the sections after it are kept).
#
# usage: scripts/bench-real.sh [--samples N] [--models resnet18,resnet50,vit_b16,bert_base] [--write]
#        scripts/bench-real.sh --bundled resnet20_bn_folded[,vit,...]
#   --bundled: the same table for bundled pairs (fixtures/models/<pair>_a/_b.onnx over all of
#   fixtures/data/calib.npz, mudsc's defaults), with no model generation and no PyTorch: it
#   uses $BENCH_PYTHON, else .venv (scripts/setup.sh), for numpy and onnx.
# environment: BENCH_CACHE (models and calibration set; default
#   ${XDG_CACHE_HOME:-$HOME/.cache}/mudsc-bench), BENCH_THREADS (PyTorch threads while
#   generating, default 1), GEMM_GFLOPS and GEMM_GFLOPS_F32 (the f64 and f32 GEMM peaks in
#   GFLOP/s; unset, `cargo bench --bench scaling -- peak` measures mudsc's kernel here), BATCH (samples per inference batch,
#   passed to both `run` and `merge`; unset, both use mudsc's default), BENCH_PYTHON (an
#   interpreter that already has torch, torchvision, timm, onnx and onnxruntime: used instead
#   of creating .venv-bench, e.g. on a machine without a package index; the table names the
#   versions it has), DEVICE (`cpu`, the default, or `cuda`/`cuda:N`: passed as --device to
#   both `run` and `merge`, ONNX Runtime's CUDA execution provider; needs the onnxruntime-gpu
#   library, given by ORT_DYLIB_PATH).
# time: the first run creates .venv-bench (~2 minutes, ~3 GB: PyTorch from PyPI brings its
#   CUDA libraries) and generates the models (~30 s per pair); then, per pair, the passes and
#   the merge. On 2 cores (mudsc of 2026-11-29) with 256 samples: resnet18 under 1 minute,
#   resnet50 2 minutes, vit_b16 about 14 minutes, bert_base about 9 minutes; peak memory of
#   the merges 1.6, 1.6, 3.7 and 4.5 GB.
# Needs target/release/mudsc built with the `ort` feature and the ONNX Runtime library
# (scripts/fetch-onnxruntime.sh); it does not build it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

samples=256
models=resnet18,resnet50,vit_b16
write=0
bundled=0
while [ $# -gt 0 ]; do
    case "$1" in
        --samples) samples="$2"; shift 2 ;;
        --samples=*) samples="${1#*=}"; shift ;;
        --models) models="$2"; shift 2 ;;
        --models=*) models="${1#*=}"; shift ;;
        --write) write=1; shift ;;
        --bundled) bundled=1; models="$2"; shift 2 ;;
        --bundled=*) bundled=1; models="${1#*=}"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench-real.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ "$bundled" = 1 ] && [ "$write" = 1 ]; then
    echo "bench-real.sh: --write saves the real-size table; print the bundled one instead" >&2
    exit 2
fi
cache="${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/mudsc-bench}"
mudsc="$root/target/release/mudsc"
if [ ! -x "$mudsc" ]; then
    echo "bench-real.sh: $mudsc is missing: cargo build --release --features ort" >&2
    exit 1
fi
# One batch size for the bare passes and the merge: $BATCH, else mudsc's default.
batch_args=()
if [ -n "${BATCH:-}" ]; then
    batch_args=(--batch "$BATCH")
    batch="$BATCH"
else
    batch="$("$mudsc" merge --help | sed -n '/--batch/,/default:/p' | sed -n 's/.*\[default: \([0-9]*\)\].*/\1/p')"
    batch="${batch:-?}, mudsc's default"
fi
# The library: $ORT_DYLIB_PATH when set (e.g. onnxruntime-gpu's for DEVICE=cuda), else the
# pinned CPU wheel's.
[ -n "${ORT_DYLIB_PATH:-}" ] || "$root/scripts/fetch-onnxruntime.sh" >/dev/null
device="${DEVICE:-cpu}"
batch_args+=(--device "$device")
revision="commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' with uncommitted changes to src/'), binary built $(date -u -r "$mudsc" '+%Y-%m-%d %H:%M UTC')"

# The virtual environment, (re)installed when the pins change, unless $BENCH_PYTHON is given.
if [ -n "${BENCH_PYTHON:-}" ]; then
    py="$BENCH_PYTHON"
elif [ "$bundled" = 1 ]; then
    py="$root/.venv/bin/python"
    [ -x "$py" ] || { echo "bench-real.sh: --bundled needs .venv (bash scripts/setup.sh) or \$BENCH_PYTHON" >&2; exit 1; }
else
    venv="$root/.venv-bench"
    pins="$root/scripts/bench/requirements.txt"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if ! cmp -s "$pins" "$venv/.pins"; then
        echo "Installing $(grep -c '==' "$pins") pinned packages into .venv-bench ..." >&2
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
        cp "$pins" "$venv/.pins"
    fi
    py="$venv/bin/python"
fi

# The GEMM peaks of the limit: mudsc's own kernel, f64 and f32 (calibration multiplies in f32
# and sums in f64), measured now by the scaling benchmark unless $GEMM_GFLOPS gives them.
if [ -n "${GEMM_GFLOPS:-}" ]; then
    gemm="$GEMM_GFLOPS"
    gemm32="${GEMM_GFLOPS_F32:-$(awk -v g="$gemm" 'BEGIN { print 2 * g }')}"
    gemm_note="GEMM peaks used for the limit: f64 $gemm, f32 $gemm32 GFLOP/s (from \$GEMM_GFLOPS$([ -n "${GEMM_GFLOPS_F32:-}" ] && echo ' and $GEMM_GFLOPS_F32' || echo '; f32 taken as twice f64'))"
else
    echo "Measuring the GEMM kernel's peaks (cargo bench --bench scaling -- peak) ..." >&2
    peaks="$(cargo bench --quiet --bench scaling -- peak 2>/dev/null)" || {
        echo "bench-real.sh: could not run the scaling benchmark; set GEMM_GFLOPS" >&2
        exit 1
    }
    gemm="$(sed -n 's/^gemm f64 GFLOP\/s: //p' <<< "$peaks")"
    gemm32="$(sed -n 's/^gemm f32 GFLOP\/s: //p' <<< "$peaks")"
    gemm_note="GEMM peaks used for the limit: f64 $gemm, f32 $gemm32 GFLOP/s (mudsc's kernel, the gemm crate, 2048³, measured in this run)"
fi
echo "$gemm_note" >&2

if [ "$bundled" = 1 ]; then
    # The bundled pairs and calibration set (every sample of it, as a merge takes by default).
    cache="$root/fixtures/models"
    calib="$root/fixtures/data/calib.npz"
    samples="$("$py" -c "import numpy as np, sys; print(len(np.load(sys.argv[1])['input']))" "$calib")"
else
    start=$(date +%s)
    "$py" "$root/scripts/bench/make_real.py" "$cache" --models "$models" --samples "$samples" >&2
    echo "Models and calibration set ready in $cache ($(( $(date +%s) - start )) s)." >&2
    calib="$cache/calib.npz"
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

pairs=()
IFS=, read -r -a pairs <<< "$models"
for pair in "${pairs[@]}"; do
    [ -n "$pair" ] || continue
    d="$work/$pair"
    mkdir -p "$d"
    a="$cache/${pair}_a.onnx"
    b="$cache/${pair}_b.onnx"
    # The pair's calibration set: the images', or BERT's token sequences.
    pcalib="$calib"
    [ "$bundled" = 1 ] || [ "$pair" != bert_base ] || pcalib="$cache/bert_calib.npz"
    # One sample of the model's inputs (not the labels a bundled set also holds), written for
    # the tap shapes below, and each input's shape as a `--shape` argument.
    shapes=()
    while read -r spec; do shapes+=(--shape "$spec"); done < <("$py" -c "
import numpy as np, onnx, sys
inputs = {i.name for i in onnx.load(sys.argv[3], load_external_data=False).graph.input}
z = np.load(sys.argv[1])
one = {k: z[k][:1] for k in z.files if k in inputs}
np.savez(sys.argv[2], **one)
print('\n'.join(k + '=' + ','.join(map(str, v.shape)) for k, v in one.items()))" \
        "$pcalib" "$work/one.npz" "$a")
    # Groups and the shapes of their calibration taps (one sample through model A).
    "$mudsc" groups "$a" --json "${shapes[@]}" > "$d/groups.json"
    taps="$("$py" -c "import json, sys; print(','.join(sorted({g['tap'] for g in json.load(open(sys.argv[1]))['groups'] if g.get('tap')})))" "$d/groups.json")"
    extra=()
    [ -z "$taps" ] || extra=(--extra "$taps")
    "$mudsc" run "$a" --input "$work/one.npz" --backend ort "${extra[@]}" --output "$d/taps.npz" > /dev/null
    # The bare forward passes, one endpoint at a time.
    for s in a b; do
        echo "$pair: forward passes of model ${s^^} over $samples samples ..." >&2
        /usr/bin/time -f "%e %M" -o "$d/bare_$s.time" \
            "$mudsc" run "$cache/${pair}_$s.onnx" --input "$pcalib" --backend ort "${batch_args[@]}" > /dev/null
        echo "  $(cat "$d/bare_$s.time") (s, KiB)" >&2
    done
    # The merge.
    echo "$pair: merge ..." >&2
    /usr/bin/time -f "%e %M" -o "$d/merge.time" \
        "$mudsc" merge "$a" "$b" -o "$d/merged.onnx" --calib "$pcalib" --backend ort \
        "${batch_args[@]}" --report "$d/report.json" > "$d/merge.log" 2>&1 || {
            echo "bench-real.sh: the merge of $pair failed:" >&2
            grep -v '^Command exited' "$d/merge.log" | tail -5 | tee "$d/failed" >&2
            [ -s "$d/failed" ] || echo "no message" > "$d/failed"
            continue
        }
    echo "  $(tail -1 "$d/merge.time") (s, KiB)" >&2
    # A CUDA provider that did not start leaves the merge on the CPU with a warning: show it.
    grep -i 'cuda' "$d/merge.log" >&2 || true
    # The bare forward pass of the merged model: the one more pass that repair (and a refit
    # that runs one) needs, for the limit that counts it.
    echo "$pair: forward passes of the merged model over $samples samples ..." >&2
    /usr/bin/time -f "%e %M" -o "$d/bare_merged.time" \
        "$mudsc" run "$d/merged.onnx" --input "$pcalib" --backend ort "${batch_args[@]}" > /dev/null
    echo "  $(cat "$d/bare_merged.time") (s, KiB)" >&2
    rm -f "$d/merged.onnx"
done

table="$("$py" "$root/scripts/bench/real_table.py" "$cache" "$work" "${pairs[@]}" \
    --samples "$samples" --gemm-gflops "$gemm" --gemm-gflops-f32 "$gemm32" --notes "$work/notes.txt")"
machine="$(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(free -g | awk '/Mem:/ {print $2}') GiB"
if [ "$device" != cpu ]; then
    machine="$machine; --device $device: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo 'GPU not named')"
fi
echo
echo "Machine: $machine"
echo "$gemm_note"
echo
echo "$table"
echo
sed 's/^/- /' "$work/notes.txt"

if [ "$write" = 1 ]; then
    # The table replaces the file's first section (up to its first "## " heading); the
    # sessions' notes below it are kept.
    doc="$root/docs/benchmarks-real.md"
    kept=""
    [ ! -f "$doc" ] || kept="$(awk 'NR > 1 && /^## / { p = 1 } p' "$doc")"
    versions="$("$py" -c "import torch, torchvision, timm, transformers, onnx, onnxruntime, numpy; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, timm {timm.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}, onnxruntime (Python, for export checks) {onnxruntime.__version__}, numpy {numpy.__version__}')")"
    {
        echo "# Benchmarks on real-size models"
        echo
        echo "Output of \`scripts/bench-real.sh --samples $samples --models $models\` on the machine"
        echo "named below (the timings are as clean as the machine was quiet). Pairs: torchvision"
        echo "resnet18 and resnet50, timm vit_base_patch16_224, each two random-init seeds (untrained,"
        echo "10 classes; ResNet BatchNorm statistics recomputed on random images, then folded by the"
        echo "exporter; ViT norm parameters and biases given a little noise), exported at 224×224 with"
        echo "\`torch.onnx.export(dynamo=False, opset_version=17)\` by \`scripts/bench/make_real.py\`"
        echo "($versions); bert_base, where listed: transformers' bert-base sizes, random init, the"
        echo "ViT's noise, on 128-token sequences."
        echo "Calibration set: $samples standard-normal images (bert_base: $samples random token sequences"
        echo "of 16–128 tokens, padded and masked). mudsc: $revision."
        echo
        echo "- bare passes: \`mudsc run\` of model A, then of model B, over the calibration set on ONNX"
        echo "  Runtime (batch $batch; wall clock including loading each model)."
        echo "- Σxxᵀ at peak: the statistics arithmetic, Σ over groups of 2 · samples · tap positions ·"
        echo "  (2·width)² flops (the joint A‖B matrix, full: the issue's definition; mudsc computes its upper triangle, about half),"
        echo "  at the kernel's f64 peak · at its f32 peak (calibration multiplies in f32, sums in f64)."
        echo "- limit: bare passes + Σxxᵀ at peak, f64 · f32. The repair's forward passes are not in it."
        echo "- merged pass s: \`mudsc run\` of the merged model over the calibration set, the one pass"
        echo "  of it that repair needs (counted where the merge repaired or refitted a layer); ÷ limit"
        echo "  with it: total ÷ (the f64 limit + that pass)."
        echo "- calibration, matching, repair, refit: \`mudsc merge --backend ort\` (mudsc-zip, batch $batch),"
        echo "  seconds of those phases in its report; other: the rest (read, discovery, statistics,"
        echo "  rewrite, write, ...); total: the sum of all phases."
        echo "- peak RSS: the merge process's peak resident memory; ÷ model bytes: over both model files."
        echo
        echo "Machine: $machine"
        echo
        echo "$gemm_note"
        echo
        echo "$table"
        echo
        sed 's/^/- /' "$work/notes.txt"
        [ -z "$kept" ] || printf '\n%s\n' "$kept"
    } > "$doc.tmp"
    mv "$doc.tmp" "$doc"
    echo "Wrote the first section of docs/benchmarks-real.md" >&2
fi
