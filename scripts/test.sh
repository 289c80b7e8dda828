#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# UTF-8 text files whatever the locale: slicer-core (VTK) switches the process locale to "C" on import
export PYTHONUTF8=1
exec .venv/bin/python -m pytest -q "$@"
