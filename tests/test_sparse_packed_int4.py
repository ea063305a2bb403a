"""quantized_neuron_scores on packed int4 weights (uint8, two codes per byte): the layout, the op
against its reference and against the same codes stored one per int8 byte (which is what the
budget study measured), opcheck, the shared decoding / staging / launch arithmetic of the CUDA
kernel (checked on the CPU through fastllm._C), the 4-bit QuantizedPredictor's storage, old files
and every rejection."""

import pytest
import torch

import fastllm.ops as ops
import fastllm.sparse as sparse
from fastllm import _C
from fastllm._ops.sparse import pack_int4_rows, quantize_rows_int8, unpack_int4_rows
from fastllm._reference import quantized_neuron_scores_reference
from fastllm.nn import QuantizedPredictor, quantize_rows
from helpers import FLOAT_DTYPES, random_tensor

# (rows, d_in, n_neurons, group): one token; groups of 16 (two scales in one 16-byte word), 32
# and 64; a neuron count off any vector width; a row of one word per lane and a tail step; a
# batch of 5 (a full and a partial pass of 4 rows); no rows at all.
SHAPES = [(1, 64, 96, 32), (3, 96, 53, 16), (5, 576, 200, 64), (2, 32, 17, 32), (4, 2112, 9, 32),
          (0, 64, 8, 32)]
ACTIVATIONS = [("silu", True), ("relu", False), ("gelu_tanh", True)]


def int4_mlp(d_in, n, group, device, gated=True, bias=True):
    """Packed and one-per-byte copies of the same int4 codes."""
    w_up = random_tensor(n, d_in) / d_in ** 0.5
    w_gate = random_tensor(n, d_in) / d_in ** 0.5 if gated else None
    q_up, up_scale = quantize_rows(w_up, group, bits=4)
    q_gate, gate_scale = quantize_rows(w_gate, group, bits=4) if gated else (None, None)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    pack = lambda q: None if q is None else pack_int4_rows(q).to(device)  # noqa: E731
    return dict(q_up=pack(q_up), up_scale=to(up_scale), q_gate=pack(q_gate),
                gate_scale=to(gate_scale), b_up=to(random_tensor(n)) if bias else None,
                b_gate=to(random_tensor(n)) if bias and gated else None,
                int8_up=to(q_up), int8_gate=to(q_gate))


def call(x, w, activation="silu", up="q_up", gate="q_gate"):
    return ops.quantized_neuron_scores(x, w[up], w["up_scale"], q_gate=w[gate],
                                       gate_scale=w["gate_scale"], b_up=w["b_up"],
                                       b_gate=w["b_gate"], activation=activation)


# ---- the layout ------------------------------------------------------------------------------------

def test_pack_puts_even_columns_in_the_low_nibble_as_twos_complement():
    q = torch.tensor([[1, -1, -8, 7, 0, -3]], dtype=torch.int8)
    packed = pack_int4_rows(q)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 3)
    assert packed.tolist() == [[0xF1, 0x78, 0xD0]]
    assert torch.equal(unpack_int4_rows(packed), q)


