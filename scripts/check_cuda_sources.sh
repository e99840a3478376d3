#!/usr/bin/env bash
# Compiles every CUDA kernel standalone for Hopper (sm_90), so a CUDA compile error is caught on a machine
# without a GPU. The kernels include no torch headers, only the CUDA runtime. Then syntax-checks the torch
# bindings of those kernels (csrc/cuda/*.cpp) with the host compiler against the installed torch's headers,
# which a CPU torch build ships too.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
TORCH_PYTHON=${TORCH_PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
if [ ! -x "$NVCC" ]; then
  echo "check_cuda_sources: nvcc not found; skipped" >&2
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
shopt -s nullglob
for source in csrc/kernels/*.cu; do
  if "$NVCC" -std=c++17 -O3 --use_fast_math -gencode arch=compute_90,code=sm_90 -Icsrc -c "$source" \
       -o "$out/$(basename "$source").o"; then
    echo "nvcc sm_90 ok: $source"
  else
    echo "nvcc sm_90 FAILED: $source" >&2
    status=1
  fi
done

# The CUDA headers beside nvcc; a wrapper script on PATH (not a link) only tells its real place when asked.
cuda_include=$(dirname "$NVCC")/../include
if [ ! -f "$cuda_include/cuda_runtime.h" ]; then
  cuda_include=$("$NVCC" --dryrun -x cu -E /dev/null 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)/../include
fi
if ! command -v "$CXX" >/dev/null; then
  echo "check_cuda_sources: $CXX not found; bindings not checked" >&2
elif ! torch_includes=$("$TORCH_PYTHON" -c \
       "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" 2>/dev/null); then
  echo "check_cuda_sources: no torch importable by $TORCH_PYTHON; bindings not checked" >&2
else
  # A CPU torch wheel lacks this one header, generated at torch's build time; the bindings need none of its macros.
  mkdir -p "$out/stub/c10/cuda/impl"
  echo "#pragma once" > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  for source in csrc/cuda/*.cpp; do
    # shellcheck disable=SC2086  # torch_includes is a list of -I flags
    if "$CXX" -std=c++20 -fsyntax-only $torch_includes -I"$out/stub" -I"$cuda_include" -Icsrc "$source"; then
      echo "$CXX syntax ok: $source"
    else
      echo "$CXX syntax FAILED: $source" >&2
      status=1
    fi
  done
fi
exit $status
