"""PagePool bookkeeping: allocation, release, ownership, statistics, and failure without damage."""

import pytest
import torch

from fastllm.memory import PagePool, PoolExhaustedError
from helpers import random_tensor


def make_pool(device="cpu", num_pages=16, page_size=64, dtype=torch.float32):
    return PagePool(num_pages, page_size, dtype, device)


def test_alloc_returns_distinct_ids_and_counts_by_owner(device):
    pool = make_pool(device)
    lora = pool.alloc(5, owner="lora")
    kv = pool.alloc(7, owner="kv")
    assert lora.dtype == torch.int64 and lora.device.type == "cpu"
    assert len(set(lora.tolist()) | set(kv.tolist())) == 12
    stats = pool.stats()
    assert stats["used_pages"] == 12 and stats["free_pages"] == 4
    assert stats["by_owner"] == {
        "lora": {"pages": 5, "bytes": 5 * 64 * 4},
        "kv": {"pages": 7, "bytes": 7 * 64 * 4},
    }
    assert pool.used_bytes() == 12 * 256 and pool.free_bytes == 4 * 256
    assert pool.used_bytes("lora") == 5 * 256 and pool.used_bytes("nobody") == 0
    assert pool.owner_of(int(kv[0])) == "kv"


def test_freed_pages_move_between_owners():
    # The point of one pool: pages LoRA gives back are the pages the KV cache can take.
    pool = make_pool(num_pages=8)
    lora = pool.alloc(8, owner="lora")
    with pytest.raises(PoolExhaustedError):
        pool.alloc(1, owner="kv")
    pool.free(lora[:6])
    kv = pool.alloc(6, owner="kv")
    assert sorted(kv.tolist()) == sorted(lora[:6].tolist())
    assert pool.stats()["by_owner"] == {"lora": {"pages": 2, "bytes": 512},
                                       "kv": {"pages": 6, "bytes": 1536}}


def test_exhaustion_raises_and_changes_nothing():
    pool = make_pool(num_pages=4)
    held = pool.alloc(3, owner="kv")
    before = pool.stats()
    with pytest.raises(PoolExhaustedError,
                       match=r"asked for 2 pages but only 1 of 4 are free.*'kv' holds 3") as err:
        pool.alloc(2, owner="lora")
    assert (err.value.owner, err.value.requested, err.value.free_pages) == ("lora", 2, 1)
    assert err.value.held == {"kv": 3} and err.value.needed == {"kv": 3, "lora": 2}
    assert pool.stats() == before
    assert pool.alloc(1, owner="lora").item() not in held.tolist()


def test_allocated_data_survives_a_failed_alloc():
    pool = make_pool(num_pages=2, page_size=8)
    page = pool.alloc(1, owner="kv")
    slots = pool.slots(page, 8)
    rows = random_tensor(1, 8)
    pool.write(slots, rows)
    with pytest.raises(PoolExhaustedError):
        pool.alloc(2, owner="kv")
    torch.testing.assert_close(pool.gather(slots, 8), rows, rtol=0, atol=0)


def test_double_free_raises_and_frees_nothing():
    pool = make_pool()
    pages = pool.alloc(4, owner="kv")
    pool.free(pages[:2])
    before = pool.stats()
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(pages[1:3])  # page 1 was already freed, page 2 was not
    assert pool.stats() == before
    assert pool.owner_of(int(pages[2])) == "kv"


@pytest.mark.parametrize("bad_ids, message", [
    ([16], "not pages of this pool"),
    ([-1], "not pages of this pool"),
    ([3, 3], "repeat"),
])
def test_foreign_or_repeated_ids_raise(bad_ids, message):
    pool = make_pool()
    pool.alloc(16, owner="kv")
    before = pool.stats()
    with pytest.raises(ValueError, match=message):
        pool.free(torch.tensor(bad_ids))
    assert pool.stats() == before


