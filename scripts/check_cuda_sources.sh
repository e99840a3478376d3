#!/usr/bin/env bash
# Compiles every CUDA kernel standalone for Hopper (sm_90), so a CUDA compile error is caught on a machine
# without a GPU. The kernels include no torch headers, only the CUDA runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
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
exit $status
