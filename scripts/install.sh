#!/usr/bin/env bash
# Creates .venv with pinned dependencies (torch 2.13.0, a CPU build) and builds rlhf_fast in place.
# Safe to rerun: an existing venv is reused and only the extension is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=25"
# Every install goes through the constraints file, so torch can never resolve to an unpinned CUDA build.
.venv/bin/python -m pip install -q -c .ci/constraints.txt -r .ci/requirements-dev.txt
.venv/bin/python -m pip install -q --no-build-isolation --no-deps -e .
.venv/bin/python -c "import torch, rlhf_fast._C as c; print(f'rlhf_fast built: torch {torch.__version__}, CUDA kernels {c.built_with_cuda}')"