def test_free_rejects_float_ids():
    pool = make_pool()
    pool.alloc(2, owner="kv")
    with pytest.raises(TypeError, match="page_ids must be integers"):
        pool.free(torch.tensor([0.0]))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(num_pages=0, page_size=8), ValueError, "num_pages"),
    (dict(num_pages=4, page_size=-1), ValueError, "page_size"),
    (dict(num_pages=4, page_size=8, dtype=torch.int32), TypeError, "dtype"),
    # bool is an int subclass: refused as a count, not turned into 1 (or a raw torch error)
    (dict(num_pages=True, page_size=8), ValueError,
     r"num_pages must be a positive int, got True"),
    (dict(num_pages=4, page_size=True), ValueError,
     r"page_size must be a positive int, got True"),
])
def test_constructor_rejects_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        PagePool(**kwargs)


def test_alloc_rejects_bad_arguments():
    pool = make_pool()
    with pytest.raises(ValueError, match="n must be"):
        pool.alloc(-1, owner="kv")
    with pytest.raises(ValueError, match="owner"):
        pool.alloc(1, owner="")
    for bad in (True, False, 1.0):
        with pytest.raises(ValueError, match=rf"PagePool.alloc: n must be a non-negative int, "
                                             rf"got {bad!r}"):
            pool.alloc(bad, owner="kv")
    assert pool.alloc(0, owner="kv").numel() == 0
    assert pool.used_pages == 0
    for bad in (True, -1, 16, 0.0):
        with pytest.raises(ValueError, match=rf"owner_of: page_id must be an int in 0..15, "
                                             rf"got {bad!r}"):
            pool.owner_of(bad)


def test_row_width_must_divide_page_size():
    pool = make_pool(page_size=64)
    with pytest.raises(ValueError, match="divisor of page_size 64"):
        pool.rows(48)
    with pytest.raises(ValueError, match="divisor of page_size 64, got True"):
        pool.rows(True)
    assert pool.rows(16).shape == (16 * 4, 16)


def test_slots_follow_page_table_order(device):
    pool = make_pool(device, num_pages=8, page_size=32)
    pages = torch.tensor([5, 2, 7])
    width = 8  # four rows per page
    slots = pool.slots(pages, width)
    assert slots.tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29, 30, 31]
    positions = torch.tensor([0, 3, 4, 9, 11])
    assert pool.slots_at(pages, positions, width).tolist() == [20, 23, 8, 29, 31]


def test_write_then_gather_through_pages(device):
    pool = make_pool(device, num_pages=8, page_size=64, dtype=torch.float16)
    pages = pool.alloc(3, owner="kv")
    slots = pool.slots(pages, 16)
    rows = random_tensor(slots.numel(), 16, dtype=torch.float16, device=device)
    pool.write(slots, rows)
    torch.testing.assert_close(pool.gather(slots, 16), rows, rtol=0, atol=0)
    # The same pages read at another width are the same bytes, reshaped.
    wide = pool.gather(pool.slots(pages, 64), 64)
    torch.testing.assert_close(wide.reshape(-1, 16), rows, rtol=0, atol=0)


class _Spare:
    def reclaimable_pages(self):
        return 0

    def reclaim(self, pages):
        return 0


@pytest.mark.parametrize("handle", [True, 1.0, "1", None])
def test_remove_reclaimer_refuses_a_handle_that_is_not_an_int(handle):
    pool = PagePool(4, 64, torch.float32, "cpu")
    spare = _Spare()
    first, second = pool.add_reclaimer("a", spare), pool.add_reclaimer("b", spare)
    assert (first, second) == (0, 1)  # True == 1 would have matched the second one
    with pytest.raises(TypeError, match=rf"remove_reclaimer: handle must be the int "
                                        rf"add_reclaimer returned, got {handle!r}"):
        pool.remove_reclaimer(handle)
    pool.remove_reclaimer(second)  # still registered: the refusal removed nothing
    with pytest.raises(ValueError, match="no reclaimer with handle 1"):
        pool.remove_reclaimer(second)
