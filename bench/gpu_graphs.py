"""CUDA-graph capture of one decode step of each drop-in, compared with eager and timed
(bench/gpu_check.sh, stage `graphs`).

Drop-ins, each on a small random-weight Llama (transformers.LlamaForCausalLM):
  lora     a mixed batch of 8 sequences (3 adapters of ranks 4, 8, 16 and the base model) through
           AdapterManager.batch, with a transformers StaticCache
  sparse   SparseMLP in predictor mode (the default quantized predictors of
           fastllm.sparse.quantize_predictors: packed int4 gate+up, or int8 where d_model is not a
           multiple of 32; top-k path) at batch 1, with a StaticCache
  fastgen  FastGenCache (policy "fastgen") at batch 2, G's steps inside cache.graph_steps
Each also has a baseline: the same architecture without the drop-in, on a StaticCache, captured
and timed the same way, so a capture failure caused by transformers is told apart from ours.

How a drop-in is checked: two decode states are built alike (same weights, same prompt), E runs
eagerly and G is captured; both take the same warm-up steps, G's decode step is captured once with
torch.cuda.graph, then for each of --steps steps E runs eagerly, G's graph is replayed, and the
logits are compared (both then take E's greedy token). `replay_equal` is the first step's
verdict, `steps_equal` how many consecutive steps matched (a graph that bakes in host-side state
matches only the first). Then eager steps of E and replays of G are timed with CUDA events,
interleaved, median over repeats.

    python bench/gpu_graphs.py --out graphs.json            # GPU
    python bench/gpu_graphs.py --dry-run --out graphs.json  # CPU: no capture; E and G both step
                                                            # eagerly (checks the lockstep logic)

Every drop-in runs in its own try/except and the JSON is rewritten after each one; if a failure
leaves the CUDA context unusable, the remaining drop-ins run in fresh processes. Exit 0 when every
drop-in ran and every compared step (on a GPU: every replay of one capture) equalled eager.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import pathlib
import statistics
import subprocess
import sys
import time
import traceback

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402  (bench/harness.py: the benchmarks' timer)

SIZES = {
    # hidden a multiple of 64 (the int8 predictor's group), intermediate a multiple of 16
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "small": dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
}
LORA_NAMES = ["a", None, "b", "c", "a", "c", None, "b"]
LORA_RANKS = {"a": 4, "b": 8, "c": 16}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DROPINS = ("lora", "sparse", "fastgen")


class Options:
    def __init__(self, device="cpu", dtype=torch.float32, size="tiny", prompt_len=24,
                 max_new=160, seed=0):
        self.device, self.dtype, self.size = device, dtype, size
        self.prompt_len, self.max_new, self.seed = prompt_len, max_new, seed

    @property
    def vocab(self) -> int:
        return SIZES[self.size]["vocab_size"]


def llama(opts: Options, seed: int | None = None):
    import transformers
    torch.manual_seed(opts.seed if seed is None else seed)
    config = transformers.LlamaConfig(**SIZES[opts.size], max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(config).eval()
    return model.to(device=opts.device, dtype=opts.dtype)


def prompt(opts: Options, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(opts.seed + 1)
    return torch.randint(0, opts.vocab, (batch, opts.prompt_len), generator=generator).to(
        opts.device)


class TinyTokenizer:
    """What FastGenCache reads from a tokenizer: its length, the special ids, each id's text
    (some ids decode to punctuation, so every token class occurs)."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.all_special_ids = [0, 1, 2]

    def __len__(self) -> int:
        return self.vocab

    def batch_decode(self, ids):
        return ["." if i[0] % 11 == 5 else f" w{i[0]}" for i in ids]


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class StaticDecode:
    """Greedy decode on a transformers StaticCache. The step advances its own position tensor,
    so a captured step replays correctly step after step."""

    def __init__(self, model, batch: int, opts: Options):
        from transformers import StaticCache

        from fastllm.kv import cache_keyword
        self.model = model
        self.cache_keyword = cache_keyword(model)
        self.cache = StaticCache(config=model.config, max_cache_len=opts.prompt_len + opts.max_new)
        # transformers < 5.2x wants cache_position (else it derives it from the cache, a sync);
        # later versions take positions from position_ids and the cache's own device counter.
        self.with_cache_position = _accepts(model.model.forward, "cache_position")
        ids = prompt(opts, batch)
        positions = torch.arange(opts.prompt_len, device=opts.device)
        with torch.no_grad():
            logits = model(ids, **self._kwargs(positions)).logits[:, -1]
        self.ids = logits.argmax(-1, keepdim=True)
        self.pos = torch.full((1,), opts.prompt_len, dtype=torch.long, device=opts.device)

    def _kwargs(self, positions):
        kw = {self.cache_keyword: self.cache, "use_cache": True,
              "position_ids": positions.view(1, -1)}
        if self.with_cache_position:
            kw["cache_position"] = positions
        return kw

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            logits = self.model(self.ids, **self._kwargs(self.pos)).logits[:, -1]
        self.pos.add_(1)
        return logits

    def feed(self, tokens: torch.Tensor) -> None:
        self.ids.copy_(tokens)


