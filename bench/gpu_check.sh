#!/usr/bin/env bash
# The GPU checks, in one go: the CUDA tests (tests/test_gpu.py), then the generation benchmark
# on the GPU (bench/results/generate_gpu.{json,md}).  Run from the repository root on a machine
# with CUDA and the project's dependencies importable (installed, or PYTHONPATH=. as here):
#
#     OUT=bench/results bash bench/gpu_check.sh
#
# Each step has its own time limit and log, and a failing step does not stop the next.
set -u
OUT=${OUT:-bench/results}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/gpu_env.txt"
timeout "${TEST_S:-240}" $PY -m pytest -q -n 4 -p no:cacheprovider tests/test_gpu.py 2>&1 \
  | tee "$OUT/gpu_tests.log"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
timeout "${BENCH_S:-330}" $PY -m bench.bench_generate --device cuda --out "$OUT" 2>&1 \
  | grep -v "Writing model shards" | tee "$OUT/gpu_bench.log"
echo "bench exit: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_bench.log"
