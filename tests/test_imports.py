"""fastllm imports with nothing but its declared dependencies (torch, numpy), and importing
fastllm.ops stays light.

Nothing is uninstalled: a subprocess makes every installed distribution that torch and numpy do not
need unimportable (``sys.modules[name] = None``, which is also what ``importlib.util.find_spec``
reads as "not installed"), then imports fastllm the way a user of a torch-only environment would.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

import fastllm

REPO = pathlib.Path(__file__).resolve().parents[1]
# The undeclared packages fastllm's optional paths and its test suite use: each must be blocked.
UNDECLARED = ("transformers", "peft", "accelerate", "gguf", "safetensors", "tqdm", "matplotlib")

# Runs first in the subprocess: computes the distributions that torch and numpy need (recursively,
# from their metadata) and blocks the top-level modules of every other installed one.
BLOCKER = textwrap.dedent(r"""
    import re, sys
    from importlib import metadata

    def canonical(name):
        return re.sub(r"[-_.]+", "-", name).lower()

    allowed, todo = set(), ["torch", "numpy"]
    while todo:
        name = canonical(todo.pop())
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" in requirement.partition(";")[2]:
                continue  # only what a plain `pip install torch numpy` brings
            todo.append(re.match(r"[A-Za-z0-9._-]+", requirement).group())
    blocked = sorted(module for module, dists in metadata.packages_distributions().items()
                     if module.isidentifier() and module != "fastllm"
                     and module not in sys.stdlib_module_names
                     and not any(canonical(dist) in allowed for dist in dists))
    preloaded = [module for module in blocked if module in sys.modules]
    assert not preloaded, f"imported before the block could apply: {preloaded}"
    for module in blocked:
        sys.modules[module] = None
""")


def run_python(code: str) -> subprocess.CompletedProcess:
    # The fastllm this test session imports (the installed one, with its compiled _C), not the
    # source tree, which holds no extension in a fresh clone.
    package_parent = str(pathlib.Path(fastllm.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_parent, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def run_checked(code: str) -> dict:
    """Run ``code`` (which prints one JSON line last) and return that line, parsed."""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fastllm_imports_and_runs_with_torch_and_numpy_only():
    code = BLOCKER + textwrap.dedent(f"""
        import json, pathlib, tempfile
        assert all(sys.modules.get(m, 1) is None for m in {UNDECLARED!r} if m in blocked)

        import torch
        import fastllm, fastllm.ops, fastllm.memory, fastllm.optim, fastllm.nn
        import fastllm.lora, fastllm.sparse
        from fastllm.lora import AdapterManager
        from fastllm.nn import GaLoreLinear, LoRALinear, SparseMLP
        from fastllm.optim import GaLoreAdamW

        pool = torch.randn(10, 4)
        slots = torch.tensor([7, 2, 7])
        assert torch.equal(fastllm.ops.pool_gather(pool, slots), pool[slots])
        weight = torch.nn.Parameter(torch.randn(8, 6))
        weight.grad = torch.randn(8, 6)
        GaLoreAdamW([{{"params": [weight], "rank": 2}}], lr=1e-2).step()

        errors = {{}}
        def error_of(key, action):
            try:
                action()
            except ImportError as error:
                errors[key] = str(error)
        error_of("import fastllm.kv", lambda: __import__("fastllm.kv"))
        error_of("fastllm.kv", lambda: fastllm.kv)
        error_of("from fastllm.kv import FastGenCache", lambda: exec("from fastllm.kv import FastGenCache"))
        error_of("from fastllm import kv", lambda: exec("from fastllm import kv"))
        predictors = fastllm.sparse.Predictors(layers=torch.nn.ModuleList(), identity={{}}, rank=0)
        with tempfile.TemporaryDirectory() as tmp:
            error_of("Predictors.save", lambda: predictors.save(pathlib.Path(tmp) / "p.safetensors"))
        print(json.dumps({{"blocked": blocked, "errors": errors,
                           "loaded": sorted(m for m in {UNDECLARED!r} if sys.modules.get(m))}}))
    """)
    out = run_checked(code)
    installed_undeclared = [m for m in UNDECLARED if m in out["blocked"]]
    assert "transformers" in installed_undeclared, "transformers is not installed: nothing proven"
    assert out["loaded"] == []
    for key in ("import fastllm.kv", "fastllm.kv", "from fastllm.kv import FastGenCache",
                "from fastllm import kv"):
        assert key in out["errors"], f"{key} did not raise ImportError"
        message = out["errors"][key]
        assert "fastllm.kv needs transformers" in message and "pip install 'fastllm[hf]'" in message
    if "safetensors" in installed_undeclared:
        assert "Predictors.save needs safetensors" in out["errors"]["Predictors.save"]


def test_import_fastllm_ops_stays_light(record_property):
    # With everything installed (the developer's environment), importing the ops must still not
    # pull transformers or torch._dynamo: both cost seconds, and models import fastllm.ops.
    code = textwrap.dedent("""
        import json, sys, time
        start = time.perf_counter(); import torch; torch_s = time.perf_counter() - start
        start = time.perf_counter(); import fastllm.ops; fastllm_s = time.perf_counter() - start
        heavy = [m for m in ("transformers", "torch._dynamo", "fastllm.kv") if m in sys.modules]
        print(json.dumps({"torch_s": torch_s, "fastllm_ops_s": fastllm_s, "heavy": heavy}))
    """)
    out = run_checked(code)
    record_property("import_torch_s", round(out["torch_s"], 3))
    record_property("import_fastllm_ops_s", round(out["fastllm_ops_s"], 3))
    print(f"import torch {out['torch_s']:.2f} s, then import fastllm.ops {out['fastllm_ops_s']:.2f} s")
    assert out["heavy"] == []


def test_kv_is_imported_on_first_use():
    pytest.importorskip("transformers")
    out = run_checked(textwrap.dedent("""
        import json, sys
        import fastllm
        before = "fastllm.kv" in sys.modules
        from fastllm.kv import FastGenCache
        print(json.dumps({"before": before, "same": fastllm.kv.FastGenCache is FastGenCache,
                          "attribute": "kv" in vars(fastllm)}))
    """))
    assert out == {"before": False, "same": True, "attribute": True}


def test_unknown_attribute_is_an_attribute_error():
    import fastllm
    with pytest.raises(AttributeError, match="no attribute 'not_a_capability'"):
        fastllm.not_a_capability  # noqa: B018
    assert not hasattr(fastllm, "not_a_capability")
