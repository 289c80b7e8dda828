#!/usr/bin/env bash
# Create .venv and install the project with its pinned dependencies (idempotent: skips when unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# System packages for the PACS tests and DICOM-SEG checks: Orthanc + its DICOMweb plugin, dicom3tools
# (dciodvfy). Skipped when the binaries exist; needs root (CI) or sudo, else the Orthanc tests skip.
if [ ! -x /usr/sbin/Orthanc ] || [ ! -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
   || ! command -v dciodvfy >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo -n"; fi
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    echo "[setup] installing orthanc, orthanc-dicomweb, dicom3tools (apt-get)"
    # not fatal: without them the PACS tests skip with a reason, everything else still runs
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           --no-install-recommends orthanc orthanc-dicomweb dicom3tools >/dev/null; }; then
      echo "[setup] WARNING: apt-get could not install orthanc / dicom3tools: the PACS tests will be skipped"
    fi
  else
    echo "[setup] cannot apt-get install orthanc orthanc-dicomweb dicom3tools (no apt-get or no root):" \
         "the PACS tests and dciodvfy checks will be skipped"
  fi
else
  echo "[setup] orthanc, orthanc-dicomweb and dicom3tools are installed"
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
pip_ -q --no-build-isolation -e ".[test,cluster]"  # cluster: Dask for predict --workers (tests/test_cluster.py)
# slicer-core gives headless MRML segmentation nodes for the Slicer-side tests; optional.
if ! pip_ -q -e ".[slicer]"; then
  echo "[setup] slicer-core could not be installed: the MRML tests will be skipped"
fi
echo "$stamp" > .venv/.setup-stamp
echo "[setup] done"
