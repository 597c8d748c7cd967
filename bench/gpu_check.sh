#!/usr/bin/env bash
# One prepared call for a GPU machine: build hsd there, run the GPU tests, then time every
# backend at the reference shapes; the table comes last. `bench/gpu_check.sh --dry-run` runs
# the benchmark part on tiny CPU shapes (no build, no GPU tests) to check the script itself.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--dry-run" ]; then
  exec python bench/gpu_check.py --dry-run
fi
export PATH="/usr/local/cuda/bin:/usr/local/cuda-13.0/bin:$PATH"
start=$(date +%s)
echo "== build"
if ! pip install --no-build-isolation --no-deps . > /tmp/hsd-build.log 2>&1; then
  tail -40 /tmp/hsd-build.log; exit 1
fi
echo "built in $(( $(date +%s) - start )) s"
# a Liger wheel carried next to the tree, when there is one
for whl in wheels/liger_kernel-*.whl; do
  [ -e "$whl" ] && pip install --no-deps "$whl" > /dev/null 2>&1 && echo "installed $whl"
done
echo "== GPU tests"
python -m pytest -q tests/test_triton_gpu.py tests/test_cuda_backend.py 2>&1 | tail -15 \
  || echo "GPU TESTS FAILED"
echo "== benchmark"
python bench/gpu_check.py "$@"
echo "total $(( $(date +%s) - start )) s"
