"""Static proof, on a machine without a GPU, that no CUDA implementation path synchronises the
host: every `*_cuda.cu` file and every project header it includes (transitively) is scanned for
calls that wait for the device. Such calls are allowed only inside a region

    // BEGIN host value checks
    if (... !host_checks_index_values(...)) return;   (the region's first statement)
    ...
    // END host value checks

which runs only for CPU tensors or in the debug mode (FASTLLM_CHECK_INDICES=1)."""

from __future__ import annotations

import pathlib
import re

import pytest

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

# What waits for the device when called on CUDA data from the host.
SYNC_PATTERNS = {
    "item": re.compile(r"\.item\s*[<(]"),
    "cpu": re.compile(r"\.cpu\s*\("),
    "tolist": re.compile(r"\.tolist\s*\("),
    "to host": re.compile(r"\.to\s*\(\s*(at|torch|c10)::kCPU"),
    "upload of host data": re.compile(r"\bat::tensor\s*\("),
    "to device": re.compile(r"\.to\s*\([^;]*device\s*\("),
    "stream sync": re.compile(r"cuda(Stream|Device|Event)Synchronize"),
    "blocking memcpy": re.compile(r"cudaMemcpy\s*\("),
    "data-dependent shape": re.compile(r"\b(masked_select|nonzero|unique)\s*\("),
    "host read of a device scalar": re.compile(r"\._local_scalar_dense|\blocal_scalar_dense\b"),
}
BEGIN, END = "// BEGIN host value checks", "// END host value checks"
INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"', re.M)


def _strip_comments(line: str) -> str:
    return line.split("//", 1)[0]


def sync_calls(text: str, name: str = "<text>") -> list[str]:
    """Lines of `text` that call something synchronising outside a guarded region, or regions
    whose first statement is not the guard."""
    found = []
    inside = False
    expect_guard = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            inside, expect_guard = True, True
            continue
        if stripped.startswith(END):
            inside = False
            continue
        code = _strip_comments(line).strip()
        if not code:
            continue
        if expect_guard:
            expect_guard = False
            if "host_checks_index_values(" not in code:
                found.append(f"{name}:{number}: a host-value-check region must start with "
                             f"host_checks_index_values(): {code}")
        if inside:
            continue
        for label, pattern in SYNC_PATTERNS.items():
            if pattern.search(code):
                found.append(f"{name}:{number}: {label}: {code}")
    if inside:
        found.append(f"{name}: '{BEGIN}' without '{END}'")
    return found


def cuda_path_files() -> list[pathlib.Path]:
    """Every .cu file and the project headers they reach through #include "..."."""
    todo = sorted(CSRC.glob("*/*_cuda.cu"))
    seen: dict[pathlib.Path, None] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for include in INCLUDE.findall(path.read_text()):
            header = CSRC / include
            if header.exists():
                todo.append(header)
    return sorted(seen)


def test_every_capability_has_a_cuda_file_scanned():
    files = cuda_path_files()
    folders = {p.parent.name for p in files if p.suffix == ".cu"}
    assert {"memory", "lora", "kv", "sparse", "galore"} <= folders
    assert CSRC / "common" / "checks.h" in files


@pytest.mark.parametrize("path", cuda_path_files(), ids=lambda p: str(p.relative_to(CSRC)))
def test_cuda_path_has_no_host_synchronisation(path):
    assert sync_calls(path.read_text(), str(path.relative_to(CSRC))) == []


# The scanner itself must be able to fail.
@pytest.mark.parametrize("snippet", [
    "const int64_t n = t.max().item<int64_t>();",
    "auto host = t.cpu();",
    "auto ids = t.to(at::kCPU, at::kLong);",
    "auto offsets = at::tensor(v, at::kLong).to(y.device());",
    "cudaStreamSynchronize(stream);",
    "auto live = idx.masked_select(mask);",
])
def test_scanner_finds_synchronising_calls(snippet):
    assert sync_calls(f"void f() {{\n  {snippet}\n}}\n")


def test_scanner_accepts_guarded_regions_only():
    guarded = f"{BEGIN}\nif (!host_checks_index_values(t)) return;\nauto h = t.cpu();\n{END}\n"
    assert sync_calls(guarded) == []
    unguarded = f"{BEGIN}\nauto h = t.cpu();\n{END}\n"
    assert sync_calls(unguarded)
    assert sync_calls(f"{BEGIN}\nif (!host_checks_index_values(t)) return;\n")  # unterminated
