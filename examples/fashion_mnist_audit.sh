#!/usr/bin/env bash
# Reproduce the plain / secure / guarded table on Fashion-MNIST (1000 members, 1000 non-members).
#
#   bash examples/fashion_mnist_audit.sh [OUT_DIR] [MODE]      # MODE: threads (default), lockstep, processes, reference
#
# Needs Debian's Fashion-MNIST (apt-get install dataset-fashion-mnist). Part 1 is one command; part 2 redoes
# the same audit step by step with the CLI, from the model and data files part 1 left behind. With MODE
# threads each part runs the guard on 2000 queries between three parties (about 10 minutes per part here).
set -euo pipefail
OUT=${1:-fashion-mnist-example}
MODE=${2:-threads}

# 1. everything at once: train an overfitting MLP, train the defender, compile, run, audit, print the table
siguard demo --dataset fashion-mnist --out "$OUT" --mode "$MODE"

# 2. the same, one CLI step at a time
siguard guard train "$OUT/target.onnx" --members "$OUT/data/members.npz" --nonmembers "$OUT/data/reference.npz" \
    -o "$OUT/steps/defender.onnx"
siguard compile "$OUT/target.onnx" -o "$OUT/steps/plan" --batch 500
siguard compile "$OUT/target.onnx" -o "$OUT/steps/plan-guarded" --batch 500 --guard "$OUT/steps/defender.onnx"
siguard inspect "$OUT/steps/plan-guarded" | head -20
siguard audit "$OUT/target.onnx" --plan "$OUT/steps/plan" --guarded-plan "$OUT/steps/plan-guarded" \
    --members "$OUT/data/members.npz" --nonmembers "$OUT/data/nonmembers.npz" --shadow "$OUT/data/shadow.npz" \
    --mode "$MODE" --report "$OUT/steps/report"
