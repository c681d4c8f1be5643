#!/usr/bin/env bash
# The main job on the bundled default data: set up .venv if needed, then prune, fold and benchmark
# a deep residual MLP on scikit-learn's digits. Extra arguments go to `nepenthe run`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec "$VENV/bin/nepenthe" run --dataset digits --model mlp --out runs/digits-mlp "$@"
