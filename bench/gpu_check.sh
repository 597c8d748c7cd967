#!/usr/bin/env bash
# One prepared call for a GPU machine: build hsd there (strict: a failed C++ / CUDA compile fails
# the check instead of shipping a pure-Python wheel that skips the CUDA tests), run the GPU
# tests, then time every backend at the reference shapes; the table comes last.
#
#   bench/gpu_check.sh            on the GPU machine, under 10 minutes on an H100 / H200: build
#                                 ~2 min, GPU tests ~2 min (capped at 3.5), benchmark ~2 min
#                                 (capped at 4); the caps keep a hung step from eating the rest
#   bench/gpu_check.sh --dry-run  here: the benchmark part on tiny CPU shapes (Triton through
#                                 its interpreter), no build, no GPU tests; checks the script
#
# Python: $PYTHON, else the checkout's .venv (a developer machine), else python on the PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then
  PY="$PYTHON"
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY="$(command -v python || command -v python3)"
fi
if [ "${1:-}" = "--dry-run" ]; then
  shift
  bash -n "$0"  # the GPU part of this script parses
  exec "$PY" bench/gpu_check.py --dry-run "$@"
fi
export PATH="/usr/local/cuda/bin:/usr/local/cuda-13.0/bin:$PATH"
start=$(date +%s)
status=0

echo "== build (HSD_STRICT_BUILD=1)"
if ! HSD_STRICT_BUILD=1 "$PY" -m pip install --no-build-isolation --no-deps . \
    > /tmp/hsd-build.log 2>&1; then
  tail -60 /tmp/hsd-build.log
  echo "BUILD FAILED (log: /tmp/hsd-build.log)"; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
# a CUDA torch with nvcc present must give loadable CUDA kernels: say so loudly otherwise
if ! "$PY" -c "import torch, hsd; from hsd import _extension; \
assert _extension.cuda_kernels_linked(), 'hsd._C has no CUDA kernels (nvcc missing?)'; \
print('extension: CUDA kernels linked; backends', hsd.available_backends())"; then
  echo "CUDA KERNELS NOT BUILT"; status=1
fi
# a Liger wheel carried next to the tree, when there is one (the x liger column)
for whl in wheels/liger_kernel-*.whl; do
  [ -e "$whl" ] && "$PY" -m pip install --no-deps "$whl" > /dev/null 2>&1 && echo "installed $whl"
done

echo "== GPU tests"
# capped so the benchmark table always comes; the summary lines name each failure (pipefail:
# pytest's status, not tail's, decides)
if ! timeout 210 "$PY" -m pytest -q -rfE -p no:cacheprovider tests/test_triton_gpu.py \
    tests/test_cuda_backend.py 2>&1 | tail -40; then
  echo "GPU TESTS FAILED (or timed out)"; status=1
fi

echo "== benchmark"
if ! timeout 240 "$PY" bench/gpu_check.py "$@"; then
  echo "BENCHMARK FAILED (or timed out)"; status=1
fi

echo "== shared-prefix step (Qwen2.5-0.5B shape, random weights, bf16)"
# the steps above take ~6 min when healthy; this one is capped so the script stays near 10 min
if ! timeout 150 "$PY" bench/bench_step.py --config qwen2.5-0.5b --device cuda --dtype bf16 \
    --template chatml --rounds 5 --steps 5 --breakdown --json /tmp/bench_step_gpu.json 2>&1 | tail -20; then
  echo "STEP BENCHMARK FAILED (or timed out)"; status=1
fi

echo "total $(( $(date +%s) - start )) s"
exit $status
