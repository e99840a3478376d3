#!/usr/bin/env bash
# Downloads the peers' wheels for the GPU machine (Python 3.12, offline) into .whl/, which the device call
# carries. Their own dependencies (torch, triton, transformers, accelerate, datasets, ...) are on the image.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.12.0
ls -la .whl
