#!/usr/bin/env bash
# On the GPU host, from the repo root (carry .whl): GPU tests, kernel microbenchmarks
# and the end-to-end benchmark, results under $OUT (or benchmarks/results).
#   bash benchmarks/gpu_run.sh [tests] [kernels] [e2e SYSTEMS]
set -uo pipefail
source .whl/bootstrap.sh
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
while [ $# -gt 0 ]; do
  case "$1" in
    tests) python3 -m pytest tests/kernels tests/gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    kernels) python3 benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.log" | tail -70 ;;
    e2e) python3 benchmarks/bench_e2e.py --systems "$2" --out "$OUT" 2>&1 | tee "$OUT/bench_e2e.log" | tail -40; shift ;;
  esac
  shift
done
