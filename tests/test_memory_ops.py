"""pool_write / pool_gather against their references, opcheck, autograd, and every rejection."""

import pytest
import torch

import fastllm.ops as ops
from fastllm._reference import pool_gather_reference, pool_write_reference
from helpers import FLOAT_DTYPES, poison, random_tensor, value_checks

# widths: one element, odd sizes (no vector access), a KV head, an adapter row
WIDTHS = [1, 7, 64, 100, 4096]


def random_slots(num_slots, n, index_dtype, device, unique=True):
    if unique:
        slots = torch.randperm(num_slots)[:n]
    else:
        slots = torch.randint(0, num_slots, (n,))
    return slots.to(device=device, dtype=index_dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_pool_write_matches_reference(device, dtype, width, index_dtype):
    num_slots, n = 37, 23
    pool = random_tensor(num_slots, width, dtype=dtype, device=device)
    expected = pool.clone()
    slots = random_slots(num_slots, n, index_dtype, device)
    rows = random_tensor(n, width, dtype=dtype, device=device)
    ops.pool_write(pool, slots, rows)
    pool_write_reference(expected, slots, rows)
    # A copy is exact: any mismatch is a wrong address, not rounding.
    torch.testing.assert_close(pool, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_pool_gather_matches_reference(device, dtype, width, index_dtype):
    num_slots, n = 37, 50
    pool = random_tensor(num_slots, width, dtype=dtype, device=device)
    slots = random_slots(num_slots, n, index_dtype, device, unique=False)
    torch.testing.assert_close(ops.pool_gather(pool, slots), pool_gather_reference(pool, slots),
                               rtol=0, atol=0)


def test_pool_gather_writes_every_output_element(device):
    # Free a NaN-filled block of exactly the output's size first: the allocator tends to hand the
    # same memory to the kernel's output, so an element the kernel skips shows up as NaN.
    pool = random_tensor(64, 24, device=device)
    del_me = poison(torch.empty(64, 24, device=device))
    del del_me
    out = ops.pool_gather(pool, torch.arange(63, -1, -1, device=device))
    assert not out.isnan().any()
    torch.testing.assert_close(out, pool.flip(0), rtol=0, atol=0)


def test_pool_write_leaves_other_slots_untouched(device):
    pool = poison(torch.empty(16, 8, device=device))
    slots = torch.tensor([3, 9], device=device)
    ops.pool_write(pool, slots, random_tensor(2, 8, device=device))
    written = torch.zeros(16, dtype=torch.bool, device=device)
    written[slots] = True
    assert not pool[written].isnan().any()
    assert pool[~written].isnan().all()


def test_misaligned_views_use_narrow_access(device):
    # A pool view starting one element in defeats 16-byte access; results must not change.
    flat = random_tensor(1 + 20 * 8, dtype=torch.float16, device=device)
    pool = flat[1:].view(20, 8)
    slots = torch.tensor([4, 0, 19], device=device)
    torch.testing.assert_close(ops.pool_gather(pool, slots), pool[slots], rtol=0, atol=0)
    rows = random_tensor(3, 8, dtype=torch.float16, device=device)
    ops.pool_write(pool, slots, rows)
    torch.testing.assert_close(pool[slots], rows, rtol=0, atol=0)


def test_empty_and_large_batches(device):
    pool = random_tensor(4096, 64, dtype=torch.bfloat16, device=device)
    empty = torch.empty(0, dtype=torch.int64, device=device)
    assert ops.pool_gather(pool, empty).shape == (0, 64)
    ops.pool_write(pool, empty, torch.empty(0, 64, dtype=torch.bfloat16, device=device))
    slots = torch.randperm(4096, device=device)
    torch.testing.assert_close(ops.pool_gather(pool, slots), pool[slots], rtol=0, atol=0)


def test_pool_gather_gradcheck(device):
    pool = torch.randn(9, 5, dtype=torch.float64, device=device, requires_grad=True)
    slots = torch.tensor([2, 2, 7, 0], device=device)  # a repeat: its gradient must accumulate
    assert torch.autograd.gradcheck(lambda p: ops.pool_gather(p, slots), (pool,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    pool = random_tensor(32, 16, dtype=dtype, device=device)
    slots = torch.tensor([5, 1, 30, 7], device=device)
    rows = random_tensor(4, 16, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fastllm.pool_write.default, (pool, slots, rows))
    torch.library.opcheck(torch.ops.fastllm.pool_gather.default, (pool, slots))
    pool64 = pool.double().requires_grad_()
    torch.library.opcheck(torch.ops.fastllm.pool_gather.default, (pool64, slots))


def test_torch_compile_traces_pool_ops(device):
    def read_modify_write(pool, slots, delta):
        rows = ops.pool_gather(pool, slots) + delta
        ops.pool_write(pool, slots, rows)
        return rows.sum()

    pool = random_tensor(16, 8, device=device)
    expected_pool = pool.clone()
    slots = torch.tensor([1, 4, 9], device=device)
    delta = random_tensor(3, 8, device=device)
    compiled = torch.compile(read_modify_write, backend="aot_eager", fullgraph=True)
    total = compiled(pool, slots, delta)
    expected = read_modify_write(expected_pool, slots, delta)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(pool, expected_pool)


# ---- rejections: each names the argument, and a rejected write changes nothing -------------------

def _bad_write_cases(device):
    pool = lambda: random_tensor(8, 4, device=device)  # noqa: E731
    slots = lambda: torch.tensor([1, 2], device=device)  # noqa: E731
    rows = lambda: random_tensor(2, 4, device=device)  # noqa: E731
    return [
        ("slot out of range", pool(), torch.tensor([1, 8], device=device), rows(), IndexError,
         r"slots must lie in \[0, 8\), got values in \[1, 8\]"),
        ("negative slot", pool(), torch.tensor([-1, 2], device=device), rows(), IndexError,
         r"slots must lie in \[0, 8\)"),
        ("float slots", pool(), torch.tensor([1.0, 2.0], device=device), rows(), TypeError,
         r"slots must have dtype in \{Int, Long\}, got Float"),
        ("2-D slots", pool(), torch.tensor([[1, 2]], device=device), rows(), ValueError,
         r"slots must be 1-D"),
        ("rows dtype", pool(), slots(), rows().half(), TypeError,
         r"rows must have the dtype of pool \(Float\), got Half"),
        ("rows width", pool(), slots(), random_tensor(2, 5, device=device), ValueError,
         r"rows must have pool's width 4"),
        ("rows count", pool(), slots(), random_tensor(3, 4, device=device), ValueError,
         r"rows and slots must have the same length"),
        ("rows 1-D", pool(), slots(), random_tensor(8, device=device), ValueError,
         r"rows must be 2-D"),
        ("rows not contiguous", pool(), slots(), random_tensor(4, 2, device=device).t(),
         ValueError, r"rows must be contiguous"),
        ("pool not contiguous", random_tensor(4, 8, device=device).t(), slots(), rows(),
         ValueError, r"pool must be contiguous"),
        ("integer pool", torch.ones(8, 4, dtype=torch.int32, device=device), slots(),
         torch.ones(2, 4, dtype=torch.int32, device=device), TypeError, r"pool must have dtype"),
        ("slots on another device", pool(), slots().cpu(), rows(), ValueError,
         r"slots must be on pool's device"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_pool_write_rejects_bad_input(device, case):
    name, pool, slots, rows, error, message = _bad_write_cases(device)[case]
    if name == "slots on another device" and device == "cpu":
        pytest.skip("a device mismatch needs a CUDA pool")
    before = pool.clone()
    with value_checks(device), pytest.raises(error, match=message):
        ops.pool_write(pool, slots, rows)
    torch.testing.assert_close(pool, before, rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("slots, error, message", [
    (torch.tensor([0, 99]), IndexError, r"pool_gather: slots must lie in \[0, 8\)"),
    (torch.tensor([0.5]), TypeError, r"pool_gather: slots must have dtype"),
    (torch.tensor([True]), TypeError, r"pool_gather: slots must have dtype"),
    (torch.arange(8)[::2], ValueError, r"pool_gather: slots must be contiguous"),
])
def test_pool_gather_rejects_bad_input(device, slots, error, message):
    pool = random_tensor(8, 4, device=device)
    with value_checks(device), pytest.raises(error, match=message):
        ops.pool_gather(pool, slots.to(device))


def test_cuda_bad_slots_are_skipped_and_reported(device):
    # Without the debug mode a CUDA call checks no values on the host (no synchronisation): the
    # kernel skips a bad slot, touches nothing outside the pool and reports it.
    if device != "cuda":
        pytest.skip("the device error word exists on CUDA only")
    ops.raise_index_errors()
    pool = random_tensor(8, 4, device=device)
    before = pool.clone()
    ops.pool_write(pool, torch.tensor([1, 99, -3], device=device), random_tensor(3, 4, device=device))
    assert torch.equal(pool[0], before[0]) and torch.equal(pool[2:], before[2:])
    with pytest.raises(IndexError, match="pool_write: slots"):
        ops.raise_index_errors()
    rows = ops.pool_gather(pool, torch.tensor([2, 8], device=device))
    assert torch.equal(rows[0], pool[2]) and torch.equal(rows[1], torch.zeros(4, device=device))
    with pytest.raises(IndexError, match="pool_gather: slots"):
        ops.raise_index_errors()
    ops.raise_index_errors()  # cleared
