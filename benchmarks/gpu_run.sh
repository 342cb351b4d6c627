#!/usr/bin/env bash
# On the GPU host, from the repo root (carry .whl): GPU tests, kernel microbenchmarks
# and the end-to-end benchmark, results under $OUT (or benchmarks/results).
#   bash benchmarks/gpu_run.sh [warm] [tests "PATHS"] [profile] [kernels] [kernel-ops "a,b"] [vae-memory] [e2e "SYSTEMS [ARGS]"] [capture "ARGS"] [served "ARGS"] [soak "ARGS"]
#                              [soak-start "ARGS"]
# warm starts the GPU's driver and reads torch, diffusers and transformers into the page
# cache, so that the cold starts measured after it are the same machine state.
# soak-start runs the soak in its own process session (it outlives this command; results
# under /tmp/soak) and returns once the server answers; collect with benchmarks/soak_wait.sh.
#   e.g. bash benchmarks/gpu_run.sh tests "tests/kernels tests/gpu" kernels e2e eager,triton,compile
# "PATHS" is split on spaces into pytest's arguments: pick tests by node id
# (file.py::test_name), since a -k expression with spaces falls apart.
set -uo pipefail
source .whl/bootstrap.sh
# bootstrap.sh puts numpy 1.26 first for every process (the Python-backend stub of
# tritonserver 2.51 needs it), but the host's scipy/transformers need numpy 2: move it
# aside and let only processes that set SD_STUB_EXTRA_PATH (the served stubs) see it.
if [ -d /tmp/site/numpy ]; then
  mkdir -p /tmp/np1 && mv /tmp/site/numpy /tmp/site/numpy-1.26*.dist-info /tmp/site/numpy.libs /tmp/np1/ 2>/dev/null
fi
VSITE=$(python3 -c 'import site; print(site.getsitepackages()[0])')
echo "import os, sys; p = os.environ.get('SD_STUB_EXTRA_PATH'); p and sys.path.insert(0, p)" > "$VSITE/00-sd-stub-path.pth"
python3 -c "import numpy, diffusers, transformers; print('numpy', numpy.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
while [ $# -gt 0 ]; do
  case "$1" in
    warm) python3 -c "import torch, diffusers, transformers; torch.zeros(1, device='cuda'); print('warm')" ;;
    tests) python3 -m pytest $2 -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -25; shift ;;
    profile) python3 benchmarks/profile_unet.py --out "$OUT" 2>&1 | tee "$OUT/profile.log" | tail -80 ;;
    vae-memory) python3 benchmarks/vae_memory.py --out "$OUT" 2>&1 | tee "$OUT/vae_memory.log" | tail -40 ;;
    kernels) python3 benchmarks/bench_kernels.py --out "$OUT" 2>&1 | tee "$OUT/bench_kernels.log" | tail -70 ;;
    kernel-ops) python3 benchmarks/bench_kernels.py --out "$OUT" --ops "$2" 2>&1 | tee "$OUT/bench_kernels-$2.log" | tail -40; shift ;;
    # the served stubs get numpy 1.26 first (--stub-path), every other process numpy 2
    # its perf_analyzer and server logs packed into one file (the device tool returns few files)
    served) python3 benchmarks/bench_served.py --stub-path /tmp/np1 --out "$OUT" $2 2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/bench_served.log" | tail -40
      (cd "$OUT" && ls perf_* server-*.log > /dev/null 2>&1 && tar czf "served-logs-$(date +%H%M%S).tgz" perf_* server-*.log && rm -f perf_* server-*.log); shift ;;
    soak) python3 benchmarks/soak.py --stub-path /tmp/np1 --out "$OUT" $2 2>&1 | grep -v '^[IW][0-9]' | tee "$OUT/soak.log" | tail -30; shift ;;
    soak-start)
      rm -rf /tmp/soak && mkdir -p /tmp/soak
      setsid nohup bash -c "python3 benchmarks/soak.py --stub-path /tmp/np1 --out /tmp/soak $2 > /tmp/soak/soak.log 2>&1; echo \$? > /tmp/soak/rc" > /dev/null 2>&1 < /dev/null &
      bash benchmarks/soak_wait.sh 600 first; shift ;;
    capture) python3 benchmarks/bench_capture.py --out "$OUT" $2 2>&1 | tee "$OUT/bench_capture.log" | tail -20; shift ;;
    e2e) python3 benchmarks/bench_e2e.py --systems $2 --out "$OUT" 2>&1 | tee "$OUT/bench_e2e.log" | tail -40; shift ;;
  esac
  shift
done
