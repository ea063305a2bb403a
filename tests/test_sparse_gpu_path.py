"""The sparse MLP's GPU path without host synchronisation (issue 13).

On a machine without a GPU: a SparseMLP decode step runs on fake CUDA tensors (FakeTensorMode,
where `.item()`, `.tolist()`, `nonzero` and `bool(tensor)` raise), so the Python layer provably
reads no device data; the threshold decode step compiles with `torch.compile(fullgraph=True)`;
the fixed-width sets that replace `nonzero` match it; `counts` with a shared set. With a GPU:
a decode step makes no synchronisation (`torch.cuda.set_sync_debug_mode("error")`), a
CUDA-graph replay equals eager, and bad indices are reported by the device error word or, in
the debug mode, raised at the call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode

import fastllm
import fastllm.ops as ops
from fastllm._reference import sparse_mlp_reference
from fastllm.nn import FactoredPredictor, QuantizedPredictor, SparseMLP
from fastllm.nn.sparse_mlp import _mask_to_sets
from helpers import random_tensor

D, N = 64, 160  # hidden size, MLP neurons (tiny Llama MLP)

needs_cuda = pytest.mark.skipif(
    not (fastllm.build_info()["cuda"] and torch.cuda.is_available()),
    reason="needs a GPU and a CUDA build")


class LlamaMLP(nn.Module):
    """The Llama MLP shape (gate_proj, up_proj, down_proj, act_fn), random weights."""

    def __init__(self, d: int = D, n: int = N):
        super().__init__()
        self.gate_proj = nn.Linear(d, n, bias=False)
        self.up_proj = nn.Linear(d, n, bias=False)
        self.down_proj = nn.Linear(n, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# name -> (SparseMLP options, rows per call). Each is a decode-shaped call (1 row) unless the case
# is about several rows (per-row sets, union) and then runs them sparse (dense_above=None).
CASES = {
    "predictor_topk": (dict(mode="predictor", keep=48), 1),
    "predictor_topk_rows": (dict(mode="predictor", keep=48, dense_above=None), 3),
    "predictor_logit": (dict(mode="predictor", logit_threshold=-2.5), 1),  # log|h| > -2.5
    "threshold": (dict(mode="threshold", threshold=0.05), 1),
    "threshold_per_row": (dict(mode="threshold", threshold=0.05, dense_above=None), 3),
    "threshold_union": (dict(mode="threshold", threshold=0.05, dense_above=None,
                             batch_sets="union"), 3),
    "threshold_masked": (dict(mode="threshold", threshold=0.05, compute="masked"), 1),
    "oracle": (dict(mode="oracle", keep=40), 1),
    "oracle_rows": (dict(mode="oracle", keep=40, dense_above=None), 2),
}


def make_sparse(case: str, device, lookahead: bool = False, seed: int = 0):
    """A SparseMLP for `case` over a random Llama MLP (and, with lookahead, the previous layer
    that predicts for it). Returns (layers, rows): run the layers in order."""
    options, rows = CASES[case]
    torch.manual_seed(seed)
    with torch.device(device):
        mlps = [LlamaMLP() for _ in range(2 if lookahead else 1)]
        layers = []
        for mlp in mlps:
            predictor = None
            if options["mode"] == "predictor":
                if lookahead:
                    predictor = FactoredPredictor(D, N, rank=16)
                else:
                    predictor = QuantizedPredictor.from_weights(mlp.up_proj.weight,
                                                                mlp.gate_proj.weight, group=16)
            layers.append(SparseMLP(mlp, predictor=predictor, **options))
    if lookahead:
        layers[0].next_layer = layers[1]
    return layers, rows


def decode_step(layers, x):
    outs = []
    for layer in layers:
        outs.append(layer(x))
    return outs


LOOKAHEAD_CASES = [(c, False) for c in CASES] + [
    (c, True) for c in ("predictor_topk", "predictor_topk_rows", "predictor_logit")]


# ---- fake CUDA tensors: the Python layer reads nothing back ----------------------------------

@contextlib.contextmanager
def no_cuda_runtime(monkeypatch):
    # On a GPU machine the lookahead would take its side-stream branch with fake tensors; the
    # point here is the Python logic, which is the same on both branches.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    yield


@pytest.mark.parametrize("case,lookahead", LOOKAHEAD_CASES)
def test_decode_step_runs_on_fake_cuda_tensors(case, lookahead, monkeypatch):
    with no_cuda_runtime(monkeypatch), FakeTensorMode():
        layers, rows = make_sparse(case, "cuda", lookahead)
        x = torch.randn(rows, D, device="cuda")
        for _ in range(2):  # a second step sees the state the first one left
            outs = decode_step(layers, x)
        for out in outs:
            assert out.device.type == "cuda" and out.shape == (rows, D)
        for layer in layers:
            density = layer.last_density_tensor
            assert density.device.type == "cuda" and density.dim() == 0


def test_fake_decode_step_would_catch_a_host_read(monkeypatch):
    # The proof above is only as good as FakeTensorMode's refusal to read values.
    with no_cuda_runtime(monkeypatch), FakeTensorMode():
        layers, rows = make_sparse("threshold", "cuda")
        decode_step(layers, torch.randn(rows, D, device="cuda"))
        with pytest.raises(DataDependentOutputException):
            layers[0].last_density  # the float conversion: a sync a user opts into
        mask = torch.randn(1, N, device="cuda") > 0
        for read in (lambda: mask.sum().item(), lambda: mask.nonzero(),
                     lambda: bool(mask.any()), lambda: mask.tolist()):
            with pytest.raises(Exception):
                read()


# ---- the fixed-width sets that replace nonzero --------------------------------------------------

@pytest.mark.parametrize("rows,n,density", [(1, 37, 0.3), (4, 160, 0.1), (3, 50, 0.0),
                                            (2, 64, 1.0)])
def test_mask_to_sets_lists_active_neurons_first_in_order(rows, n, density):
    mask = torch.rand(rows, n) < density
    idx, counts = _mask_to_sets(mask)
    assert idx.shape == (rows, n) and idx.is_contiguous()
    assert torch.equal(counts, mask.sum(1))
    for r in range(rows):
        c = int(counts[r])
        assert torch.equal(idx[r, :c], mask[r].nonzero().squeeze(1))
        assert torch.equal(idx[r].sort().values, torch.arange(n))  # padding: valid indices
    assert torch.equal(idx, mask.to(torch.int8).argsort(dim=1, descending=True, stable=True))


def _mlp_args(device, dtype=torch.float32):
    w = dict(w_up=random_tensor(N, D, dtype=dtype, device=device) / D ** 0.5,
             w_gate=random_tensor(N, D, dtype=dtype, device=device) / D ** 0.5,
             w_down_t=random_tensor(N, D, dtype=dtype, device=device) / N ** 0.5,
             b_up=random_tensor(N, dtype=dtype, device=device),
             b_gate=random_tensor(N, dtype=dtype, device=device),
             b_down=random_tensor(D, dtype=dtype, device=device))
    return w


def _call(x, w, idx, counts=None, deterministic=False):
    return ops.sparse_mlp(x, w["w_up"], w["w_down_t"], idx, w_gate=w["w_gate"], b_up=w["b_up"],
                          b_gate=w["b_gate"], b_down=w["b_down"], counts=counts,
                          deterministic=deterministic)


def _ref(x, w, idx, counts=None):
    return sparse_mlp_reference(x, w["w_up"], w["w_gate"], w["w_down_t"], w["b_up"],
                                w["b_gate"], w["b_down"], idx, counts, "silu")


@pytest.mark.parametrize("count", [0, 1, 37, N])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_shared_set_with_a_count(device, count, deterministic, index_dtype):
    # A 1-D set padded to every neuron's slot: only the first counts[0] entries are used.
    w = _mlp_args(device)
    x = random_tensor(3, D, device=device)
    order = torch.randperm(N).to(device=device, dtype=index_dtype)
    counts = torch.tensor([count], dtype=index_dtype, device=device)
    torch.testing.assert_close(_call(x, w, order, counts, deterministic),
                               _ref(x, w, order[:count]), rtol=4e-5, atol=4e-5)


def test_shared_set_count_is_checked_on_cpu():
    w = _mlp_args("cpu")
    x = random_tensor(2, D)
    with pytest.raises(IndexError, match="counts"):
        _call(x, w, torch.arange(10), torch.tensor([11]))
    with pytest.raises(IndexError, match="counts"):
        _call(x, w, torch.arange(10), torch.tensor([-1]))
    with pytest.raises(ValueError, match="counts is only meaningful"):
        _call(x, w, torch.arange(10), torch.tensor([1, 2]))
    # Entries past the count are never read, so they may be anything.
    idx = torch.tensor([3, 5, -7, 10**6])
    torch.testing.assert_close(_call(x, w, idx, torch.tensor([2])), _ref(x, w, idx[:2]))


def test_opcheck_shared_set_with_count(device):
    w = _mlp_args(device)
    x = random_tensor(2, D, device=device)
    torch.library.opcheck(torch.ops.fastllm.sparse_mlp.default,
                          (x, w["w_up"], w["w_gate"], w["w_down_t"], w["b_up"], w["b_gate"],
                           w["b_down"], torch.randperm(N, device=device),
                           torch.tensor([17], device=device), "silu", False))


@pytest.mark.parametrize("case", ["threshold", "threshold_per_row", "threshold_union", "oracle",
                                  "oracle_rows", "predictor_logit"])
def test_mask_path_equals_masked_dense_compute(device, case):
    layers, rows = make_sparse(case, device)
    layer = layers[0]
    x = random_tensor(rows, D, device=device)
    with torch.no_grad():
        out = layer(x)
        density = layer.last_density_tensor
        layer.compute = "masked"
        expected = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert isinstance(density, torch.Tensor) and 0.0 < float(density) < 1.0
    assert layer.last_density == pytest.approx(float(density))


# ---- torch.compile: no graph break --------------------------------------------------------------

@pytest.mark.parametrize("case", ["threshold", "threshold_per_row", "predictor_topk"])
def test_decode_step_compiles_without_graph_breaks(case):
    # The whole decode step is one graph. (With torch 2.14 dynamo would also trace an `.item()` or
    # a `nonzero` into the graph as unbacked values, so this is no proof of "no host read": the
    # fake-tensor tests above are.)
    torch._dynamo.reset()
    layers, rows = make_sparse(case, "cpu")
    layer = layers[0]
    x = random_tensor(rows, D)
    with torch.no_grad():
        eager = layer(x)
        eager_density = layer.last_density_tensor
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        out = compiled(x)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(torch.as_tensor(layer.last_density_tensor),
                               torch.as_tensor(eager_density))


# ---- on a GPU --------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("case,lookahead", LOOKAHEAD_CASES)
def test_cuda_decode_step_does_not_synchronise(case, lookahead):
    layers, rows = make_sparse(case, "cuda", lookahead)
    x = torch.randn(rows, D, device="cuda")
    with torch.no_grad():
        decode_step(layers, x)  # warm-up: the error word and the side stream exist now
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            decode_step(layers, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("case,lookahead", LOOKAHEAD_CASES)
def test_cuda_graph_replay_equals_eager(case, lookahead):
    layers, rows = make_sparse(case, "cuda", lookahead)
    for layer in layers:
        layer.deterministic = True  # atomics would make eager and replay differ in the last bit
    static_x = torch.randn(rows, D, device="cuda")
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_step(layers, static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_outs = decode_step(layers, static_x)
        for _ in range(3):
            static_x.copy_(torch.randn(rows, D, device="cuda"))
            graph.replay()
            eager = decode_step(layers, static_x)
            for a, b in zip(static_outs, eager):
                torch.testing.assert_close(a, b)


@needs_cuda
@pytest.mark.parametrize("bad", ["active_idx", "counts"])
def test_cuda_bad_index_is_reported_not_dereferenced(bad):
    w = _mlp_args("cuda")
    x = random_tensor(3, D, device="cuda")
    if bad == "active_idx":
        idx = torch.tensor([3, N, 7, -5, 2**30], device="cuda")
        counts, valid = None, torch.tensor([3, 7], device="cuda")
    else:
        idx = torch.stack([torch.randperm(N, device="cuda")[:10] for _ in range(3)])
        counts = torch.tensor([4, 11, -1], device="cuda")  # 11 > k: clamped to 10; -1 to 0
        valid = None
    saved = {k: v.clone() for k, v in w.items()}
    saved_x, saved_idx = x.clone(), idx.clone()
    ops.raise_index_errors()  # start clean
    with ops.checked_indices(), pytest.raises(IndexError, match=bad):
        _call(x, w, idx, counts)
    out = _call(x, w, idx, counts)  # returns: no sync, nothing dereferenced out of range
    torch.cuda.synchronize()
    with pytest.raises(IndexError, match=f"sparse_mlp: {bad}"):
        ops.raise_index_errors()
    ops.raise_index_errors()  # cleared
    assert torch.isfinite(out).all()
    assert all(torch.equal(w[k], saved[k]) for k in w)
    assert torch.equal(x, saved_x) and torch.equal(idx, saved_idx)
    if valid is not None:  # a bad neuron contributes nothing
        torch.testing.assert_close(out, _ref(x, w, valid), rtol=4e-5, atol=4e-5)
    else:
        clamped = torch.tensor([4, 10, 0], device="cuda")
        torch.testing.assert_close(out, _ref(x, w, idx, clamped), rtol=4e-5, atol=4e-5)
