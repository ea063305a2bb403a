#!/usr/bin/env bash
# Everything a GPU machine should check, in one command (the project's machines rarely have one):
# build with CUDA for this GPU, run the test suite (CUDA cases included), run compute-sanitizer
# over a small case of every CUDA kernel, then the benchmarks. Results land in $OUT_DIR.
#   usage: bash bench/gpu_check.sh [out_dir]     (default bench/results)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-bench/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

arch=$($PY -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}.{p.minor}')")
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
export FASTLLM_CUDA=ON
$PY -m pip install --no-build-isolation --no-deps . 2>&1 | tail -3
$PY -m fastllm | tee "$OUT_DIR/gpu_check_diagnostics.txt"

$PY -m pytest -q -rs 2>&1 | tee "$OUT_DIR/gpu_check_tests.txt" | tail -20

if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 $PY bench/sanitize_cases.py \
      2>&1 | tee "$OUT_DIR/gpu_check_sanitizer_$tool.txt" | tail -3
  done
else
  echo "compute-sanitizer not found; skipped" | tee "$OUT_DIR/gpu_check_sanitizer.txt"
fi

$PY bench/run.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_check_bench.txt" | tail -40
