"""GaLore under DistributedDataParallel: 2 CPU processes (gloo) end with identical parameters,
equal to one process training on the same global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from fastllm.optim import GaLoreAdamW, galore_param_groups

WORLD, STEPS, GLOBAL_BATCH = 2, 8, 16


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 24))


def global_batch(step):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(GLOBAL_BATCH, 24, generator=g), torch.randn(GLOBAL_BATCH, 24, generator=g)


def make_optimizer(model):
    return GaLoreAdamW(galore_param_groups(model, rank=6, update_proj_gap=4), lr=1e-2,
                       weight_decay=0.01)


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = make_optimizer(model)
    for step in range(STEPS):
        x, y = global_batch(step)
        x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        ((ddp(x) - y) ** 2).mean().backward()  # DDP averages: the global batch's mean loss
        opt.step()
        opt.zero_grad()
    torch.save([p.detach().clone() for p in model.parameters()],
                os.path.join(out_dir, f"rank{rank}.pt"))
    # Every collective finished on every rank, DDP's reducer gone, then the group: a process
    # group torn down under a live reducer aborted at exit (SIGABRT) in CI.
    dist.barrier()
    del ddp, opt
    dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # Every rank all-reduces to the same gradient, so computes the same projector and update.
    for a, b in zip(*ranks):
        assert torch.equal(a, b)
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(model)
    for step in range(STEPS):
        x, y = global_batch(step)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    for a, b, s in zip(ranks[0], model.parameters(), start):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.equal(a, s)
