#!/usr/bin/env bash
# Side-by-side studies of issues 18 and 19 on CNN twins of one budget (the twin stage of a recipe: 8 x 200 iterations,
# one seed), each evaluated by `hybrid-ct evaluate` on the same validation split and the same whole scans:
#
#   STUDY=context bash scripts/twin_study.sh   # the single slice against the 2.5D input -> docs/context.md
#   STUDY=grid    bash scripts/twin_study.sh   # model grid 128 / 160 / 192 pixels     -> docs/grid.md
#   STUDY=hardneg bash scripts/twin_study.sh   # uniform or error-weighted negatives       -> docs/hardneg.md
#   STUDY=losses  bash scripts/twin_study.sh   # + adaptive class loss, + deep supervision  -> docs/losses.md
#   STUDY=fov     bash scripts/twin_study.sh   # whole image or the lungs' box (128; lungs 160) -> docs/fov.md
#   STUDY=synth   bash scripts/twin_study.sh   # + synthetic lesions, + protocol variation, + pseudo-labels -> docs/synth_study.md
#
# A finished twin or evaluation under $RUNS is reused (the 128-pixel single-slice twin is in every study).
# PARALLEL builds at once (default: one per core), THREADS torch threads each (default 1: two OpenMP threads
# stall when the cores are shared). Extra arguments go to `hybrid-ct train`. SKIP_SETUP=1: use the .venv as it is
# (a worktree whose .venv links to another checkout's, with PYTHONPATH pointing at this worktree's lib).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SKIP_SETUP:-}" ] || bash scripts/setup.sh
CORES=$(nproc)  # before OMP_NUM_THREADS is set: nproc honours it
STUDY=${STUDY:-context}
SEED=${SEED:-0}
RUNS=${RUNS:-runs/study}
PARALLEL=${PARALLEL:-$CORES}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS
HC=".venv/bin/hybrid-ct --threads $THREADS"
case "$STUDY" in
  context) VARIANTS="single-slice:shipped:128 2.5D:shipped_2p5d:128 2.5D+context-dropout:shipped_2p5d_dropout:128"
           OUT=docs/context.md
           TITLE="Single slice or 2.5D input (issue 18, point 1)" ;;
  grid) VARIANTS="128:shipped:128 160:shipped:160 192:shipped:192"; OUT=docs/grid.md
        TITLE="Model grid size (issue 18, point 3)" ;;
  fov) VARIANTS="square-128:shipped:128 lungs-128:shipped_lungbox:128 lungs-160:shipped_lungbox:160"
       OUT=docs/fov.md
       TITLE="Whole image or the lungs' box as the field of view (issue 18, point 3)" ;;
  hardneg) VARIANTS="uniform:shipped:128 hard-negatives:shipped_hardneg:128"; OUT=docs/hardneg.md
           TITLE="Hard negatives weighted by the model's errors (issue 18, point 4)" ;;
  losses) VARIANTS="plain:shipped:128 adaptive-class-loss:shipped_adaptive:128 deep-supervision:shipped_deepsup:128"
          OUT=docs/losses.md
          TITLE="Seed 001's self-adaptive class loss and deep supervision (issue 19, point 3)" ;;
  synth) VARIANTS="shipped:shipped:128 +synthetic-lesions:shipped_synth:128 +synthetic+protocol:shipped_synth_protocol:128
                  +synthetic+protocol+pseudo:shipped_synth_protocol_pseudo:128"
         OUT=${OUT:-docs/synth_study.md}
         TITLE="Synthetic lesions, scan-protocol variation and pseudo-labels (issue 27, points 1, 2 and 3)" ;;
  *) echo "STUDY must be context, grid, fov, hardneg, losses or synth" >&2; exit 2 ;;
esac
start=$(date +%s)
one() {  # recipe size [train args] -> $RUNS/<recipe>-<size>-s<seed>/{twin.pt,results.json}
  local dir="$RUNS/$1-$2-s$SEED"
  mkdir -p "$dir"
  if [ ! -f "$dir/train.done" ]; then
    $HC train --recipe "$1" --in-size "$2" --seed "$SEED" --twin-only --out "$dir/twin.pt" "${@:3}" \
      > "$dir/train.log" 2>&1 && touch "$dir/train.done" || { echo "[twin_study] $dir: training FAILED" >&2; return 1; }
  fi
  [ -f "$dir/results.json" ] || $HC evaluate --model "$dir/twin.pt" --out "$dir/results.md" --json "$dir/results.json" \
    > "$dir/evaluate.log" 2>&1 || { echo "[twin_study] $dir: evaluation FAILED" >&2; return 1; }
  echo "[twin_study] $dir done after $(( ($(date +%s) - start) / 60 )) min"
}
running=0
named=()
for v in $VARIANTS; do
  IFS=: read -r name recipe size <<< "$v"
  named+=("$name=$RUNS/$recipe-$size-s$SEED/results.json")
  one "$recipe" "$size" "$@" &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n || true; running=$((running - 1)); fi
done
wait
INTRO="CNN twins of one budget (8 x 200 iterations, seed $SEED, the same data and validation split), each evaluated by \`hybrid-ct evaluate\`. Command: \`STUDY=$STUDY bash scripts/twin_study.sh\` ($CORES cores, $PARALLEL build(s) at once with $THREADS thread(s) each; finished twins are reused, so the training minutes below are each twin's own, as it was built). One seed per column: compare differences with the run-to-run range of the twins in docs/seeds.md."
PLOT=()
[ "$STUDY" = grid ] && PLOT=(--plot docs/img_grid/grid.png --xlabel "model grid (pixels)")
.venv/bin/python -m hybrid_ct.evaluate.compare --out "$OUT" --title "$TITLE" --intro "$INTRO" "${PLOT[@]}" "${named[@]}"
