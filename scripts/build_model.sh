#!/usr/bin/env bash
# Rebuild the shipped model from three seeds: train each seed of the "shipped" recipe, evaluate each, ship
# the MEDIAN build (not the best) as the package model + its CNN twin -- unless it is worse than the model
# shipped before (hybrid_ct.evaluate.seeds.gate), which then stays; the shipped model's evaluation becomes
# docs/results.md, with docs/seeds.md (mean and range of every headline number over the seeds, the previous
# model beside) and the model card's numbers.
#
#   bash scripts/build_model.sh                            # the shipped recipe, seeds 0 1 2
#   SEEDS=0 bash scripts/build_model.sh --epochs 1 --max-iters 5   # smoke run of the same pipeline
#   bash scripts/build_model.sh --extra data/covid19_ct_seg  # + a set prepared by `hybrid-ct download`
#   RECIPE=shipped_synth_protocol_pseudo SKIP_SETUP=1 bash scripts/build_model.sh   # another recipe, this .venv as is
#
# Resumable: run the same command again after a stop and finished work is kept, per seed and per stage:
# a seed with results.json is done; a seed with a complete hybrid.pt is only evaluated; a seed with a
# complete twin.pt (the first ~40 % of a seed) is converted and fine-tuned from it (`train --twin-from`).
# A stage stopped half-way starts that stage again (its per-epoch checkpoint holds no optimiser state).
# The model shipped before is copied to $RUNS/previous once, so a rerun after shipping still compares with it.
#
# Extra arguments go to `hybrid-ct train`. Real data: $HYBRID_CT_DATA or ../shared/data. Budget and measured
# times: docs/benchmarks.md, "Shipped model: training speed". PARALLEL=2 trains two seeds at once with one
# thread each (faster on a 2-core machine that also runs other jobs: 2 OpenMP threads stall when contended).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh
RECIPE=${RECIPE:-shipped}
SEEDS=${SEEDS:-"0 1 2"}
PARALLEL=${PARALLEL:-1}
THREADS=${THREADS:-$(( $(nproc) / PARALLEL > 0 ? $(nproc) / PARALLEL : 1 ))}
export OMP_NUM_THREADS=$THREADS
HC=".venv/bin/hybrid-ct --threads $THREADS"
RUNS=${RUNS:-runs/build}
MODEL=${MODEL_OUT:-lib/hybrid_ct/net/models/pretrained.pt}
TWIN=${TWIN_OUT:-runs/twin.pt}
start=$(date +%s)
complete() {  # checkpoint kind -> exit 0 when the file is a finished checkpoint of that kind
  [ -f "$1" ] && .venv/bin/python -c "import sys, torch; m = torch.load(sys.argv[1], map_location='cpu', weights_only=True)['meta']; \
sys.exit(0 if m.get('complete') and m.get('kind') == sys.argv[2] and m.get('recipe', {}).get('name') == sys.argv[3] else 1)" \
    "$1" "$2" "$RECIPE" 2>/dev/null
}
train_seed() {  # what is left of one seed's training (see "Resumable" above)
  local s=$1 dir="$RUNS/seed$1"
  if complete "$dir/hybrid.pt" hybrid; then
    return 0
  elif complete "$dir/twin.pt" cnn_twin; then
    echo "[build_model] seed $s: twin finished before, converting and fine-tuning it"
    $HC train --recipe "$RECIPE" --seed "$s" --out "$dir/hybrid.pt" --twin-out "$dir/twin.pt" --twin-from "$dir/twin.pt" \
      "${@:2}" >> "$dir/train.log" 2>&1
  else
    $HC train --recipe "$RECIPE" --seed "$s" --out "$dir/hybrid.pt" --twin-out "$dir/twin.pt" "${@:2}" > "$dir/train.log" 2>&1
  fi
}
one_seed() {  # train + evaluate one seed into $RUNS/seed<k>/
  local s=$1 dir="$RUNS/seed$1"
  mkdir -p "$dir"
  if [ -f "$dir/results.json" ]; then echo "[build_model] seed $s: done before"; return 0; fi
  if train_seed "$@" && $HC evaluate --model "$dir/hybrid.pt" --twin "$dir/twin.pt" --out "$dir/results.md" --json "$dir/results.json" \
          > "$dir/evaluate.log" 2>&1; then
    echo "[build_model] seed $s done after $(( ($(date +%s) - start) / 60 )) min"
  else
    echo "[build_model] seed $s FAILED: see $dir/train.log and $dir/evaluate.log" >&2
  fi
}
running=0
for s in $SEEDS; do
  one_seed "$s" "$@" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
for s in $SEEDS; do  # pick only from a full set of seeds: a stopped or failed seed is finished by a rerun
  [ -f "$RUNS/seed$s/results.json" ] || { echo "[build_model] seed $s not finished: rerun the same command to resume" >&2; exit 1; }
done
# the median seed -> the package model; its evaluation -> docs/results.md (+ the spread over the seeds)
# the model shipped before, evaluated by today's code, as the column to compare with
mkdir -p "$RUNS/previous" && { [ -f "$RUNS/previous/hybrid.pt" ] || cp "$MODEL" "$RUNS/previous/hybrid.pt"; }
[ -f "$RUNS/previous/results.json" ] || $HC evaluate --model "$RUNS/previous/hybrid.pt" --out "$RUNS/previous/results.md" --json "$RUNS/previous/results.json" \
  > "$RUNS/previous/evaluate.log" 2>&1 || echo "[build_model] the previous model could not be evaluated" >&2
pick=$(.venv/bin/python -m hybrid_ct.evaluate.seeds --runs "$RUNS" --out docs/seeds.md --previous "$RUNS/previous/results.json" \
       --ship docs/results.md --model-card docs/model_card.md --print-median)
if [ "$pick" = previous ]; then  # the median build is worse than the model shipped before (seeds.gate)
  echo "[build_model] done in $(( ($(date +%s) - start) / 60 )) min: the median build is worse than the shipped" \
       "model, which stays; docs/seeds.md says why, docs/results.md is the shipped model's evaluation"
  exit 0
fi
cp "$RUNS/seed$pick/hybrid.pt" "$MODEL"
mkdir -p "$(dirname "$TWIN")" && cp "$RUNS/seed$pick/twin.pt" "$TWIN"
echo "[build_model] done in $(( ($(date +%s) - start) / 60 )) min: seed $pick shipped as $MODEL ($(du -h "$MODEL" | cut -f1)), $TWIN, docs/results.md, docs/seeds.md"
