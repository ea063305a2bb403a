"""One small call of every CUDA kernel, for compute-sanitizer (bench/gpu_check.sh runs it).

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


def main():
    assert torch.cuda.is_available(), "sanitize_cases needs a GPU"
    memory_cases("cuda")
    torch.cuda.synchronize()
    print("sanitize cases ok")


if __name__ == "__main__":
    main()
