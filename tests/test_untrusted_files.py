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


# ---- files refused, state unchanged -----------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

safetensors = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

from fastllm import sparse  # noqa: E402
from fastllm.lora import AdapterManager  # noqa: E402


def tiny_llama(layers=2, hidden=32):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def peft_dir(root, model, rank=4, name="adapter"):
    """An adapter directory as PEFT writes it, for ``model``'s q and v projections."""
    folder = root / name
    folder.mkdir()
    state = {}
    for module_name, module in model.named_modules():
        if module_name.endswith(("q_proj", "v_proj")):
            prefix = f"base_model.model.{module_name}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features)
            state[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
         "target_modules": ["q_proj", "v_proj"]}))
    safetensors.save_file(state, str(folder / "adapter_model.safetensors"))
    return folder, state


def rewrite(folder, state):
    safetensors.save_file(state, str(folder / "adapter_model.safetensors"))


A_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"


def adapter_cases(tmp_path, model):
    """(what, folder, error pattern) for every kind of bad adapter file."""
    cases = []
    folder, state = peft_dir(tmp_path, model, name="truncated")
    data = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_model.safetensors").write_bytes(data[:len(data) // 2])
    cases.append(("truncated", folder, r"cannot read .*truncated"))
    folder, state = peft_dir(tmp_path, model, name="shape")
    state[A_KEY] = torch.randn(4, 31)
    rewrite(folder, state)
    cases.append(("shape", folder, rf"tensor '{A_KEY}' has shape \[4, 31\], expected"))
    folder, state = peft_dir(tmp_path, model, name="dtype")
    state[A_KEY] = torch.randint(0, 3, (4, 32), dtype=torch.int32)
    rewrite(folder, state)
    cases.append(("dtype", folder, rf"tensor '{A_KEY}' has dtype torch.int32"))
    folder, state = peft_dir(tmp_path, model, name="nan")
    state[A_KEY][0, 0] = float("nan")
    rewrite(folder, state)
    cases.append(("nan", folder, rf"tensor '{A_KEY}' holds non-finite"))
    folder, state = peft_dir(tmp_path, model, name="name")
    state["base_model.model.model.layers.1.self_attn.v_proj.weight"] = torch.randn(16, 32)
    rewrite(folder, state)
    cases.append(("name", folder, r"tensor '.*v_proj.weight' is not a LoRA A/B weight"))
    folder, state = peft_dir(tmp_path, model, name="unpaired")
    del state[A_KEY]
    rewrite(folder, state)
    cases.append(("unpaired", folder, r"v_proj.lora_B.weight' has no matching lora_A"))
    folder, _ = peft_dir(tmp_path, tiny_llama(layers=4), name="deeper_model")
    cases.append(("another model (more layers)", folder,
                  r"targets module 'model.layers.[23].self_attn.[qv]_proj', which is not one"))
    folder, _ = peft_dir(tmp_path, tiny_llama(hidden=64), name="wider_model")
    cases.append(("another model (wider)", folder, r"has shape \[4, 64\], expected \[r, in\]"))
    folder, _ = peft_dir(tmp_path, model, name="json")
    (folder / "adapter_config.json").write_text("{\"r\": 4, ")
    cases.append(("config not JSON", folder, r"adapter_config.json is not valid JSON"))
    folder, _ = peft_dir(tmp_path, model, name="no_alpha")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    cases.append(("config without lora_alpha", folder, r"config has no lora_alpha"))
    return cases


def test_bad_adapter_files_are_refused_naming_the_tensor_and_change_nothing(tmp_path):
    model = tiny_llama()
    manager = AdapterManager(model, max_rank=8, num_pages=64, page_size=1024)
    good, _ = peft_dir(tmp_path, model, name="good")
    manager.load("good", good)
    ids = torch.randint(2, 97, (1, 6))
    with manager.batch(["good"]), torch.no_grad():
        before = model(ids).logits
    stats = manager.stats()
    cases = adapter_cases(tmp_path, model)
    for what, folder, pattern in cases:
        for name in ("new", "good"):  # a new name, and replacing the loaded adapter
            with pytest.raises(ValueError, match=pattern):
                manager.load(name, folder, replace=name == "good")
            assert manager.adapters == ["good"], what
            assert manager.stats() == stats, what
    with manager.batch(["good"]), torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    assert len(cases) == 10
    manager.close()


def test_bad_predictor_files_are_refused_naming_the_tensor(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 24))
    good = tmp_path / "good.safetensors"
    sparse.train_predictors(model, ids, kind="factored", rank=4, progress=False).save(good)
    with safetensors.safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = sorted(tensors)[0]

    def variant(name, change=None, meta_change=None):
        t, m = dict(tensors), dict(meta)
        if change:
            change(t)
        if meta_change:
            meta_change(m)
        path = tmp_path / f"{name}.safetensors"
        safetensors.save_file(t, str(path), metadata=m)
        return path

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])
    cases = [
        (truncated, r"cannot read .*truncated"),
        (variant("shape", lambda t: t.update({key: torch.randn(3, 5)})),
         rf"tensor '{key}' has shape \[3, 5\]"),
        (variant("dtype", lambda t: t.update({key: t[key].to(torch.int32)})),
         rf"tensor '{key}' has dtype torch.int32"),
        (variant("missing", lambda t: t.pop(key)), rf"tensor '{key}' is missing"),
        (variant("extra", lambda t: t.update({"layers.0.extra": torch.zeros(2)})),
         r"tensor 'layers.0.extra' is not part of the predictor"),
        (variant("layer", lambda t: t.update({"layers.7.x": torch.zeros(2)})),
         r"tensor 'layers.7.x' is not one of the predictors of the model's 2 layers"),
        (variant("meta", meta_change=lambda m: m.pop("rank")), r"metadata is incomplete"),
        (variant("foreign", meta_change=lambda m: m.pop("fastllm_sparse_predictors")),
         r"holds no fastllm sparse predictors"),
    ]
    for path, pattern in cases:
        with pytest.raises(sparse.PredictorMismatchError, match=pattern):
            sparse.Predictors.load(path, model)
    with pytest.raises(sparse.PredictorMismatchError, match="another model"):
        sparse.Predictors.load(good, tiny_llama(hidden=64))
    sparse.Predictors.load(good, model)  # the good file still loads
