"""Runs every bench_<capability>.py, appends results to bench/results/<machine>.json, draws one PNG
per capability and prints a table. Usage: python bench/run.py [--quick] [--only memory,lora]"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))

import harness  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and input sets")
    parser.add_argument("--only", default="", help="comma-separated capabilities to run")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if usable)")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR), help="results folder")
    args = parser.parse_args()

    import fastllm
    device = args.device or harness.default_device()
    out_dir = pathlib.Path(args.out)
    print(f"fastllm {fastllm.__version__} on {harness.machine_name(device)} ({device}), "
          f"torch {fastllm.build_info()['torch']}, commit {harness.git_commit()}", flush=True)
    print(f"ceilings measured now: copy {harness.copy_bandwidth_gbs(device):.1f} GB/s, "
          f"matmul {harness.matmul_tflops(device):.2f} TFLOP/s", flush=True)

    scripts = sorted(pathlib.Path(__file__).parent.glob("bench_*.py"))
    wanted = [name for name in args.only.split(",") if name]
    modules = [importlib.import_module(script.stem) for script in scripts]
    if wanted:
        # --only's order is the run's: a caller with a time limit (bench/gpu_check.sh) lists the
        # capabilities it wants first, and each one's records are saved as soon as it ends.
        modules = sorted((m for m in modules if m.CAPABILITY in wanted),
                         key=lambda m: wanted.index(m.CAPABILITY))
    records, failures = [], []
    for module in modules:
        script = pathlib.Path(module.__file__)
        print(f"== {module.CAPABILITY} ({script.name})", flush=True)
        # A bench that writes extra files (plots beyond the speedup bars) takes out_dir.
        extra = {"out_dir": out_dir} if "out_dir" in inspect.signature(module.run).parameters else {}
        new = module.run(device, quick=args.quick, **extra)
        records.extend(new)
        path = harness.save_results(new, device, out_dir)
        plot = harness.plot_speedups(new, module.CAPABILITY, device, out_dir)
        print(f"   wrote {path} and {plot}", flush=True)
        # A bench that carries on past a failing part lists it in FAILURES: its other records
        # are saved above, and the run still ends in failure.
        failures += [f"{module.CAPABILITY}: {line}" for line in getattr(module, "FAILURES", [])]
    print()
    print(harness.format_table(records))
    if failures:
        print("\nfailed:\n  " + "\n  ".join(failures), flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
