#!/usr/bin/env bash
# The best recipe found so far, fitted into one 60-minute training budget (BUDGET_MINUTES): pre-train all
# four tasks, fine-tune the alignment and recall towers listwise on mined near neighbours (unmasked pairs),
# refit the image tower to the locked text tower as an ensemble of 8 (it learns the colour histograms) on
# the train photos and three augmented views of them (VIEWS), train the text tower against it and refit it
# again (TEXT_STEPS), then evaluate the result on the validation
# part as benchmarks/train_eval.sh does. The budget is kept by the clock, not by fixed phase lengths: the
# views' feature passes run first and are timed (10-12 minutes on a cold cache, none on a warm one), and
# pre-training gets what is left once they, the listwise phase (LISTWISE_MINUTES) and RESERVE_MINUTES
# (the listwise run's start-up, last validation and saving, and the tower fit) are paid; PRETRAIN_MINUTES
# fixes it instead. The listwise phase then gets at most what the clock leaves before the reserve. Each
# phase is what benchmarks/RESULTS.md measured in longer runs one at a time; here they share the budget.
# Extra arguments go to the pre-training. PRETRAINED=DIR skips pre-training and runs the later phases from
# that checkpoint (the listwise phase then gets LISTWISE_MINUTES in full): to compare them on one pre-training.
#
#   benchmarks/train_recipe.sh        # runs/hm-adaptive-output: the adaptive loss, fusion layer 5 (the default)
#   LOSS=fixed OUT=runs/hm-fixed-fusion5 benchmarks/train_recipe.sh  # the default with fixed weights (RESULTS.md)
#   ADAPTIVE_SCOPE=last_layer OUT=runs/hm-fusion5 benchmarks/train_recipe.sh  # the default before stop 26
#   ADAPTIVE_SCOPE=last_layer FUSION_LAYER=0 OUT=runs/hm-recipe-adaptive benchmarks/train_recipe.sh  # all joint
#   LOSS=fixed FUSION_LAYER=0 OUT=runs/hm-recipe benchmarks/train_recipe.sh  # and equal fixed weights
#   PRETRAINED=runs/hm-text800-recipe/pretrain/best LISTWISE_MINUTES=2.4 OUT=runs/hm-listwise2.4 benchmarks/train_recipe.sh
# ADAPTIVE_SCOPE picks the shared parameters of the adaptive loss's task gradients (`--adaptive-scope`):
# last_output, the last layer's feed-forward output block, costs 1.06x a fixed-weights step; last_layer,
# which the runs before stop 26 used, 1.24x. IMAGE_SIZE letterboxes the photos to another size before
# the patch network (benchmarks/RESULTS.md, "Photo size": 384 was level with 256 after training, and costs 1.65x a photo);
# BACKBONE picks the patch network (`--backbone`; the deeper Lite1 and Lite2 need the `backbones` extra).
# The listwise phase moves the fusion layer (README, "Fusion layer"): one joint layer meets the service's
# latency target, and its bundle stores each item's states below it.
set -euo pipefail
DATA="${DATA:-hm:../shared/data/hm}"
OUT="${OUT:-runs/hm-adaptive-output}"
BUDGET_MINUTES="${BUDGET_MINUTES:-60}"
# Since stop 43 the listwise phase is short and its minutes go to the text tower's fit (TEXT_STEPS=800). Since
# stop 44 it is 3 minutes, about 15 steps once pre-training's overrun is paid: enough to move the fusion layer and
# the alignment logit's threshold (stop 43's 2 minutes gave 6 steps and left accuracy at 94%). Before stop 43,
# LISTWISE_MINUTES=10.5 RESERVE_MINUTES=21.5 TEXT_STEPS=400 (stop 37), and 24, 8 and 0 before that.
LISTWISE_MINUTES="${LISTWISE_MINUTES:-3}"
# the listwise start-up and end plus the fits: 30 minutes for TEXT_STEPS=800 (13 for 400)
RESERVE_MINUTES="${RESERVE_MINUTES:-30}"
PRETRAIN_MINUTES="${PRETRAIN_MINUTES:-}"  # default: what is left of BUDGET_MINUTES (below)
PRETRAINED="${PRETRAINED:-}"  # a pre-trained checkpoint to start the listwise phase from, instead of pre-training
LOSS="${LOSS:-adaptive}"
ADAPTIVE_SCOPE="${ADAPTIVE_SCOPE:-last_output}"
QUERIES="${QUERIES:-1000}"
RERANK_K="${RERANK_K:-50}"
FUSION_LAYER="${FUSION_LAYER:-5}"
IMAGE_SIZE="${IMAGE_SIZE:-256}"
BACKBONE="${BACKBONE:-efficientnet-lite0}"
VIEWS="${VIEWS-flip,crop,flipcrop}"  # VIEWS= PRETRAIN_MINUTES=34: the recipe before stop 29
# TEXT_STEPS trains the text tower against the fitted image towers, then fits them again (`fit-image-tower
# --text-steps`, about 28 minutes for 800 on 2 cores, taken from the listwise phase since stops 37 and 43;
# benchmarks/RESULTS.md "Why re-ranking adds nothing yet").
TEXT_STEPS="${TEXT_STEPS:-800}"