class FastGenDecode:
    """Greedy decode on a FastGenCache, called the way its users call it: eagerly, or (after
    `before_capture`) inside `cache.graph_steps`, with the positions in a device tensor the step
    advances, as a captured step must."""

    def __init__(self, model, tokenizer, batch: int, opts: Options):
        from fastllm.kv import FastGenCache, cache_keyword
        self.model = model
        self.max_new = opts.max_new
        self.cache = FastGenCache(model, tokenizer, policy="fastgen", recovery=0.9, page_rows=16,
                                  max_tokens=batch * (opts.prompt_len + opts.max_new) + 64)
        self.kw = {cache_keyword(model): self.cache, "use_cache": True}
        self.positions = None  # eager: transformers derives them from the cache
        self.graph_steps = contextlib.ExitStack()
        with torch.no_grad():
            logits = model(prompt(opts, batch), **self.kw).logits[:, -1]
        self.ids = logits.argmax(-1, keepdim=True)

    def before_capture(self) -> None:
        """Every later step runs inside graph_steps (its reservation covers all of them)."""
        self.positions = torch.full((1, 1), self.cache.get_seq_length(), dtype=torch.long,
                                    device=self.ids.device)
        self.graph_steps.enter_context(self.cache.graph_steps(self.max_new))

    def run(self) -> torch.Tensor:
        kw = self.kw if self.positions is None else {**self.kw, "position_ids": self.positions}
        with torch.no_grad():
            logits = self.model(self.ids, **kw).logits[:, -1]
        if self.positions is not None:
            self.positions.add_(1)
        return logits

    def feed(self, tokens: torch.Tensor) -> None:
        self.ids.copy_(tokens)

    def finish(self) -> None:
        """Leave graph_steps: raises if more steps ran than it reserved."""
        self.graph_steps.close()


