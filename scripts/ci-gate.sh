#!/usr/bin/env bash
# The CI gate for an exported graph (docs/ci.md): proves the discovered symmetry on the model
# itself (`mudsc check`) and compares its structure with a committed spec (`mudsc groups
# --expect`), keeping both JSON documents and the structure diff in OUT for the CI's
# artifacts. Extra arguments go to `check` (e.g. --data inputs.npz, --trials 5).
#
# usage: scripts/ci-gate.sh MODEL.onnx SPEC.json OUT [check args ...]
# exit:  0 both gates pass; 1 a check trial failed or the groups differ from the spec;
#        2 bad input (unreadable model, spec or data). $MUDSC names the binary (default: mudsc).
set -uo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 MODEL.onnx SPEC.json OUT [check args ...]" >&2
    exit 2
fi
model="$1" spec="$2" out="$3"
shift 3
mudsc="${MUDSC:-mudsc}"
mkdir -p "$out" || exit 2
"$mudsc" check "$model" --json "$@" >"$out/check.json"
check=$?
"$mudsc" groups "$model" --json --expect "$spec" >"$out/groups.json" 2>"$out/groups-diff.txt"
groups=$?
cat "$out/groups-diff.txt" >&2
# The worse of the two: bad input (2) over a failed gate (1) over a pass (0).
exit $((check > groups ? check : groups))
