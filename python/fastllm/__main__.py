"""`python -m fastllm [--json]`: what this installation was built with, which kernels will run on
this machine (CPU vector path, visible GPUs) and which optional packages are present."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import platform

import torch

import fastllm

# Packages some capabilities need; reported by version, never imported (transformers takes seconds).
OPTIONAL_PACKAGES = ("transformers", "peft", "safetensors", "gguf", "accelerate")


def _cpu_flags() -> set[str]:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_paths() -> dict:
    """The CPU kernels' vector paths on this machine. The vector loops are compiled as GCC
    target_clones (avx512f, avx2, default) and the loader takes the widest the CPU supports; the
    int8 neuron scores and fp16 KV rows have AVX2+FMA (and F16C) paths picked at run time. Read
    from /proc/cpuinfo, so "unknown" where that does not exist."""
    flags = _cpu_flags()
    if not flags:
        return {"model": _cpu_model(), "vector_path": "unknown", "int8_scores": "unknown",
                "fp16_kv_rows": "unknown"}
    avx2_fma = {"avx2", "fma"} <= flags
    return {
        "model": _cpu_model(),
        "vector_path": "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "default",
        "int8_scores": "avx2+fma" if avx2_fma else "scalar",
        "fp16_kv_rows": "f16c" if avx2_fma and "f16c" in flags else "scalar",
    }


def report() -> dict:
    info = fastllm.build_info()
    gpus = []
    if info["cuda"] and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"device": f"cuda:{index}", "name": props.name,
                         "capability": f"sm_{props.major}{props.minor}",
                         "memory_GiB": round(props.total_memory / 2**30, 1)})
    packages = {}
    for name in OPTIONAL_PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            packages[name] = None
    ops = sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("fastllm::"))
    return {**info, "torch_running": torch.__version__, "gpus": gpus,
            "kernels": "CUDA and CPU" if gpus else "CPU", "cpu": cpu_paths(),
            "packages": packages, "ops": ops}


def _print(r: dict) -> None:
    print(f"fastllm {r['version']}")
    print(f"  built against torch {r['torch']} (running torch {r['torch_running']})")
    if r["cuda"]:
        print(f"  CUDA kernels: yes (CUDA {r['cuda_version']}, archs {r['cuda_archs']})")
    else:
        print("  CUDA kernels: no (CPU-only build)")
    print(f"  GPUs visible: {len(r['gpus'])}")
    for gpu in r["gpus"]:
        print(f"    {gpu['device']} {gpu['name']}, {gpu['capability']}, {gpu['memory_GiB']} GiB")
    if not r["gpus"]:
        why = "no GPU visible" if r["cuda"] else "CPU-only build"
        print(f"  kernels that will run: CPU ({why}; CPU tensors always use the CPU kernels)")
    else:
        print("  kernels that will run: CUDA for CUDA tensors, CPU for CPU tensors")
    cpu = r["cpu"]
    print(f"  CPU: {cpu['model']}; vector path {cpu['vector_path']}, int8 scores "
          f"{cpu['int8_scores']}, fp16 KV rows {cpu['fp16_kv_rows']}")
    present = ", ".join(f"{k} {v}" if v else f"{k} (absent)" for k, v in r["packages"].items())
    print(f"  optional packages: {present}")
    if r["packages"]["transformers"] is None:
        print("    fastllm.kv needs transformers: pip install transformers (the 'hf' extra)")
    print(f"  ops ({len(r['ops'])}): {', '.join(r['ops'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fastllm",
        description="What this fastllm was built with, which kernels run on this machine, and "
                    "which optional packages are installed.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    r = report()
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print(r)


if __name__ == "__main__":
    main()
