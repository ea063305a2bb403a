"""Every ``>>>`` example in the public docstrings runs, and every public class and function has one,
so the API reference cannot drift from the API.

Convention (for whoever writes an example):
- Examples assume ``import torch``, ``import fastllm`` and ``from torch import nn``; anything else
  they import themselves. They run on CPU, in well under a second each, with tiny tensors and
  models built on the spot (nothing is downloaded).
- Output is compared with ``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``. Print shapes, dtypes, ints,
  bools (a comparison with a reference within a tolerance), never random floats; seed with
  ``_ = torch.manual_seed(0)``.
- ``# doctest: +SKIP`` only where a real model (SmolLM2) is needed.
- An example importing an optional package that is not installed (transformers, ...) is skipped,
  as in test_docs_examples.py; so is every example of ``fastllm.kv`` (a transformers Cache).
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import inspect
import re

import pytest
import torch
from torch import nn

import fastllm

MODULES = ["fastllm", "fastllm.ops", "fastllm.nn", "fastllm.optim", "fastllm.memory",
           "fastllm.lora", "fastllm.kv", "fastllm.sparse"]
OPTIONAL = ("transformers", "peft", "gguf", "accelerate", "safetensors", "matplotlib")
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
GLOBS = {"torch": torch, "fastllm": fastllm, "nn": nn}

# Public names that may go without an example, and why. Keep it short: new API gets an example.
NO_EXAMPLE: dict[str, str] = {}

_IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", re.M)


def _missing_optional(names) -> str | None:
    for name in names:
        if name in OPTIONAL and importlib.util.find_spec(name) is None:
            return name
    return None


def public_objects(module) -> list[tuple[str, object]]:
    """``(qualified name, object)`` of every class and function in the module's ``__all__``."""
    out = []
    for attr in module.__all__:
        if attr in getattr(module, "_LAZY_SUBMODULES", ()):
            continue  # a submodule (fastllm.kv), imported only on first use; listed in MODULES
        obj = getattr(module, attr)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            out.append((f"{module.__name__}.{attr}", obj))
    return out


def _import(name: str):
    """The module, or the optional package whose absence keeps it from importing."""
    try:
        return importlib.import_module(name), None
    except ImportError as error:
        missing = getattr(error, "name", None) or ""
        if missing.split(".")[0] in OPTIONAL or "pip install" in str(error):
            return None, f"{name} needs an optional package: {error}"
        raise


def collect() -> list:
    """One entry per docstring with examples: a DocTest, or a skip reason for a module that
    cannot be imported here."""
    finder = doctest.DocTestFinder(exclude_empty=True)
    shallow = doctest.DocTestFinder(recurse=False, exclude_empty=True)
    found, seen = [], set()
    for name in MODULES:
        module, reason = _import(name)
        if module is None:
            found.append(pytest.param(None, id=name, marks=pytest.mark.skip(reason=reason)))
            continue
        targets = [(name, module, shallow)] + [(q, o, finder) for q, o in public_objects(module)]
        for qualified, obj, which in targets:
            if id(obj) in seen:
                continue  # re-exported under two modules (e.g. fastllm.sparse and fastllm.ops)
            seen.add(id(obj))
            home = inspect.getmodule(obj)
            for test in which.find(obj, qualified, globs={**vars(home), **GLOBS}):
                if test.examples:
                    found.append(pytest.param(test, id=test.name))
    return found


DOCTESTS = collect()


def test_examples_found():
    # A finder that silently found nothing would pass every other test here.
    assert sum(1 for p in DOCTESTS if p.values[0] is not None) >= 40


@pytest.mark.parametrize("test", DOCTESTS)
def test_docstring_example(test, tmp_path, monkeypatch):
    missing = _missing_optional(m for ex in test.examples for m in _IMPORT.findall(ex.source))
    if missing:
        pytest.skip(f"optional package {missing} is not installed")
    monkeypatch.chdir(tmp_path)  # examples that save a file leave nothing behind
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    try:
        result = runner.run(test, out=report.append, clear_globs=True)
    finally:
        # A failing example must not leave global state to the tests after it (galore_ddp's
        # example opens a process group).
        torch.set_default_dtype(torch.float32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert result.failed == 0, "".join(report)


@pytest.mark.parametrize("name", MODULES)
def test_public_api_has_examples(name):
    module, reason = _import(name)
    if module is None:
        pytest.skip(reason)
    missing = []
    for qualified, obj in public_objects(module):
        if qualified in NO_EXAMPLE:
            continue
        if ">>>" not in (inspect.getdoc(obj) or ""):
            missing.append(qualified)
    assert not missing, (f"public API without a >>> example in its docstring: {missing}; add "
                         "one (or, with a reason, an entry in NO_EXAMPLE)")


def test_allow_list_is_current():
    # An entry for a name that is gone, or that has an example now, is stale.
    for qualified, reason in NO_EXAMPLE.items():
        module, skip = _import(qualified.rsplit(".", 1)[0])
        if module is None:
            continue
        public = dict(public_objects(module))
        assert qualified in public, f"NO_EXAMPLE names {qualified}, which is not public"
        assert ">>>" not in (inspect.getdoc(public[qualified]) or ""), \
            f"{qualified} has an example now: drop it from NO_EXAMPLE"
