#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (idempotent: skips when unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f .venv/.setup-stamp ] && [ "$(cat .venv/.setup-stamp)" = "$stamp" ]; then
  echo "[setup] .venv is up to date"
  exit 0
fi
pip_() { .venv/bin/python -m pip install --disable-pip-version-check "$@"; }
# torch first: the other packages then build against it without an isolated build env
# (without --no-build-isolation monailabel's sam2 dependency downloads a second torch).
pip_ -q "torch==2.14.1" "torchvision==0.29.1"
pip_ -q setuptools wheel
pip_ -q --no-build-isolation -e ".[test]"
# slicer-core gives headless MRML segmentation nodes for the Slicer-side tests; optional.
if ! pip_ -q -e ".[slicer]"; then
  echo "[setup] slicer-core could not be installed: the MRML tests will be skipped"
fi
echo "$stamp" > .venv/.setup-stamp
echo "[setup] done"
