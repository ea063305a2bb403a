#!/usr/bin/env bash
# Everything a GPU machine should check, in one command, in under 8 minutes from a fresh machine:
# build for this GPU only, the CUDA tests, compute-sanitizer memcheck and racecheck over
# bench/sanitize_cases.py, CUDA-graph capture of each drop-in's decode step, host syncs per decode
# step and per op, and the quick benchmarks; each stage under its own time limit, going on past a
# stage that fails. The logic is bench/gpu_check.py (its docstring lists the stages and limits).
#
#   usage: bash bench/gpu_check.sh [--dry-run] [OUT_DIR]
#     OUT_DIR: $OUT when set, else the argument, else bench/results/gpu-check. At most 8 files are
#     written there (an archive of every log and JSON result, summary.json, summary.txt).
#     --dry-run (automatic where torch sees no GPU): every stage in a mode that needs no GPU, so a
#     script bug shows up here rather than in the first GPU minutes (tests/test_gpu_check.py).
#   PYTHON=... picks the interpreter (default python3: the one whose torch builds and runs it).
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
