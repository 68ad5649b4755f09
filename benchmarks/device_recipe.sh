#!/usr/bin/env bash
# The recipe's two training phases (benchmarks/train_recipe.sh: pre-training, then the listwise fine-tune,
# the same flags) on a borrowed GPU machine, to see what more steps buy. Such a machine has torch and
# transformers but not this project's other packages or data, so it runs from the checkout with the
# bundles of benchmarks/device_pack.py, in two calls (each bundle fills most of what one call may carry):
#
#   benchmarks/device_recipe.sh features  # .dev/data: the patch features on the GPU, a tiny smoke run
#   benchmarks/device_recipe.sh train     # .dev/bert: pre-train, fine-tune, send the checkpoint back in $OUT
#
# Both work in $WORK, outside the checkout, so the second call finds the first one's features on a machine
# kept warm between them. `train` leaves the fine-tuned checkpoint (weights in bfloat16) as a tar cut in
# 15 MiB parts in $OUT; at home `cat parts* | tar x` and run fit-image-tower and eval as the recipe does.
set -euo pipefail
stage="${1:?features or train}"
WORK="${WORK:-/tmp/fashionbert-device}"
OUT="${OUT:-$WORK/out}"
PRETRAIN_MINUTES="${PRETRAIN_MINUTES:-3}"
LISTWISE_MINUTES="${LISTWISE_MINUTES:-1.5}"
EVAL_IF_BEFORE_S="${EVAL_IF_BEFORE_S:-330}"  # evaluate on the GPU too only if this stage is younger than this

checkout="$(pwd)"
mkdir -p "$WORK/bin" "$OUT"
export PYTHONPATH="$checkout:$WORK/site" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
printf '#!/bin/sh\nexec python3 -m app.cli "$@"\n' > "$WORK/bin/fashionbert" && chmod +x "$WORK/bin/fashionbert"
export PATH="$WORK/bin:$PATH"
DATA="hm:$WORK/hm"
common=(--data "$DATA" --cache "$WORK/cache" ${LIMIT:+--limit "$LIMIT"})  # LIMIT: a dry run on a few items
started=$(date +%s)
seconds() { echo $(( $(date +%s) - started )); }

case "$stage" in
features)
    cp -r .dev/data/. "$WORK/"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
    fashionbert features "${common[@]}" --batch-size 128
    echo "features: $(seconds) s"  # stop 35's H200: 136 s, 93 photos/s (benchmarks/feature_host_path.py)
    # A tiny model through every CUDA path the run will take, and those it will not (fit, eval). The views
    # the image-tower fit reads are left to the machine that fits: each took about as long as the photos.
    smoke=(--text-model "$WORK/tokenizer" --tiny)
    fashionbert train "${common[@]}" "${smoke[@]}" --out "$WORK/smoke/pretrain" --steps 30 --validate-every 10
    fashionbert train "${common[@]}" --out "$WORK/smoke/listwise" --init "$WORK/smoke/pretrain/best" \
        --fusion-layer 1 --tasks alignment,contrastive --listwise --mine-top-k 30 --negatives-per-item 4 \
        --mine-every 10 --steps 20 --batch-size 24 --validate-every 10
    fashionbert fit-image-tower "${common[@]}" --model "$WORK/smoke/listwise/best" --out "$WORK/smoke/best" \
        --steps 20 --towers 2
    fashionbert eval "${common[@]}" --model "$WORK/smoke/best" --queries 100 --recall-k 10
    echo "smoke: $(seconds) s"
    ;;
train)
    rm -rf "$WORK/bert" && cp -r .dev/bert "$WORK/bert"
    python3 benchmarks/device_pack.py bert-float32 "$WORK/bert"
    run="$WORK/run"
    fashionbert train "${common[@]}" --text-model "$WORK/bert" --out "$run/pretrain" \
        --budget-minutes "$PRETRAIN_MINUTES" --adaptive-scope last_output
    echo "pre-training: $(seconds) s"
    fashionbert train "${common[@]}" --out "$run/listwise" --budget-minutes "$LISTWISE_MINUTES" \
        --adaptive-scope last_output --init "$run/pretrain/best" --fusion-layer 5 --tasks alignment,contrastive \
        --listwise --mine-top-k 30 --negatives-per-item 4 --mine-every 150 --batch-size 24 --lr 5e-5 \
        --warmup-steps 20 --validate-every 100
    echo "listwise: $(seconds) s"  # stop 35's H200, 3.5 + 1.75 minutes: 376 s, 1,554 + 447 steps
    ship="$WORK/ship"
    rm -rf "$ship" && mkdir -p "$ship/pretrain" "$ship/listwise"
    cp -r "$run/listwise/best" "$ship/best"
    python3 benchmarks/device_pack.py checkpoint-bf16 "$ship/best"
    for phase in pretrain listwise; do cp "$run/$phase/metrics.jsonl" "$run/$phase/training.png" "$ship/$phase/"; done
    tar -C "$ship" -cf - . | split -b 15M - "$OUT/checkpoint.tar.part-"
    echo "shipped: $(seconds) s"
    if (( $(seconds) < EVAL_IF_BEFORE_S )); then
        timeout 150 fashionbert eval "${common[@]}" --model "$run/listwise/best" --recall-k 50 \
            --report "$OUT/eval-device.json" || echo "device eval stopped"
        echo "eval: $(seconds) s"
    fi
    ;;
*) echo "stage must be features or train" >&2; exit 2 ;;
esac
