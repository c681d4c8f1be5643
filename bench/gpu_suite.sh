#!/usr/bin/env bash
# The GPU suite of issue 11: build nepenthe._C for sm_90, CUDA + Triton parity and race tests, copy bandwidth,
# fused-op and masked-optimizer benchmarks as % of that bandwidth and vs torch / torch.compile / torch fused,
# measure overhead, folded-model latency, and the issue's targets marked met / NOT met. All logic is in
# bench/gpu_suite.py (its docstring lists the steps and their time budgets); this wrapper only picks the
# python and the repository root.
#
#   bash bench/gpu_suite.sh OUT_DIR [--budget 470] [--only STEP,...]    on the lent GPU machine
#   bash bench/gpu_suite.sh OUT_DIR --dry-run                           without a GPU (CPU, tiny sizes)
#
# On the device (nothing compiled travels, no carry needed; the suite builds the extension there, offline):
#   device tool `run`: command `bash bench/gpu_suite.sh $OUT`, timeout_s 540 (the suite ends itself after
#   --budget seconds, default 470 = under 8 minutes, and prints its table last). A rerun of what a first
#   call missed: `bash bench/gpu_suite.sh $OUT --only build,kernels,optim --budget 300` (the CUDA backend
#   needs `build` in the same call: a fresh machine has no _C).
# OUT_DIR receives 6 files: summary.md (the table), results.csv, results.json, build.log, tests.txt, steps.log.
#   PYTHON   python with torch (default: python3, the device image's torch python)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash bench/gpu_suite.sh OUT_DIR [--dry-run] [--budget SECONDS] [--only STEP,...]" >&2
    exit 2
fi
OUT="$1"
shift
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
cd "$ROOT" || exit 2
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$ROOT/bench/gpu_suite.py" "$OUT" "$@"
