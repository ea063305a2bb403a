"""Small calls of the CUDA kernels, for compute-sanitizer (bench/gpu_check.sh runs it). Covered so
far: the page pool and LoRA kernels; the kv, sparse and galore kernels run only through the test
suite in gpu_check.sh, not under the sanitizer yet.

Sizes are small so memcheck/racecheck finish in seconds, but chosen to cover each kernel's
branches: narrow and full-width vector access, int32 and int64 indices, partial thread groups.
"""

import torch

import fastllm.ops as ops


def memory_cases(device):
    for width, dtype in [(1, torch.float16), (7, torch.float32), (64, torch.float16),
                         (300, torch.bfloat16), (4096, torch.float32)]:
        for index_dtype in (torch.int32, torch.int64):
            pool = torch.randn(257, width, device=device).to(dtype)
            slots = torch.randperm(257, device=device)[:100].to(index_dtype)
            rows = ops.pool_gather(pool, slots)
            assert torch.equal(rows, pool[slots.long()])
            ops.pool_write(pool, slots, rows * 2)
            assert torch.equal(pool[slots.long()], rows * 2)


def lora_cases(device):
    # Mixed ranks (0, 1, 3, 8, 16), rows without an adapter, two output slices, both paths.
    pool = torch.randn(1 << 16, device=device, dtype=torch.float16)
    rows = torch.randint(0, (1 << 16) - 512, (2, 3, 16), device=device)
    ranks = torch.tensor([[16, 3, 0], [1, 8, 16]], dtype=torch.int32, device=device)
    token_adapter = torch.tensor([0, 2, -1, 1, 1, 0, 2, 2, 1, 0, 0, 0, 0, 0], device=device)
    x = torch.randn(14, 136, device=device, dtype=torch.float16)
    for path in (1, 2):  # BGMV, SGMV
        h = ops.lora_shrink(x, pool, rows, ranks, token_adapter, path)
        y = torch.randn(14, 72, device=device, dtype=torch.float16)
        ops.lora_expand(y, h, pool, rows, ranks, torch.ones(2, 3, device=device), token_adapter,
                        [40, 32], path)


def main():
    assert torch.cuda.is_available(), "sanitize_cases needs a GPU"
    memory_cases("cuda")
    lora_cases("cuda")
    torch.cuda.synchronize()
    print("sanitize cases ok")


if __name__ == "__main__":
    main()
