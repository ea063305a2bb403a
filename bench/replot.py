"""Redraws the speedup bars of bench/results/<machine>.json without re-running anything: for each
capability, the records of the most recent run (latest date) in the file.
Usage: python bench/replot.py bench/results/cpu-amd-epyc-2c.json"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import harness  # noqa: E402


def main(path: str) -> None:
    results = pathlib.Path(path)
    rows = json.loads(results.read_text())
    fields = harness.Record.__dataclass_fields__
    for capability in sorted({r["capability"] for r in rows}):
        mine = [r for r in rows if r["capability"] == capability]
        latest = max(r["date"][:16] for r in mine)  # one run's records share a stamp
        run = [r for r in mine if r["date"][:16] == latest]
        records = [harness.Record(**{k: r[k] for k in fields}) for r in run]
        out = harness.plot_speedups(records, capability, run[0]["device"], results.parent,
                                    commit=run[0]["commit"])
        print(f"{out} ({len(records)} records of {run[0]['commit']}, {latest})")


if __name__ == "__main__":
    main(sys.argv[1])
