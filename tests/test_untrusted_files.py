"""The package never unpickles a file it did not write itself (issue 21): every ``torch.load`` in
``python/fastllm`` passes ``weights_only=True``, and nothing imports pickle, marshal or shelve or
calls eval/exec. Checked on the source, so a new loader cannot slip in unnoticed."""

from __future__ import annotations

import ast
import pathlib

import fastllm

PACKAGE = pathlib.Path(fastllm.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill"}


def _sources():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20, f"expected the package's modules under {PACKAGE}"
    for path in files:
        yield path, ast.parse(path.read_text(), filename=str(path))


def _is_torch_load(call: ast.Call) -> bool:
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "load"
            and isinstance(func.value, ast.Name) and func.value.id == "torch")


def test_every_torch_load_passes_weights_only_true():
    loads = 0
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _is_torch_load(node):
                loads += 1
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                assert isinstance(flag, ast.Constant) and flag.value is True, \
                    f"{path}:{node.lineno}: torch.load without weights_only=True"
    assert loads >= 1  # the PEFT adapter_model.bin loader: the check sees real calls


def test_no_pickle_or_dynamic_code_in_the_package():
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]}
            else:
                names = set()
            assert not names & UNSAFE_MODULES, f"{path}:{node.lineno}: imports {names}"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec"), \
                    f"{path}:{node.lineno}: calls {node.func.id}"


def test_the_check_catches_an_unsafe_load(tmp_path):
    tree = ast.parse("import torch\nstate = torch.load('x.pt')\n")
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_torch_load(n)]
    assert len(calls) == 1 and not calls[0].keywords
