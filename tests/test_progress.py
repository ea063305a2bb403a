"""fastllm's optional progress reports (fastllm._progress) and the functions that take
``progress``: argument checks, the default (only when stderr is a terminal), the plain-line
fallback without tqdm, and that each long pass reports all of its steps when asked."""

from __future__ import annotations

import io

import pytest
import torch

import fastllm._progress as progress_mod
from fastllm._progress import Progress, check_progress, track

transformers = pytest.importorskip("transformers")

import fastllm.sparse as sparse  # noqa: E402


class FakeStderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def plain(monkeypatch):
    """The fallback without tqdm."""
    monkeypatch.setattr(progress_mod, "_tqdm", lambda: None)


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=160,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    config._name_or_path = "tiny-llama-progress"
    return transformers.LlamaForCausalLM(config).eval()


def tiny_opt():
    torch.manual_seed(0)
    config = transformers.OPTConfig(vocab_size=97, hidden_size=48, ffn_dim=160,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    word_embed_proj_dim=48, max_position_embeddings=128)
    config._name_or_path = "tiny-opt-progress"
    return transformers.OPTForCausalLM(config).eval()


@pytest.mark.parametrize("bad", ["yes", 1, 0, 1.0, [True]])
def test_check_progress_rejects_non_bools(bad):
    with pytest.raises(TypeError, match=r"f\.where: progress must be True, False or None"):
        check_progress(bad, "f.where")


def test_none_follows_whether_stderr_is_a_terminal(monkeypatch):
    assert check_progress(True, "f") is True and check_progress(False, "f") is False
    monkeypatch.setattr("sys.stderr", FakeStderr(tty=True))
    assert check_progress(None, "f") is True
    monkeypatch.setattr("sys.stderr", FakeStderr(tty=False))
    assert check_progress(None, "f") is False
    monkeypatch.setattr("sys.stderr", None)
    assert check_progress(None, "f") is False


def test_plain_lines_one_per_tenth(monkeypatch, plain):
    err = FakeStderr(tty=False)
    monkeypatch.setattr("sys.stderr", err)
    assert list(track(range(20), 20, "work", True, unit="batch")) == list(range(20))
    lines = err.getvalue().splitlines()
    assert len(lines) == 11  # 0/20, then one per tenth
    assert lines[0].startswith("work: 0/20 batches") and lines[-1].startswith("work: 20/20 batches")


def test_plain_line_rewritten_in_place_on_a_terminal(monkeypatch, plain):
    err = FakeStderr(tty=True)
    monkeypatch.setattr("sys.stderr", err)
    with Progress(4, "work", True, unit="layer") as bar:
        for _ in range(4):
            bar.update()
    text = err.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    assert text.split("\r")[-1].startswith("work: 4/4 layers")


def test_tqdm_bar_when_installed(capsys):
    pytest.importorskip("tqdm")
    list(track(range(3), 3, "with tqdm", True))
    err = capsys.readouterr().err
    assert "with tqdm" in err and "3/3" in err


def test_disabled_reports_nothing(capsys, plain):
    list(track(range(3), 3, "quiet", False))
    with Progress(2, "quiet", False) as bar:
        bar.update()
    assert capsys.readouterr().err == ""


def test_progress_total_is_checked():
    with pytest.raises(ValueError, match="progress total must be an int >= 0"):
        Progress(-1, "x", True)