case "$LOSS" in
    fixed) weights=(--fixed-weights) ;;
    adaptive) weights=(--adaptive-scope "$ADAPTIVE_SCOPE") ;;
    *) echo "LOSS must be fixed or adaptive, not '$LOSS'" >&2; exit 2 ;;
esac
if [[ -n "$PRETRAINED" ]] && (( $# > 0 )); then  # (a folder that is not a checkpoint: the listwise run says so)
    echo "extra arguments go to the pre-training, which PRETRAINED skips" >&2; exit 2
fi

fashionbert features --data "$DATA" --image-size "$IMAGE_SIZE" --backbone "$BACKBONE"
start=$(date +%s)
minutes_left() {  # what the budget leaves now, once the clock so far and $1 more minutes are paid
    python -c "print(round($BUDGET_MINUTES - ($1) - ($(date +%s) - $start) / 60, 1))"
}
if [[ -n "$VIEWS" ]]; then  # timed: the view passes are work this recipe adds (none on a warm cache)
    fashionbert features --data "$DATA" --image-size "$IMAGE_SIZE" --backbone "$BACKBONE" --views "$VIEWS"
fi
if [[ -n "$PRETRAINED" ]]; then
    echo "starting from $PRETRAINED, no pre-training"
    timed="listwise and fits"
else
    if [[ -z "$PRETRAIN_MINUTES" ]]; then  # what the budget leaves once the views, the fine-tune and the fit are paid
        PRETRAIN_MINUTES=$(minutes_left "$LISTWISE_MINUTES + $RESERVE_MINUTES")
    fi
    echo "pre-training for $PRETRAIN_MINUTES minutes"
    fashionbert train --data "$DATA" --out "$OUT/pretrain" --budget-minutes "$PRETRAIN_MINUTES" "${weights[@]}" \
        --image-size "$IMAGE_SIZE" --backbone "$BACKBONE" "$@"
    PRETRAINED="$OUT/pretrain/best"
    timed="training"
fi
# The listwise phase absorbs what pre-training overran (its last validation and saving), so the budget holds.
LISTWISE_MINUTES=$(python -c "print(min($LISTWISE_MINUTES, $(minutes_left "$RESERVE_MINUTES")))")
echo "listwise fine-tune for $LISTWISE_MINUTES minutes"
fashionbert train --data "$DATA" --out "$OUT/listwise" --budget-minutes "$LISTWISE_MINUTES" "${weights[@]}" \
    --init "$PRETRAINED" --fusion-layer "$FUSION_LAYER" --tasks alignment,contrastive --listwise --mine-top-k 30 --negatives-per-item 4 \
    --mine-every 150 --batch-size 24 --lr 5e-5 --warmup-steps 20 --validate-every 100
fashionbert fit-image-tower --model "$OUT/listwise/best" --data "$DATA" --out "$OUT/best" --views "$VIEWS" \
    --text-steps "$TEXT_STEPS"
elapsed=$(( $(date +%s) - start ))
echo "$timed wall time: $(( elapsed / 60 )) min $(( elapsed % 60 )) s"
fashionbert eval --model "$OUT/best" --data "$DATA" --queries "$QUERIES" --recall-k "$RERANK_K" \
    --report "$OUT/eval.json"
