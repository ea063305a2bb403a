"""Writes the generated filler texts of the KV retrieval suite (bench/kv_retrieval.py):
technical prose, records (log lines and table rows) and source code, each from fixed-seed
templates, so the suite needs no download and the files can be rebuilt byte for byte:

    python bench/data/make_kv_fillers.py

The fourth kind, literary prose, is tests/data/tinyshakespeare_200k.txt (public domain). Every
word list and template below was written for this file; none of the text is copied from
anywhere. The generators never emit the suite's needle phrasings ("special magic", "VAR"), so a
filler cannot answer a question by accident.
"""

from __future__ import annotations

import pathlib
import random

HERE = pathlib.Path(__file__).resolve().parent
TARGET_CHARS = 60_000

COMPONENTS = ["scheduler", "allocator", "page table", "write-ahead log", "query planner",
              "compaction thread", "replication stream", "checkpoint writer", "block cache",
              "admission controller", "request router", "index builder", "garbage collector",
              "lock manager", "buffer pool", "metrics exporter", "retry queue", "shard map",
              "consensus module", "tokenizer service", "storage engine", "event loop"]
NOUNS = ["segment", "batch", "lease", "snapshot", "manifest", "epoch", "partition", "extent",
         "descriptor", "watermark", "transaction", "heartbeat", "cursor", "bucket", "frame",
         "record", "offset", "handle", "quota", "digest", "fence", "tombstone"]
VERBS = ["flushes", "validates", "reclaims", "replays", "pins", "splits", "merges", "retires",
         "publishes", "throttles", "rebalances", "serialises", "prefetches", "truncates",
         "compresses", "acknowledges", "schedules", "invalidates"]
ADJS = ["stale", "pending", "dirty", "immutable", "sealed", "orphaned", "hot", "cold",
        "partial", "durable", "volatile", "quiescent", "fragmented", "contiguous"]
CONDS = ["when the queue depth exceeds its limit", "after every checkpoint",
         "once the lease expires", "if a follower falls behind", "before the epoch advances",
         "while the node is draining", "whenever memory pressure rises",
         "at the end of each compaction round", "only under the recovery protocol",
         "if the checksum does not match"]
REASONS = ["so that readers never observe a torn write",
           "which bounds the time a restart spends replaying",
           "because the on-disk format cannot express a partial update",
           "to keep tail latency predictable under load",
           "since a second pass would double the write amplification",
           "so the operator can reason about a single source of truth",
           "which avoids a lock on the hot path",
           "to stay within the configured memory budget"]
TECH_TEMPLATES = [
    "The {c} {v} every {a} {n} {cond}, {why}.",
    "Each {n} carries a {n2} that the {c} checks before it {v} anything.",
    "A {a} {n} is never handed to the {c}; it first goes through the {c2}.",
    "In practice the {c} {v} about {k} {n}s per second on a single core.",
    "Operators can raise the limit on {a} {n}s, but the {c2} then {v} more often.",
    "If the {c} crashes, the {c2} {v} the last {n} and resumes from its {n2}.",
    "The design keeps one {n} per {n2}, {why}.",
    "Note that the {c} {v} {a} {n}s lazily: nothing happens until a reader asks.",
    "The default timeout is {k} milliseconds, {why}.",
    "Section {s} describes how the {c} and the {c2} agree on the current {n}.",
    "Unlike earlier versions, the {c} no longer {v} the {n2} {cond}.",
    "Tests cover the case where a {a} {n} meets a {a2} {n2}.",
]

SERVICES = ["auth", "billing", "search", "ingest", "render", "notify", "export", "gateway",
            "catalog", "ledger"]
LEVELS = ["INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"]
EVENTS = ["request served", "cache miss", "retry scheduled", "connection reset", "job queued",
          "job finished", "lease renewed", "slow query", "config reloaded", "shard moved"]
CITIES = ["Leeds", "Porto", "Graz", "Tampere", "Lyon", "Gdansk", "Bergen", "Utrecht", "Brno",
          "Aarhus", "Cork", "Turin"]
ITEMS = ["bolt", "hinge", "gasket", "bracket", "spindle", "valve", "washer", "sprocket",
         "flange", "coupler", "bearing", "rivet"]

IDENTS = ["total", "count", "items", "buffer", "offset", "result", "value", "index", "limit",
          "chunk", "weights", "queue", "parent", "node", "path", "name", "width", "height",
          "score", "state", "batch", "row", "column", "cursor"]
