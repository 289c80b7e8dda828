#!/usr/bin/env bash
# Start the Hybrid CT MONAI Label server (the README's first command).
#
#   bash scripts/serve.sh                                   # built-in sample studies, port 8000
#   STUDIES=/data/my_ct PORT=8080 bash scripts/serve.sh     # your own studies (NIfTI/NRRD files, or
#                                                           # DICOM series folders: imported once as NIfTI)
#   bash scripts/serve.sh --conf auto_train_after 10        # extra arguments go to monailabel start_server
#
# Environment: STUDIES (default ./sample_studies, generated on first run: SAMPLE_N chest phantoms,
# final labels for all but SAMPLE_UNLABELLED of them), HOST (127.0.0.1: this machine only; 0.0.0.0 for
# a LAN, with a warning), PORT (8000), MODEL_DIR (default apps/hybrid_ct/model: trained versions, current
# pointer; the shipped checkpoint is the one inside the hybrid_ct package unless MODEL_DIR has a pretrained.pt),
# SKIP_SETUP=1 (do not run scripts/setup.sh first).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  bash scripts/setup.sh
fi

STUDIES=${STUDIES:-sample_studies}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
SAMPLE_N=${SAMPLE_N:-10}
SAMPLE_UNLABELLED=${SAMPLE_UNLABELLED:-4}
PY=.venv/bin/python
export PYTHONUTF8=1  # UTF-8 text files whatever the machine's locale

if [ "$STUDIES" = "sample_studies" ] && [ ! -f sample_studies/phantoms.csv ]; then
  echo "[serve] generating $SAMPLE_N sample chest phantoms in ./sample_studies (first run only)"
  rm -rf sample_studies.part
  "$PY" - "$SAMPLE_N" "$SAMPLE_UNLABELLED" <<'EOF'
import os, sys
from hybrid_ct.data.phantom import write_phantom_set

n, unlabelled = int(sys.argv[1]), int(sys.argv[2])
paths = write_phantom_set("sample_studies.part", n=n, seed=0)
for p in paths[n - min(unlabelled, n):]:  # leave some unlabelled for active learning
    os.remove(os.path.join("sample_studies.part", "labels", "final", os.path.basename(p)))
EOF
  mv sample_studies.part sample_studies
fi
if [ ! -d "$STUDIES" ]; then
  echo "[serve] STUDIES=$STUDIES is not a folder" >&2
  exit 2
fi

CONF=(--conf models hybrid_ct)
if [ -n "${MODEL_DIR:-}" ]; then
  CONF+=(--conf model_dir "$MODEL_DIR")
fi
MODEL_PATH=${MODEL_DIR:-apps/hybrid_ct/model}
if [ ! -f "$MODEL_PATH/pretrained.pt" ] && [ ! -f "$MODEL_PATH/current" ] && [ -z "$(ls "$MODEL_PATH"/versions/*.pt 2>/dev/null)" ] \
   && ! "$PY" -c "from hybrid_ct.net.model_files import default_model_path; default_model_path()" 2>/dev/null; then
  echo "[serve] no trained model in $MODEL_PATH yet: inference answers 'no trained model yet' (HTTP 503)"
  echo "[serve] until you train one: press Train in Slicer, or  curl -X POST http://127.0.0.1:$PORT/train/hybrid_ct"
fi

# the shipped model's replay sample (what retraining mixes with the corrections, so that it does not forget;
# derived from the data sets, never committed): rebuilt once from the real data where it is present
SHIPPED=$("$PY" -c "from hybrid_ct.net.model_files import default_model_path; print(default_model_path())" 2>/dev/null || true)
if [ -f "$MODEL_PATH/pretrained.pt" ]; then SHIPPED="$MODEL_PATH/pretrained.pt"; fi
if [ -n "$SHIPPED" ] && [ ! -f "${SHIPPED%.pt}.replay.npz" ]; then
  if "$PY" -c "import sys; from hybrid_ct.data.manifest import data_root; sys.exit(0 if (data_root() / 'MANIFEST.csv').is_file() else 1)"; then
    echo "[serve] building the shipped model's replay sample from the real data (first run only, ~1 min)"
    .venv/bin/hybrid-ct --quiet replay --model "$SHIPPED" \
      || echo "[serve] no replay sample: retraining will use the corrections alone" >&2
  else
    echo "[serve] no real data (\$HYBRID_CT_DATA or ../shared/data): no replay sample; retraining on corrections alone can forget" >&2
  fi
fi

if [ "$HOST" != "127.0.0.1" ] && [ "$HOST" != "localhost" ]; then
  echo "[serve] WARNING: listening on $HOST: anyone who can reach this machine can upload, infer and train" \
       "(there is no authentication); keep it on a trusted network" >&2
fi
echo "[serve] MONAI Label app apps/hybrid_ct on http://$HOST:$PORT, studies: $STUDIES"
exec "$PY" -m monailabel.main start_server --app apps/hybrid_ct --studies "$STUDIES" \
  --host "$HOST" --port "$PORT" "${CONF[@]}" "$@"
