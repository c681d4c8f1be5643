#!/usr/bin/env bash
# The Fashion-MNIST study of bench/RESULTS.md: NEPENTHE vs IMP vs EGP vs EASIER (and NEPENTHE without
# the budget's fan-in normalisation) on the full Fashion-MNIST (54k train / 6k val / 10k test), for the
# residual MLP, the small CNN and the width-8 CIFAR ResNet-18, 3 seeds each, every schedule halved.
#   bash bench/run_study.sh [OUT]        (default OUT: runs/study; about 80 minutes on 2 cores)
# Resumable: rerun the same command after an interruption. The tables land in OUT/fashion-*/results.md;
# bench/study/ holds the committed copies (results.md, results.csv, results.json, plots).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$ROOT"
OUT="${1:-runs/study}"
for model in mlp cnn resnet18; do
    "$VENV/bin/nepenthe" experiment "fashion-$model" --out "$OUT/fashion-$model" --epochs-scale 0.5 --threads 2
done
