#!/usr/bin/env bash
# Rebuild the shipped model, its CNN twin, docs/results.md and the numbers in docs/model_card.md.
#
#   bash scripts/build_model.sh                      # the shipped recipe (< 2 h on a 2-core CPU, minutes on a GPU)
#   bash scripts/build_model.sh --epochs 1 --max-iters 5   # smoke run of the same pipeline
#   bash scripts/build_model.sh --extra data/covid19_ct_seg  # + a set prepared by `hybrid-ct download`
#
# Extra arguments go to `hybrid-ct train`. Real data: $HYBRID_CT_DATA or ../shared/data.
# Budget of the shipped recipe (measured 2026-12-01, idle 2-core Xeon, fp32, THREADS=2): data 38 s, CNN twin
# 8 epochs x 200 iterations at 0.27 s/iteration (8 min), conversion to the spiking network 2 min, hybrid
# fine-tuning 8 x 200 iterations at 1.24 s/iteration (27 min, 37 min with validation curves), evaluation
# (validation + COVID-CT-MD scan-level check, both models) 5 min: 49 min.
# On a machine shared with other jobs, 2 OpenMP threads stall badly: THREADS=1 (2.4 s/iteration, < 2 h).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
THREADS=${THREADS:-$(nproc)}
export OMP_NUM_THREADS=$THREADS
HC=".venv/bin/hybrid-ct --threads $THREADS"
MODEL=${MODEL_OUT:-lib/hybrid_ct/models/pretrained.pt}
TWIN=${TWIN_OUT:-runs/twin.pt}
start=$(date +%s)
$HC train --recipe shipped --out "$MODEL" --twin-out "$TWIN" --model-card docs/model_card.md "$@"
$HC evaluate --model "$MODEL" --twin "$TWIN" --out docs/results.md --model-card docs/model_card.md
echo "[build_model] done in $(( ($(date +%s) - start) / 60 )) min: $MODEL ($(du -h "$MODEL" | cut -f1)), $TWIN, docs/results.md"