FUNCS = ["merge", "split", "load", "parse", "render", "update", "collect", "normalise", "encode",
         "decode", "flush", "resolve", "visit", "build", "check", "scan"]
CLASSES = ["Tree", "Queue", "Reader", "Writer", "Table", "Graph", "Window", "Parser", "Store",
           "Planner", "Buffer", "Codec"]


def technical(rng: random.Random) -> str:
    paras = []
    size = 0
    while size < TARGET_CHARS:
        sentences = []
        for _ in range(rng.randint(3, 6)):
            c, c2 = rng.sample(COMPONENTS, 2)
            n, n2 = rng.sample(NOUNS, 2)
            a, a2 = rng.sample(ADJS, 2)
            sentences.append(rng.choice(TECH_TEMPLATES).format(
                c=c, c2=c2, n=n, n2=n2, a=a, a2=a2, v=rng.choice(VERBS), cond=rng.choice(CONDS),
                why=rng.choice(REASONS), k=rng.choice([8, 16, 50, 120, 250, 400, 1000]),
                s=f"{rng.randint(2, 9)}.{rng.randint(1, 6)}"))
        text = " ".join(s[0].upper() + s[1:] for s in sentences)
        paras.append(text)
        size += len(text) + 2
    return "\n\n".join(paras) + "\n"


def records(rng: random.Random) -> str:
    lines = []
    size = 0
    day, second = 1, 0
    while size < TARGET_CHARS:
        kind = rng.random()
        second += rng.randint(1, 90)
        if second >= 86400:
            day, second = day + 1, second - 86400
        stamp = f"2031-04-{day:02d} {second // 3600:02d}:{second // 60 % 60:02d}:{second % 60:02d}"
        if kind < 0.55:
            line = (f"{stamp} {rng.choice(LEVELS)} {rng.choice(SERVICES)}-{rng.randint(1, 12)} "
                    f"{rng.choice(EVENTS)} id={rng.randint(10000, 99999)} "
                    f"latency={rng.randint(1, 900)}ms")
        elif kind < 0.85:
            line = (f"order {rng.randint(100, 999)}-{rng.randint(1000, 9999)}, "
                    f"{rng.choice(ITEMS)}, qty {rng.randint(1, 500)}, "
                    f"{rng.choice(CITIES)}, {rng.randint(1, 99)}.{rng.randint(0, 99):02d} EUR")
        else:
            line = (f"station {rng.choice(CITIES)}: temp {rng.randint(-9, 34)} C, wind "
                    f"{rng.randint(0, 60)} km/h, rain {rng.randint(0, 40)} mm")
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines) + "\n"


def code(rng: random.Random) -> str:
    blocks = []
    size = 0
    while size < TARGET_CHARS:
        if rng.random() < 0.25:
            cls = rng.choice(CLASSES)
            a, b = rng.sample(IDENTS, 2)
            block = (f"class {cls}{rng.randint(1, 99)}:\n"
                     f"    def __init__(self, {a}, {b}=None):\n"
                     f"        self.{a} = {a}\n"
                     f"        self.{b} = {b} or []\n\n"
                     f"    def __len__(self):\n"
                     f"        return len(self.{b})\n")
        else:
            name = f"{rng.choice(FUNCS)}_{rng.choice(IDENTS)}"
            a, b, c = rng.sample(IDENTS, 3)
            body = [f"def {name}({a}, {b}={rng.randint(0, 64)}):",
                    f'    """{rng.choice(FUNCS).capitalize()} the {a} up to {b}."""',
                    f"    {c} = []"]
            for _ in range(rng.randint(1, 3)):
                d = rng.choice(IDENTS)
                body += [f"    for {d} in range(len({a})):",
                         f"        if {a}[{d}] > {b}:",
                         f"            {c}.append({a}[{d}] - {rng.randint(1, 9)})",
                         "        else:",
                         f"            {c}.append({a}[{d}] * {rng.randint(2, 5)})"]
            body.append(f"    return {c}")
            block = "\n".join(body) + "\n"
        blocks.append(block)
        size += len(block) + 1
    return "\n\n".join(blocks)


def main() -> None:
    for name, make, seed in (("technical", technical, 101), ("records", records, 202),
                             ("code", code, 303)):
        (HERE / f"kv_filler_{name}.txt").write_text(make(random.Random(seed)))


if __name__ == "__main__":
    main()
