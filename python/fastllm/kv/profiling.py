"""``fastllm.kv.profile``: FastGen's per-head policy choice for a text, without keeping a cache.

(Named ``profiling`` so that the module does not shadow the function ``fastllm.kv.profile``.)

``profile`` returns a :class:`Profile`: one frozen :class:`HeadChoice` per (layer, KV head),
with ``by_layer``, ``counts()``, ``summary()`` (a table, also what ``print`` shows) and
``to_dicts()``. Earlier versions returned the nested list ``[layer][kv head] ->
{"policy", "kept"}``; ``to_dicts()`` returns exactly that, and indexing a result the old way
(``result[layer][head]["policy"]``) still works with a ``DeprecationWarning``.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass

import torch

from .._progress import Progress, check_progress
from .cache import FastGenCache, cache_keyword


@dataclass(frozen=True)
class HeadChoice:
    """What FastGen chose for one KV head of one layer at the end of the prompt.

    Attributes:
        layer: the model layer.
        kv_head: the KV head within the layer.
        policy: the policy's name: one of ``fastllm.kv.FASTGEN_POLICIES`` (policy ``"fastgen"``)
            or the fixed policy's (``"full"``, ``"streaming"``, ``"h2o"``, ``"snapkv"``).
        kept: entries (tokens) the head keeps of the prompt.
        tokens: the prompt's tokens (what a full cache keeps).
        sinks, window, heavy: the policy's first tokens always kept, its recent window and its
            heavy-hitter slots (0 where the policy has none).
        grows: whether the head keeps every generated token (policy ``"full"``, SnapKV).

    Usually read from :func:`profile`'s result (``result[3][0]``: layer 3, KV head 0):

    >>> choice = fastllm.kv.HeadChoice(layer=3, kv_head=0, policy="special+punct+local",
    ...                                kept=24, tokens=96, window=20)
    >>> choice.kept_share, choice.to_dict()
    (0.25, {'policy': 'special+punct+local', 'kept': 24})
    """

    layer: int
    kv_head: int
    policy: str
    kept: int
    tokens: int
    sinks: int = 0
    window: int = 0
    heavy: int = 0
    grows: bool = False

    @property
    def kept_share(self) -> float:
        """``kept / tokens``: the share of the prompt this head keeps."""
        return self.kept / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        """The old form: ``{"policy": ..., "kept": ...}``."""
        return {"policy": self.policy, "kept": self.kept}

    def __getitem__(self, key: str):
        # The result used to be a dict per head; keep ``choice["policy"]`` working for a while.
        if key not in ("policy", "kept"):
            raise KeyError(key)
        warnings.warn("fastllm.kv.profile now returns HeadChoice objects: use choice."
                      f"{key} (or Profile.to_dicts() for the old nested dicts)",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, key)


class Profile:
    """FastGen's choice for every (layer, KV head) of a prompt, from :func:`profile`.

    Iterating, ``len()`` and indexing go over the layers (``result[layer][kv_head]`` is a
    :class:`HeadChoice`), as on the nested list ``profile`` used to return.

    Attributes:
        heads: every :class:`HeadChoice`, layer by layer, KV head by KV head.
        tokens: the prompt's tokens.
        profile_seconds: the host time the profiling took (``FastGenCache.stats()``'s).

    Usually made by :func:`profile`; here by hand, one layer of two KV heads:

    >>> heads = [fastllm.kv.HeadChoice(0, 0, "full", 40, 40, grows=True),
    ...          fastllm.kv.HeadChoice(0, 1, "special+punct", 10, 40)]
    >>> result = fastllm.kv.Profile(heads, tokens=40)
    >>> result.kept_share, result.counts()
    (0.625, {'full': 1, 'special+punct': 1})
    >>> result[0][1].policy, result.to_dicts()[0][1]
    ('special+punct', {'policy': 'special+punct', 'kept': 10})
    >>> print(result)
    KV-head profile of 40 tokens: 1 layers x 2 KV heads, 62.5% of a full cache kept
    layer  head 0               head 1
        0  full           100%  special+punct   25%
    heads per policy: full 1, special+punct 1
    """

    def __init__(self, heads, tokens: int, profile_seconds: float = 0.0):
        self.heads: tuple[HeadChoice, ...] = tuple(heads)
        self.tokens = tokens
        self.profile_seconds = profile_seconds
        layers: dict[int, list[HeadChoice]] = collections.defaultdict(list)
        for choice in self.heads:
            layers[choice.layer].append(choice)
        self._by_layer = tuple(tuple(layers[i]) for i in range(len(layers)))

    @property
    def by_layer(self) -> tuple[tuple[HeadChoice, ...], ...]:
        """``[layer][kv_head] -> HeadChoice``."""
        return self._by_layer

    @property
    def num_layers(self) -> int:
        return len(self._by_layer)

    @property
    def kept_share(self) -> float:
        """Entries kept over all heads as a share of a full cache of the prompt."""
        full = self.tokens * len(self.heads)
        return sum(c.kept for c in self.heads) / full if full else 0.0

    def counts(self) -> dict[str, int]:
        """How many (layer, KV head) pairs took each policy, most common first."""
        return dict(collections.Counter(c.policy for c in self.heads).most_common())

    def to_dicts(self) -> list[list[dict]]:
        """The nested list ``profile`` returned before: ``[layer][kv head] -> {policy, kept}``."""
        return [[c.to_dict() for c in layer] for layer in self._by_layer]

    def summary(self) -> str:
        """A table: per layer, each KV head's policy and kept share, then the counts."""
        width = max((len(c.policy) for c in self.heads), default=6)
        heads = len(self._by_layer[0]) if self._by_layer else 0
        lines = [f"KV-head profile of {self.tokens} tokens: {self.num_layers} layers x {heads} "
                 f"KV heads, {self.kept_share:.1%} of a full cache kept"]
        header = "  ".join(f"{'head ' + str(h):<{width + 6}}" for h in range(heads))
        lines.append(("layer  " + header).rstrip())
        for i, layer in enumerate(self._by_layer):
            cells = [f"{c.policy:<{width}} {c.kept_share:>5.0%}" for c in layer]
            lines.append(f"{i:>5}  " + "  ".join(cells))
        lines.append("heads per policy: " + ", ".join(f"{p} {n}" for p, n in self.counts().items()))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return (f"Profile(tokens={self.tokens}, layers={self.num_layers}, "
                f"heads={len(self.heads)}, kept_share={self.kept_share:.3f}, "
                f"counts={self.counts()})")

    def __len__(self) -> int:
        return len(self._by_layer)

    def __getitem__(self, layer):
        return self._by_layer[layer]

    def __iter__(self):
        return iter(self._by_layer)


def profile(model, tokenizer, text: str, *, progress: bool | None = None, **kwargs) -> Profile:
    """FastGen's per-head policy choice for ``text``, as a :class:`Profile`.

    Runs one prefill with a :class:`FastGenCache` (``kwargs`` go to it: ``recovery``,
    ``policy``, ...) and releases its pages before returning; the model's attention
    implementation stays ``"fastllm_kv"`` afterwards (other caches still work through SDPA).

    Args:
        model: a Llama-family transformers model.
        tokenizer: its tokenizer; ``tokenizer(text, return_tensors="pt").input_ids`` must give
            the prompt's ``[1, L]`` ids.
        text: the prompt, a non-empty string.
        progress: show a progress bar over the layers (on stderr; tqdm's if installed): True,
            False, or None (default) for only when stderr is a terminal.

    Returns a :class:`Profile`; ``.to_dicts()`` gives the nested ``[layer][kv head] ->
    {"policy", "kept"}`` list earlier versions returned.

    Example:
        With a real model: ``print(fastllm.kv.profile(model, tokenizer, text))``. Here a tiny
        random Llama:

        >>> import types, transformers
        >>> _ = torch.manual_seed(0)
        >>> model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        ...     vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...     num_attention_heads=4, num_key_value_heads=2)).eval()
        >>> class Tokenizer:           # stands in for the model's: text to ids, and which ids
        ...     all_special_ids = [0]  # are special tokens or decode to punctuation
        ...     def __len__(self):
        ...         return 64
        ...     def __call__(self, text, return_tensors=None):
        ...         ids = torch.tensor([[1 + ord(c) % 63 for c in text]])
        ...         return types.SimpleNamespace(input_ids=ids)
        ...     def batch_decode(self, ids):
        ...         return ["." if i[0] % 8 == 0 else f" w{i[0]}" for i in ids]
        >>> text = "Heads pick what to keep: specials, punctuation, a window, heavy hitters."
        >>> result = fastllm.kv.profile(model, Tokenizer(), text, recovery=0.5, progress=False)
        >>> result.tokens == len(text), result.num_layers, len(result[0])
        (True, 2, 2)
        >>> sum(result.counts().values())                     # one choice per (layer, KV head)
        4
        >>> all(c.policy in fastllm.kv.FASTGEN_POLICIES for c in result.heads)
        True
    """
    show = check_progress(progress, "fastllm.kv.profile")
    if not isinstance(text, str) or not text:
        raise ValueError(f"fastllm.kv.profile: text must be a non-empty str, got {text!r:.60}")
    cache = FastGenCache(model, tokenizer, **kwargs)
    handles = []
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids.to(next(model.parameters()).device)
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise ValueError(f"fastllm.kv.profile: the tokenizer gave ids of shape "
                             f"{tuple(ids.shape)} for the text; expected [1, L] with L >= 1")
        with Progress(cache.num_layers, "profiling KV heads", show, unit="layer") as bar:
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
            for block in getattr(decoder, "layers", None) or []:
                handles.append(block.register_forward_hook(lambda *_: bar.update()))
            with torch.no_grad():
                model(ids, **{cache_keyword(model): cache}, use_cache=True)
        stats = cache.stats()
        tokens = int(ids.shape[1])
        heads = []
        for layer_idx, layer in enumerate(cache.layers):
            for h, (policy, row) in enumerate(zip(layer.heads.policies,
                                                  stats["policies"][layer_idx])):
                heads.append(HeadChoice(layer_idx, h, row["policy"], row["kept"], tokens,
                                        sinks=policy.sinks, window=policy.window,
                                        heavy=policy.heavy, grows=policy.grow))
        return Profile(heads, tokens, stats["profile_seconds"])
    finally:
        for handle in handles:
            handle.remove()
        cache.release()
        cache._hook.remove()
