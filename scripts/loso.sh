#!/usr/bin/env bash
# Leave-one-source-out classification (issue 19): for each cls2d collection (UCSD COVID-CT, MosMed, Ma Jun's
# 20 cases) a CNN twin trained with that collection held out of training entirely, all its pictures becoming
# validation (`hybrid-ct train --twin-only --hold-out-source C`), plus the same schedule on the ordinary split
# ("none", the like-for-like reference); then `hybrid-ct evaluate --loso` writes results.md with the LOSO table
# beside the pooled per-collection validation table of the shipped model (and its twin, when there is one).
#
#   bash scripts/loso.sh                                   # 4 twins x 4 epochs x 200 iterations of the shipped recipe
#   EPOCHS=1 MAX_ITERS=2 EXTRA="--recipe quick --limit 12 --phantoms 0" RESULTS=/tmp/r.md bash scripts/loso.sh  # smoke
#
# Budget (the shipped recipe's twin: 0.27 s/iteration on an idle 2-core CPU, data ~40 s): about 4-5 min per twin,
# ~20 min for the four, + ~5 min evaluation; minutes on a GPU. Variables: HC (the hybrid-ct command), THREADS,
# EPOCHS, MAX_ITERS, RUNS (checkpoint folder), MODEL, TWIN, RESULTS, EXTRA (more `hybrid-ct train` arguments),
# SOURCES (held-out collections), EVALUATE=0 to train only. Extra arguments go to `hybrid-ct evaluate`.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=$THREADS
HC=${HC:-.venv/bin/hybrid-ct}
EPOCHS=${EPOCHS:-4}
MAX_ITERS=${MAX_ITERS:-200}
RUNS=${RUNS:-runs}
MODEL=${MODEL:-lib/hybrid_ct/net/models/pretrained.pt}
TWIN=${TWIN:-runs/twin.pt}
RESULTS=${RESULTS:-docs/results.md}
SOURCES=${SOURCES:-ucsd mosmed majun20}
mkdir -p "$RUNS"
start=$(date +%s)
ckpts=()
for held in none $SOURCES; do
  out="$RUNS/loso_$held.pt"
  hold=()
  [ "$held" = none ] || hold=(--hold-out-source "$held")
  echo "[loso] $held -> $out"
  # shellcheck disable=SC2086
  $HC --threads "$THREADS" train --twin-only --out "$out" --epochs "$EPOCHS" --max-iters "$MAX_ITERS" "${hold[@]}" ${EXTRA:-}
  ckpts+=("$out")
done
if [ "${EVALUATE:-1}" != 0 ]; then
  twin=()
  [ -f "$TWIN" ] && twin=(--twin "$TWIN")
  $HC --threads "$THREADS" evaluate --model "$MODEL" "${twin[@]}" --loso "${ckpts[@]}" --out "$RESULTS" "$@"
fi
echo "[loso] done in $(( ($(date +%s) - start) / 60 )) min: ${ckpts[*]}"