def test_pack_round_trips_every_code_and_rejects_wider_ones():
    q = torch.randint(-8, 8, (7, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4_rows(pack_int4_rows(q)), q)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        pack_int4_rows(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4_rows(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="2-D int8"):
        pack_int4_rows(torch.zeros(2, 4, dtype=torch.int16))
    with pytest.raises(ValueError, match="2-D uint8"):
        unpack_int4_rows(torch.zeros(2, 4, dtype=torch.int8))


def test_kernel_decoding_matches_the_layout():
    # int4_code / int8_code are the arithmetic both kernels run (the CUDA one on 32-bit words).
    packed = torch.randint(0, 256, (64, 4), dtype=torch.uint8)
    codes = unpack_int4_rows(packed)
    for row in range(packed.shape[0]):
        word = int.from_bytes(bytes(packed[row].tolist()), "little")
        assert _C.sparse_int4_codes(word) == [float(v) for v in codes[row].tolist()]
    q8 = torch.randint(-128, 128, (64, 4), dtype=torch.int8)
    for row in range(q8.shape[0]):
        word = int.from_bytes(bytes(q8[row].to(torch.uint8).tolist()), "little")
        assert _C.sparse_int8_codes(word) == [float(v) for v in q8[row].tolist()]


# ---- the op ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation,gated", ACTIVATIONS)
@pytest.mark.parametrize("bias", [False, True])
def test_packed_scores_match_reference(device, dtype, shape, activation, gated, bias):
    rows, d_in, n, group = shape
    w = int4_mlp(d_in, n, group, device, gated=gated, bias=bias)
    x = random_tensor(rows, d_in, dtype=dtype, device=device)
    out = call(x, w, activation)
    assert out.dtype == torch.float32 and out.shape == (rows, n)
    want = quantized_neuron_scores_reference(x, w["q_up"], w["up_scale"], w["q_gate"],
                                             w["gate_scale"], w["b_up"], w["b_gate"], activation)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gated", [True, False])
def test_packed_scores_equal_the_same_codes_stored_one_per_byte(device, shape, gated):
    # The budget study scored int4 codes stored one per int8 byte with the int8 path; the packed
    # path must give the same scores, so its quality figures carry over. On the CPU both paths
    # widen the same codes into the same lanes and sum in the same order: equal bit for bit. The
    # CUDA kernel's words hold 16 or 32 columns, so its summation order differs between the two.
    rows, d_in, n, group = shape
    w = int4_mlp(d_in, n, group, device, gated=gated)
    x = random_tensor(rows, d_in, device=device)
    packed = call(x, w, "silu" if gated else "relu")
    one_per_byte = call(x, w, "silu" if gated else "relu", up="int8_up",
                        gate="int8_gate" if gated else "q_gate")
    if device == "cpu":
        assert torch.equal(packed, one_per_byte)
    else:
        torch.testing.assert_close(packed, one_per_byte, rtol=1e-5, atol=1e-6)


def test_opcheck_packed(device):
    w = int4_mlp(64, 40, 16, device)
    x = random_tensor(3, 64, device=device)
    torch.library.opcheck(torch.ops.fastllm.quantized_neuron_scores.default,
                          (x, w["q_up"], w["up_scale"], w["q_gate"], w["gate_scale"], w["b_up"],
                           w["b_gate"], "silu"))


def test_fake_gives_the_shape_of_packed_scores():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(3, 64)
        q = torch.empty(40, 32, dtype=torch.uint8)
        s = torch.empty(40, 2)
        out = torch.ops.fastllm.quantized_neuron_scores.default(x, q, s, q, s, None, None,
                                                                "silu")
        assert out.shape == (3, 40) and out.dtype == torch.float32


def _bad_cases(device):
    w = int4_mlp(64, 12, 32, device)
    yield dict(q_up=w["q_up"][:, :16].contiguous()), ValueError, \
        r"q_up \(packed int4, uint8\) must have shape \[12, 32\]"
    yield dict(q_up=w["int8_up"]), TypeError, "q_gate must have q_up's storage dtype"
    yield dict(q_gate=w["int8_gate"]), TypeError, "q_gate must have q_up's storage dtype"
    yield dict(q_up=w["q_up"].to(torch.int16)), TypeError, \
        r"q_up must be int8 \(one weight per byte\) or uint8"
    yield dict(x=random_tensor(2, 48, device=device), q_up=torch.zeros(12, 24, dtype=torch.uint8,
               device=device), up_scale=torch.ones(12, 3, device=device), q_gate=None,
               gate_scale=None, b_gate=None), ValueError, "multiple of 32"
    yield dict(up_scale=torch.ones(12, 8, device=device),
               gate_scale=torch.ones(12, 8, device=device)), ValueError, "multiple of 16"
    yield dict(q_up=torch.zeros(64, 12, dtype=torch.uint8, device=device).t()), ValueError, \
        "q_up must be contiguous"


@pytest.mark.parametrize("case", range(7))
def test_packed_rejects_bad_arguments_and_leaves_inputs_alone(device, case):
    change, error, match = list(_bad_cases(device))[case]
    w = int4_mlp(64, 12, 32, device)
    args = dict(x=random_tensor(2, 64, device=device), q_up=w["q_up"], up_scale=w["up_scale"],
                q_gate=w["q_gate"], gate_scale=w["gate_scale"], b_up=w["b_up"],
                b_gate=w["b_gate"], activation="silu")
    args.update(change)
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(error, match=match):
        torch.ops.fastllm.quantized_neuron_scores.default(*args.values())
    for k, v in before.items():
        assert torch.equal(args[k], v), f"{k} changed by a rejected call"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rejects_a_misaligned_packed_weight():
    w = int4_mlp(64, 12, 32, "cuda")
    storage = torch.zeros(12 * 32 + 1, dtype=torch.uint8, device="cuda")
    shifted = storage[1:].view(12, 32)
    shifted.copy_(w["q_up"])
    with pytest.raises(ValueError, match="16-byte boundary"):
        ops.quantized_neuron_scores(random_tensor(1, 64, device="cuda"), shifted, w["up_scale"])


# ---- the CUDA kernel's staging layout and launch plan (host arithmetic) --------------------------

@pytest.mark.parametrize("d", [16, 48, 576, 4096])
def test_staged_x_slots_are_a_permutation_of_each_padded_row(d):
    row_floats = _C.sparse_plan_neuron_scores(1, d, 100, 132, 4)[2]
    assert row_floats % 32 == 0 and row_floats >= d > row_floats - 32
    slots = [_C.sparse_staged_x_slot(f) for f in range(row_floats // 4)]
    assert sorted(slots) == list(range(row_floats // 4))


@pytest.mark.parametrize("columns_per_word", [16, 32])  # int8, packed int4
def test_a_quarter_warp_reads_staged_x_without_bank_conflicts(columns_per_word):
    # A 128-bit shared load is served a quarter warp (8 lanes) at a time; 8 float4 slots cover the
    # 32 banks once, so the 8 lanes must hit 8 different slots modulo 8 for each float4 they read.
    per_word = columns_per_word // 4
    for step in range(3):  # the words a lane reads on successive steps
        for quarter in range(4):
            for t in range(per_word):
                lanes = range(8 * quarter, 8 * quarter + 8)
                banks = {_C.sparse_staged_x_slot((lane + 32 * step) * per_word + t) % 8
                         for lane in lanes}
                assert len(banks) == 8, (columns_per_word, step, quarter, t)


@pytest.mark.parametrize("rows", [0, 1, 3, 4, 9, 512])
@pytest.mark.parametrize("d", [64, 576, 4096, 8192, 16384])
@pytest.mark.parametrize("neurons", [1, 8, 1536, 11008, 100000])
@pytest.mark.parametrize("occupancy", [2, 4])
def test_score_plan_covers_every_neuron_evenly_within_the_shared_budget(rows, d, neurons,
                                                                        occupancy):
    sms = 132
    per_pass, blocks, row_floats, shared = _C.sparse_plan_neuron_scores(rows, d, neurons, sms,
                                                                        occupancy)
    assert 1 <= per_pass <= min(4, max(rows, 1))
    assert shared == per_pass * row_floats * 4
    budget = _C.sparse_score_shared_budget
    assert shared <= budget or per_pass == 1  # only a row wider than the budget goes past it
    if row_floats * 4 * min(4, max(rows, 1)) <= budget:
        assert per_pass == min(4, max(rows, 1))  # the rows are not split when they fit
    warps = blocks * _C.sparse_score_threads // 32
    per_warp = -(-neurons // warps)
    assert warps * per_warp >= neurons > (blocks - 1) * 8 * per_warp  # no block without a neuron
    assert blocks <= max(occupancy * sms, -(-neurons // 8))
    if neurons >= occupancy * sms * 8:
        assert blocks * 8 * per_warp - neurons < 8 * per_warp  # the grid is no larger than needed


def test_llama_7b_decode_plan():
    # 11008 neurons on 132 SMs at 3 resident blocks (the kernel's registers and 16 KB of staged x):
    # 4 neurons per warp, 344 blocks (2.6 per SM, one wave), x (16 KB fp32) staged once per block
    # and read by its 32 neurons.
    assert _C.sparse_plan_neuron_scores(1, 4096, 11008, 132, 3) == (1, 344, 4096, 16384)
    # Four rows of 4096 floats are 64 KB: three per pass stay under 48 KB.
    assert _C.sparse_plan_neuron_scores(4, 4096, 11008, 132, 3)[0] == 3


# ---- the module, its storage and its files -------------------------------------------------------

def test_four_bit_predictor_stores_packed_codes_and_counts_their_bytes():
    d, n = 64, 24
    w_up, w_gate = random_tensor(n, d), random_tensor(n, d)
    pred = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4)
    assert pred.q_up.dtype == torch.uint8 and pred.q_up.shape == (n, d // 2)
    assert pred.q_gate.dtype == torch.uint8 and pred.q_gate.shape == (n, d // 2)
    q, scale = quantize_rows(w_up, 32, bits=4)
    assert torch.equal(unpack_int4_rows(pred.q_up), q) and torch.equal(pred.up_scale, scale)
    assert pred.weight_bytes() == pred.weight_bytes(as_stored=True) == 2 * (n * d // 2 + n * 2 * 4)
    pred.to(torch.bfloat16)
    assert pred.q_up.dtype == torch.uint8  # codes are not floats: a cast leaves them alone
    x = random_tensor(3, d)
    pred.impl = "op"
    got = pred.magnitude(x.bfloat16())
    pred.impl = "torch"
    torch.testing.assert_close(pred.magnitude(x.bfloat16()), got, rtol=1e-4, atol=1e-5)


def test_four_bits_need_whole_packed_words():
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedPredictor(48, 8, 16, bits=4)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantizedPredictor.from_weights(random_tensor(8, 48), None, group=16, bits=4)


def test_from_state_packs_old_one_per_byte_codes_and_refuses_other_storage():
    d, n = 64, 16
    w_up, w_gate = random_tensor(n, d), random_tensor(n, d)
    new = QuantizedPredictor.from_weights(w_up, w_gate, group=32, bits=4)
    old_state = {k: v.clone() for k, v in new.state_dict().items()}
    old_state["q_up"] = unpack_int4_rows(old_state["q_up"])  # the storage before packing
    old_state["q_gate"] = unpack_int4_rows(old_state["q_gate"])
    loaded = QuantizedPredictor.from_state(old_state, "silu", bits=4)
    assert torch.equal(loaded.q_up, new.q_up) and torch.equal(loaded.q_gate, new.q_gate)
    x = random_tensor(2, d)
    assert torch.equal(loaded.magnitude(x), new.magnitude(x))
    bad = dict(old_state, q_up=old_state["q_up"].float())
    with pytest.raises(ValueError, match="no 4-bit storage"):
        QuantizedPredictor.from_state(bad, "silu", bits=4)
    with pytest.raises(ValueError, match="no 8-bit storage"):
        QuantizedPredictor.from_state(new.state_dict(), "silu", bits=8)
    wide = dict(old_state, q_up=old_state["q_up"] * 2)  # codes past 4 bits: not an int4 file
    wide["q_up"][0, 0] = 100
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        QuantizedPredictor.from_state(wide, "silu", bits=4)


transformers = pytest.importorskip("transformers")


def tiny_llama(hidden=64, name="tiny-llama-int4"):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    config._name_or_path = name
    return transformers.LlamaForCausalLM(config).eval()


def test_default_is_packed_int4_gate_up_and_falls_back_to_int8_off_whole_words():
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert sparse.default_quantized_selection(dtype) == (4, "gate_up")
    preds = sparse.quantize_predictors(tiny_llama(), None, progress=False)
    layer = preds.layers[0]
    assert (layer.bits, layer.group, layer.q_up.dtype) == (4, 32, torch.uint8)
    odd = sparse.quantize_predictors(tiny_llama(48, "tiny-llama-48"), None, progress=False)
    assert odd.layers[0].bits == 8 and odd.layers[0].q_up.dtype == torch.int8
    with pytest.raises(ValueError, match="multiple of 32"):
        sparse.quantize_predictors(tiny_llama(48, "tiny-llama-48"), None, bits=4, progress=False)


def test_old_int4_files_stored_one_per_byte_still_load(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    model = tiny_llama()
    preds = sparse.quantize_predictors(model, None, bits=4, progress=False)
    path = tmp_path / "old-int4.safetensors"
    preds.save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k in tensors:
        if k.endswith(".q_up") or k.endswith(".q_gate"):
            tensors[k] = unpack_int4_rows(tensors[k])
    save_file(tensors, str(path), metadata=meta)
    loaded = sparse.Predictors.load(path, model)
    x = random_tensor(3, 64)
    for a, b in zip(preds.layers, loaded.layers):
        assert b.q_up.dtype == torch.uint8 and torch.equal(a.q_up, b.q_up)
        assert torch.equal(a.magnitude(x), b.magnitude(x))


def test_bytes_share_as_stored_is_packed_and_ignores_the_column_gather():
    d, n = 576, 1536
    share = lambda **k: sparse.predictor_bytes_share(d, n, **k)  # noqa: E731
    assert share(bits=4, group=32, as_stored=True) == share(bits=4, group=32) \
        == pytest.approx(2 / 3 * (0.5 + 4 / 32) / 2)
    assert share(bits=4, group=32, input_keep=0.5) == pytest.approx(share(bits=4, group=32) / 2)
    assert share(bits=4, group=32, input_keep=0.5, as_stored=True) == share(bits=4, group=32)
    assert share(bits=4, group=32) < share(bits=8, group=64)


def test_int8_codes_still_score_through_the_same_op(device):
    # The int8 storage is unchanged by the packed path (the same op, chosen by dtype).
    w = random_tensor(12, 64) / 8
    q, scale = quantize_rows_int8(w, 16)
    x = random_tensor(2, 64, device=device)
    out = ops.quantized_neuron_scores(x, q.to(device), scale.to(device), activation="relu")
    want = quantized_neuron_scores_reference(x, q.to(device), scale.to(device), activation="relu")
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
