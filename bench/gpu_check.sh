#!/usr/bin/env bash
# The one prepared GPU call: build the extension with CUDA kernels, run the CUDA tests, run every GPU
# benchmark (the packaged op benchmarks, then bench/gpu_*.py) and print a short table last. Runs on the GPU machine's own python3 (torch 2.11
# cu130, triton 3.6), offline. Peer wheels (liger-kernel, cut-cross-entropy, trl) travel in .whl/ (made by
# scripts/fetch_gpu_wheels.sh here) and are installed to /tmp/site.
#   device run:  bash bench/gpu_check.sh        (carry: [".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/rlhf_fast_gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
started=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F)" | tee -a "$OUT/gpu.txt"

echo "== build"
if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED"
  exit 1
fi
"$PY" -c "import torch, rlhf_fast._C as c; print('torch', torch.__version__, 'CUDA kernels built:', c.built_with_cuda)"
echo "build $(( $(date +%s) - started )) s"

echo "== CUDA tests"
timeout 240 "$PY" -m pytest -q -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
tests_status=${PIPESTATUS[0]}

echo "== GPU benchmarks"
: > "$OUT/table.md"
# The op benchmarks ship in the package (rlhf_fast/bench/, what `rlhf-fast bench --suite gpu` runs); the
# rollout benchmark is a script of the repository.
for op in gae ranking ppo_loss logprob; do
  echo "-- rlhf_fast.bench --ops $op"
  timeout 150 "$PY" -m rlhf_fast.bench --suite gpu --ops "$op" --json "$OUT/bench_$op.json" 2>&1 \
    | tee "$OUT/bench_$op.log" | grep '^|' >> "$OUT/table.md"
done
for script in bench/gpu_*.py; do
  echo "-- $script"
  timeout 150 "$PY" "$script" 2>&1 | tee "$OUT/$(basename "$script" .py).log" | grep '^|' >> "$OUT/table.md"
done

echo
echo "== summary ($(cat "$OUT/gpu.txt" | head -1); $(( $(date +%s) - started )) s; CUDA tests exit $tests_status)"
tail -3 "$OUT/cuda_tests.log"
cat "$OUT/table.md"
