#!/usr/bin/env bash
# One command for a machine with a GPU: build with CUDA, run the LoRA tests (their CUDA cases run
# only where a GPU is visible), run compute-sanitizer over a small case of each LoRA kernel (both
# paths), and run the LoRA benchmark. Everything lands under ${1:-gpu-check-lora}/.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-check-lora}"
mkdir -p "$out"
python=${PYTHON:-python}
FASTLLM_CUDA=ON "$python" -m pip install --no-build-isolation --no-deps . >"$out/build.log" 2>&1
"$python" -m fastllm | tee "$out/diagnostics.txt"
"$python" -m pytest tests/test_lora_ops.py tests/test_lora_manager.py tests/test_lora_smollm2.py \
  -q --durations=10 2>&1 | tee "$out/tests.txt"
cat >"$out/sanitize.py" <<'PY'
import torch
import fastllm.ops as ops
torch.manual_seed(0)
pool = torch.randn(1 << 16, device="cuda", dtype=torch.float16)
rows = torch.randint(0, (1 << 16) - 512, (2, 3, 16), device="cuda")
ranks = torch.tensor([[16, 3, 0], [1, 8, 16]], dtype=torch.int32, device="cuda")
ids = torch.tensor([0, 2, -1, 1, 1, 0, 2, 2, 1, 0, 0, 0, 0, 0], device="cuda")
x = torch.randn(14, 136, device="cuda", dtype=torch.float16)
for path in (1, 2):
    h = ops.lora_shrink(x, pool, rows, ranks, ids, path)
    y = torch.randn(14, 72, device="cuda", dtype=torch.float16)
    ops.lora_expand(y, h, pool, rows, ranks, torch.ones(2, 3, device="cuda"), ids, [40, 32], path)
torch.cuda.synchronize()
print("sanitizer case ran")
PY
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck "$python" "$out/sanitize.py" 2>&1 | tee "$out/sanitizer.txt"
else
  echo "compute-sanitizer not found; skipped" | tee "$out/sanitizer.txt"
fi
"$python" bench/run.py --only lora --out "$out" 2>&1 | tee "$out/bench.txt"
