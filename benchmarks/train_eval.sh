#!/usr/bin/env bash
# The model benchmark: train on the H&M train part within a wall-clock budget, then evaluate the best
# checkpoint on the validation part (disjoint by product code) with the paper's protocol and the
# full-gallery protocol. Extra arguments go to `fashionbert train` (e.g. --fixed-weights).
#
#   benchmarks/train_eval.sh                       # 60 minutes, adaptive loss, runs/hm
#   OUT=runs/hm-fixed benchmarks/train_eval.sh --fixed-weights
set -euo pipefail
DATA="${DATA:-hm:../shared/data/hm}"
OUT="${OUT:-runs/hm}"
MINUTES="${MINUTES:-60}"
QUERIES="${QUERIES:-1000}"
RERANK_K="${RERANK_K:-50}"

fashionbert features --data "$DATA"
fashionbert train --data "$DATA" --out "$OUT" --budget-minutes "$MINUTES" "$@"
fashionbert eval --model "$OUT/best" --data "$DATA" --queries "$QUERIES" --recall-k "$RERANK_K" \
    --report "$OUT/eval.json"
