"""Markdown tables and a plot from bench/results/kv_retrieval_{dev,heldout}.json (written by
bench/kv_retrieval.py): retrieval per policy x task x length with the KV memory share, and
retrieval against memory.

    python bench/kv_retrieval_report.py    # prints the tables, writes kv_retrieval.png
"""

from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
POLICIES = ("full", "fastgen", "fastgen-paper", "snapkv", "adakv", "streaming", "h2o")
ABBREV = {"niah_number": "number", "niah_word": "word", "niah_uuid": "uuid",
          "multikey": "m-key", "multivalue": "m-value", "vartrack": "var", "cwe": "cwe"}


def load(split: str) -> dict:
    return json.loads((RESULTS / f"kv_retrieval_{split}.json").read_text())


def table(record: dict) -> str:
    s, mem = record["summary"], record["memory"]
    tasks = [t for t in ABBREV if t in s["full"]["aware"]]
    lengths = sorted({k for t in tasks for k in s["full"]["aware"][t] if k != "all"}, key=int)
    lines = []
    for length in lengths:
        head = ["policy", "KV mem"] + [ABBREV[t] for t in tasks] + ["all (aware)",
                                                                     "all (agnostic)", "mem agn."]
        lines += [f"**{length} tokens**", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for p in dict.fromkeys(POLICIES + tuple(record["configs"])):
            if p not in s:
                continue
            cells = [p, f"{100 * mem[p]['aware'][length]:.0f}%"]
            got = of = got_a = of_a = 0
            for t in tasks:
                c = s[p]["aware"][t][length]
                a = s[p]["agnostic"][t][length]
                cells.append(f"{c['retrieved']}/{c['of']}")
                got, of = got + c["retrieved"], of + c["of"]
                got_a, of_a = got_a + a["retrieved"], of_a + a["of"]
            cells += [f"{got}/{of}", f"{got_a}/{of_a}", f"{100 * mem[p]['agnostic'][length]:.0f}%"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if record.get("perplexity"):
        lines += ["| perplexity | KV mem | ppl | vs full |", "|---|---|---|---|"]
        for r in record["perplexity"]:
            lines.append(f"| {r['policy']} | {100 * r['mem']:.0f}% | {r['ppl']:.3f} | "
                         f"{100 * (r['ppl_rel'] - 1):+.1f}% |")
    return "\n".join(lines)


def plot(records: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5 * len(records), 3.8), squeeze=False)
    for ax, (split, record) in zip(axes[0], records.items()):
        rows = record["rows"]
        for mode, marker in (("aware", "o"), ("agnostic", "x")):
            for p in POLICIES:
                sel = [r for r in rows if r["policy"] == p and r["mode"] == mode]
                if not sel:
                    continue
                mem = 100 * sum(r["mem"] for r in sel) / len(sel)
                ret = 100 * sum(r["retrieved"] for r in sel) / len(sel)
                ax.scatter(mem, ret, marker=marker)
                ax.annotate(f"{p} ({mode[:3]})", (mem, ret), fontsize=6)
        ax.set_xlabel("KV memory at the prompt's end, % of full")
        ax.set_ylabel("cases retrieved, %")
        ax.set_title(f"{split}: {len({r['case'] for r in rows})} cases, SmolLM2-135M CPU",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "kv_retrieval.png", dpi=90)
    plt.close(fig)


def main() -> None:
    records = {}
    for split in ("dev", "heldout", "dev_variants", "heldout_variants"):
        path = RESULTS / f"kv_retrieval_{split}.json"
        if path.exists():
            r = load(split)
            if "variants" not in split:
                records[split] = r
            print(f"### {split} ({r['cases_done']} of {len(r['cases'])} cases, "
                  f"complete: {r['complete']}, load {r['loadavg_before'][0]:.1f})\n")
            print(table(r))
            print(f"\ntargets: {json.dumps(r['targets'])}\n")
    plot(records)


if __name__ == "__main__":
    main()