def random_adapter(model, rank: int, seed: int, scale: float = 0.05) -> dict:
    """A PEFT-format state dict with random A and B for every target linear."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LORA_TARGETS:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(
                rank, module.in_features, generator=generator) * scale
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(
                module.out_features, rank, generator=generator) * scale
    return state


# ---- the drop-ins: each returns (make_state, batch); `stack` holds what must stay open ----------

def build_lora(opts: Options, stack: contextlib.ExitStack):
    from fastllm.lora import AdapterManager
    model = llama(opts)
    adapters = {name: random_adapter(model, rank, opts.seed + 10 + i)
                for i, (name, rank) in enumerate(LORA_RANKS.items())}
    manager = AdapterManager(model, max_rank=max(LORA_RANKS.values()), num_pages=256,
                             page_size=16384)
    stack.callback(manager.close)
    for name, state in adapters.items():
        rank = LORA_RANKS[name]
        manager.load(name, state, {"r": rank, "lora_alpha": 2 * rank})
    stack.enter_context(manager.batch(LORA_NAMES))
    return (lambda: StaticDecode(model, len(LORA_NAMES), opts)), len(LORA_NAMES)


def build_sparse(opts: Options, stack: contextlib.ExitStack):
    import fastllm.sparse as sparse
    model = llama(opts)
    predictors = sparse.quantize_predictors(model, progress=False)
    sparse.sparsify(model, 0.5, mode="predictor", predictors=predictors)
    return (lambda: StaticDecode(model, 1, opts)), 1


def build_fastgen(opts: Options, stack: contextlib.ExitStack):
    model = llama(opts)
    tokenizer = TinyTokenizer(opts.vocab)
    states = []

    def make():
        state = FastGenDecode(model, tokenizer, 2, opts)
        states.append(state)
        return state

    stack.callback(lambda: [s.cache.release() for s in states])
    return make, 2


BUILDERS = {"lora": build_lora, "sparse": build_sparse, "fastgen": build_fastgen}


def build_baseline(opts: Options, batch: int):
    model = llama(opts)
    return lambda: StaticDecode(model, batch, opts)


# ---- capture, compare, time ----------------------------------------------------------------------

def compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    # Same kernels on the same inputs: equal up to the order of atomic additions.
    tol = 1e-2 if torch.float16 in (got.dtype, want.dtype) or torch.bfloat16 in (
        got.dtype, want.dtype) else 1e-5
    bitwise = bool(torch.equal(got, want))
    got, want = got.float(), want.float()
    finite = bool(torch.isfinite(want).all()) and bool(torch.isfinite(got).all())
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    return {"equal": finite and diff <= tol * scale, "bitwise": bitwise, "max_abs_diff": diff}


def _sample_ms(fn, device: str, inner: int) -> float:
    # The benchmark harness's timer (CUDA events on a GPU), in milliseconds.
    return harness._time_once(fn, device, inner) * 1e3


def time_interleaved(fns: dict, device: str, inner: int, repeats: int) -> dict:
    """Median ms per call of each function, sampled in alternation (A B A B ...)."""
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(_sample_ms(fn, device, inner))
    return {name: statistics.median(values) for name, values in samples.items()}


def check_states(make_state, device: str, steps: int, warmup: int, capture: bool,
                 inner: int, repeats: int) -> dict:
    """Lockstep E (eager) and G (graph) decode states: see the module docstring. A state with a
    `before_capture` (FastGenCache) switches G to its capturable steps before the warm-up, on
    the CPU too (so a dry run checks them against eager), and its `finish` ends them."""
    result = {"captured": None, "replay_equal": None, "steps_equal": 0, "steps": []}
    eager, graphed = make_state(), make_state()
    first = compare(graphed.ids, eager.ids)
    if not first["equal"]:
        raise RuntimeError("the two decode states disagree after prefill: the check itself is "
                           "not deterministic here")
    if hasattr(graphed, "before_capture"):
        graphed.before_capture()
    side = torch.cuda.Stream() if capture else None
    for _ in range(warmup):
        want = eager.run()
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                graphed.run()
            torch.cuda.current_stream().wait_stream(side)
        else:
            graphed.run()
        token = want.argmax(-1, keepdim=True)
        eager.feed(token)
        graphed.feed(token)
    graph = None
    if capture:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = graphed.run()
        except Exception as error:  # noqa: BLE001 - the reason is the result
            result["captured"] = False
            result["capture_error"] = f"{type(error).__name__}: {error}"[:2000]
            context = error.__context__ or error.__cause__
            if context is not None:
                result["capture_error_cause"] = f"{type(context).__name__}: {context}"[:2000]
            result["capture_error_where"] = where(context or error)
            try:  # the eager step time is still worth having, if the context survived
                result["eager_ms"] = round(time_interleaved({"eager": eager.run}, device, inner,
                                                            repeats)["eager"], 4)
            except Exception as later:  # noqa: BLE001
                result["eager_error"] = f"{type(later).__name__}: {later}"[:500]
            return result
        result["captured"] = True
    consecutive = True
    for _ in range(steps):
        want = eager.run()
        if graph is not None:
            graph.replay()
            got = static_out.clone()
        else:
            got = graphed.run()
        verdict = compare(got, want)
        result["steps"].append(verdict)
        consecutive = consecutive and verdict["equal"]
        result["steps_equal"] += int(consecutive)
        token = want.argmax(-1, keepdim=True)
        eager.feed(token)
        graphed.feed(token)
    result["replay_equal"] = result["steps"][0]["equal"] if result["steps"] else None
    result["max_abs_diff"] = result["steps"][0]["max_abs_diff"] if result["steps"] else None
    if device == "cuda":
        torch.cuda.synchronize()
    fns = {"eager": eager.run}
    if graph is not None:
        fns["graph"] = graph.replay
    times = time_interleaved(fns, device, inner, repeats)
    result["eager_ms"] = round(times["eager"], 4)
    if "graph" in times:
        result["graph_ms"] = round(times["graph"], 4)
        result["speedup"] = round(times["eager"] / times["graph"], 2) if times["graph"] else None
    if hasattr(graphed, "finish"):
        try:
            graphed.finish()
        except Exception as error:  # noqa: BLE001 - the reason is the result
            result["finish_error"] = f"{type(error).__name__}: {error}"[:2000]
    return result


def where(error: BaseException) -> list[str]:
    """The innermost frames of an error's traceback in fastllm or transformers (what synced)."""
    frames = traceback.extract_tb(error.__traceback__) if error.__traceback__ else []
    ours = []
    for f in frames:
        parts = pathlib.Path(f.filename).parts
        for anchor in ("fastllm", "transformers"):
            if anchor in parts:
                short = "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
                ours.append(f"{short}:{f.lineno} {f.name}: {(f.line or '').strip()}")
                break
    return ours[-6:]