# Each long pass reports every step it counts (the fallback's last line says done/total).
@pytest.mark.parametrize("call, line", [
    (lambda m, ids: sparse.train_predictors(m, ids, kind="quantized", group=16, progress=True),
     "quantizing predictors: 5/5 steps"),         # 2 layers + 1 batch + 2 layers' stats
    (lambda m, ids: sparse.quantize_predictors(m, None, group=16, progress=True),
     "quantizing predictors: 2/2 steps"),         # no calibration: the layers only
    (lambda m, ids: sparse.train_predictors(m, ids, kind="factored", rank=4, progress=True),
     "fitting predictors: 3/3 steps"),            # 1 batch + 2 layers
    (lambda m, ids: sparse.calibrate_thresholds(m, ids, 0.5, progress=True),
     "calibrating thresholds: 3/3 steps"),        # 1 batch + 2 layers' quantiles
    (lambda m, ids: sparse.calibrate_thresholds(m, ids, 0.5, progress=True, batch_size=1),
     "calibrating thresholds: 6/6 steps"),
    (lambda m, ids: sparse.gate_magnitudes(m, ids, progress=True, batch_size=1),
     "calibrating thresholds: 4/4 batches"),
    (lambda m, ids: sparse.sparsify(m, 0.5, mode="threshold", calibration_ids=ids,
                                    progress=True),
     "calibrating thresholds: 3/3 steps"),
    (lambda m, ids: sparse.collect_mlp_data(m, ids, lambda i, v, x: None, batch_size=2,
                                            progress=True),
     "collecting MLP inputs: 2/2 batches"),
    (lambda m, ids: sparse.allocate_sparsity(m, None, ids, 0.5, progress=True),
     "collecting MLP inputs: 1/1 batches"),
])
def test_long_passes_report_all_steps(call, line, capsys, plain):
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 12))
    call(model, ids)
    sparse.densify(model)
    lines = capsys.readouterr().err.splitlines()
    assert lines and lines[-1].startswith(line), lines


def test_lowrank_training_reports_its_steps(capsys, plain):
    ids = torch.randint(0, 97, (4, 12))
    sparse.train_predictors(tiny_opt(), ids, rank=4, epochs=1, progress=True)
    assert capsys.readouterr().err.splitlines()[-1].startswith("training predictors: 3/3 steps")


def test_default_is_quiet_when_stderr_is_not_a_terminal(capsys, plain):
    # Under pytest's capture stderr is no terminal: progress=None reports nothing.
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 12))
    sparse.train_predictors(model, ids, kind="quantized", group=16)
    sparse.calibrate_thresholds(model, ids, 0.5)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("call, where", [
    (lambda m, ids: sparse.train_predictors(m, ids, progress="yes"), "train_predictors"),
    (lambda m, ids: sparse.quantize_predictors(m, ids, progress=1), "quantize_predictors"),
    (lambda m, ids: sparse.fit_factored_predictors(m, ids, rank=4, progress=1),
     "fit_factored_predictors"),
    (lambda m, ids: sparse.calibrate_thresholds(m, ids, 0.5, progress="x"),
     "calibrate_thresholds"),
    (lambda m, ids: sparse.gate_magnitudes(m, ids, progress=0), "gate_magnitudes"),
    (lambda m, ids: sparse.sparsify(m, 0.5, mode="threshold", calibration_ids=ids,
                                    progress="x"), "sparsify"),
    (lambda m, ids: sparse.collect_mlp_data(m, ids, print, progress="x"), "collect_mlp_data"),
    (lambda m, ids: sparse.allocate_sparsity(m, None, ids, 0.5, progress="x"),
     "allocate_sparsity"),
])
def test_progress_argument_is_checked_before_any_work(call, where, monkeypatch):
    model = tiny_llama()
    ids = torch.randint(0, 97, (4, 12))
    ran = []
    model.register_forward_pre_hook(lambda *_: ran.append(1))
    with pytest.raises(TypeError, match=rf"fastllm\.sparse\.{where}: progress must be"):
        call(model, ids)
    assert not ran, "the model ran before the argument was checked"
    assert not any(type(m).__name__ == "SparseMLP" for m in model.modules())


@pytest.mark.parametrize("where", ["gate_magnitudes", "calibrate_thresholds"])
@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_calibration_batch_size_is_checked(where, bad):
    call = getattr(sparse, where)
    args = (0.5,) if where == "calibrate_thresholds" else ()
    with pytest.raises(ValueError, match=rf"{where}: batch_size must be a positive int"):
        call(tiny_llama(), torch.zeros(1, 4, dtype=torch.long), *args, batch_size=bad)