def cuda_healthy() -> bool:
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
        return True
    except Exception:  # noqa: BLE001
        return False


def index_errors(device: str):
    """What the kernels reported through fastllm's device error word (None when nothing)."""
    import fastllm.ops as ops
    if not hasattr(ops, "raise_index_errors"):
        return "fastllm.ops.raise_index_errors is missing"
    try:
        ops.raise_index_errors(device)
        return None
    except IndexError as error:
        return str(error)


def run_dropin(name: str, opts: Options, args) -> dict:
    """One drop-in and (unless --no-baseline) its baseline."""
    capture = opts.device == "cuda"
    start = time.perf_counter()
    result = {}
    with contextlib.ExitStack() as stack:
        make_state, batch = BUILDERS[name](opts, stack)
        result.update(batch=batch, **check_states(make_state, opts.device, args.steps,
                                                  args.warmup, capture, args.inner,
                                                  args.repeats))
        if capture:
            result["index_errors"] = index_errors(opts.device)
    if not args.no_baseline:
        try:
            result["baseline"] = check_states(build_baseline(opts, batch), opts.device,
                                              args.steps, args.warmup, capture, args.inner,
                                              args.repeats)
            result["baseline"].pop("steps", None)
        except Exception as error:  # noqa: BLE001 - the baseline is context, not the result
            result["baseline"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    # Every compared step equal (on a GPU: every replay of the one capture).
    result["ok"] = "finish_error" not in result and result.get("steps_equal") == args.steps \
        and (bool(result.get("captured")) or not capture)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def environment(opts: Options, dry: bool) -> dict:
    info = {"device": opts.device, "dtype": str(opts.dtype).replace("torch.", ""),
            "size": opts.size, "config": SIZES[opts.size], "torch": torch.__version__,
            "dry_run": dry}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if opts.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_isolated(name: str, argv: list[str], out: pathlib.Path) -> dict:
    """One drop-in in a fresh process (after an earlier one broke the CUDA context)."""
    tmp = out.with_name(out.name + f".{name}.json")
    cmd = [sys.executable, __file__, *argv, "--only", name, "--out", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    data = None
    try:
        data = json.loads(tmp.read_text())["dropins"][name]
        tmp.unlink()
    except (OSError, ValueError, KeyError):
        pass
    if data is None:
        data = {"ok": False, "error": f"isolated run failed (exit {proc.returncode}): "
                                      f"{(proc.stderr or proc.stdout)[-1500:]}"}
    data["isolated"] = True
    return data


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="graphs.json")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny model, float32: build and step eagerly, no capture")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--size", default=None, choices=sorted(SIZES),
                        help="default small on CUDA, tiny otherwise")
    parser.add_argument("--only", default="", help=f"comma-separated among {DROPINS}")
    parser.add_argument("--steps", type=int, default=None,
                        help="replays compared with eager (default 3; 2 in a dry run)")
    parser.add_argument("--warmup", type=int, default=None, help="default 2; 1 in a dry run")
    parser.add_argument("--inner", type=int, default=None, help="steps per timing sample")
    parser.add_argument("--repeats", type=int, default=None, help="timing samples")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baselines (implied by --dry-run: they run the same code "
                             "as the LoRA and SparseMLP states)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.no_baseline = True
    return args


def options(args) -> Options:
    device = args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device == "cuda" else "float32"))
    size = args.size or ("small" if device == "cuda" else "tiny")
    gpu = device == "cuda"
    for name, on_gpu, otherwise in (("steps", 3, 2), ("warmup", 2, 1), ("inner", 10, 1),
                                    ("repeats", 5, 1)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else otherwise)
    prompt_len = 48 if size != "tiny" else 24
    return Options(device=device, dtype=dtype, size=size, prompt_len=prompt_len,
                   max_new=args.warmup + args.steps + 2 * args.inner * args.repeats + 8)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    opts = options(args)
    names = [n for n in (args.only.split(",") if args.only else DROPINS) if n]
    unknown = set(names) - set(DROPINS)
    if unknown:
        raise SystemExit(f"gpu_graphs: unknown drop-in(s) {sorted(unknown)}; known: {DROPINS}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {**environment(opts, args.dry_run), "dropins": {}}
    # The arguments a fresh process needs to repeat this run for one drop-in.
    passthrough = ["--device", opts.device, "--dtype", str(opts.dtype).replace("torch.", ""),
                   "--size", opts.size, "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--inner", str(args.inner), "--repeats", str(args.repeats)] + (
                       ["--no-baseline"] if args.no_baseline else [])
    broken = False
    for name in names:
        print(f"== {name}", flush=True)
        if broken:
            result = run_isolated(name, passthrough, out)
        else:
            try:
                result = run_dropin(name, opts, args)
            except Exception as error:  # noqa: BLE001 - one drop-in's failure hides no other
                result = {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000],
                          "traceback": traceback.format_exc()[-4000:]}
            if opts.device == "cuda" and not cuda_healthy():
                broken = True
                result["note"] = "the CUDA context is unusable after this drop-in"
        report["dropins"][name] = result
        out.write_text(json.dumps(report, indent=1) + "\n")
        brief = {k: result.get(k) for k in ("ok", "captured", "replay_equal", "steps_equal",
                                            "max_abs_diff", "eager_ms", "graph_ms", "speedup",
                                            "error", "capture_error") if k in result}
        print(f"   {json.dumps(brief)}", flush=True)
        base = result.get("baseline") or {}
        if base:
            print(f"   baseline: {json.dumps({k: v for k, v in base.items() if k != 'steps'})}",
                  flush=True)
    return 0 if all(r.get("ok") for r in report["dropins"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
