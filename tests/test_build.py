"""The build: what it reports, that CUDA is compiled whenever it can be, and how it refuses."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import fastllm
import fastllm.ops

REPO = pathlib.Path(__file__).resolve().parents[1]
ALL_OPS = sorted(fastllm.ops.OPS)
# Registered but not a kernel: the CUDA index-error word (fastllm.ops.index_error_word).
INFRASTRUCTURE_OPS = ["index_error_word"]


def registered_ops() -> list[str]:
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fastllm::"))


def test_build_info_describes_this_build():
    info = fastllm.build_info()
    assert set(info) == {"version", "torch", "cuda", "cuda_version", "cuda_archs"}
    assert info["version"] == fastllm.__version__
    assert info["torch"] == torch.__version__
    if info["cuda"]:
        assert info["cuda_version"].split(".")[0].isdigit()
        assert info["cuda_archs"]
    else:
        assert info["cuda_version"] == "" and info["cuda_archs"] == ""


def test_cuda_kernels_are_built_whenever_a_cuda_compiler_is_present():
    # CI must compile the CUDA sources whenever it can; a build that silently fell back to
    # CPU-only would hide CUDA compile errors.
    can_build_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if os.environ.get("FASTLLM_CUDA", "AUTO").upper() == "OFF" or not can_build_cuda:
        pytest.skip("this environment cannot or may not build CUDA kernels")
    assert fastllm.build_info()["cuda"], "nvcc and a CUDA torch are present but no CUDA kernels"


def test_every_python_op_is_registered_with_the_right_kernels():
    assert registered_ops() == sorted(ALL_OPS + INFRASTRUCTURE_OPS)
    assert sorted(fastllm.ops.__all__) == sorted(fastllm.ops.OPS + fastllm.ops.HELPERS)
    for name in ALL_OPS:
        qualified = f"fastllm::{name}"
        has = lambda key: torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key)  # noqa: E731
        if has("CompositeExplicitAutograd"):
            # Composed of ATen ops (e.g. a projection matmul): one kernel serves every device.
            assert not has("CPU") and not has("CUDA"), name
            continue
        assert has("CPU"), name
        assert has("CUDA") == fastllm.build_info()["cuda"], name
        assert getattr(fastllm.ops, name).__doc__, f"{name} has no docstring"


def test_every_op_has_a_reference():
    import fastllm._reference as reference
    for name in ALL_OPS:
        # An in-place op's trailing underscore is not repeated: galore_project_back_reference.
        assert hasattr(reference, f"{name.rstrip('_')}_reference"), name


def test_python_m_fastllm_prints_diagnostics():
    out = subprocess.run([sys.executable, "-m", "fastllm"], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    assert f"fastllm {fastllm.__version__}" in out
    assert f"built against torch {torch.__version__}" in out
    assert "GPUs visible:" in out
    assert all(name in out for name in ALL_OPS)
    assert "kernels that will run:" in out and "vector path" in out
    assert "optional packages: transformers" in out


def test_python_m_fastllm_json_and_help():
    import json
    out = subprocess.run([sys.executable, "-m", "fastllm", "--json"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    report = json.loads(out)
    assert report["torch"] == torch.__version__ and report["cuda"] == fastllm.build_info()["cuda"]
    assert set(ALL_OPS) <= set(report["ops"])
    assert report["cpu"]["vector_path"] in ("avx512f", "avx2", "default", "unknown")
    assert set(report["packages"]) >= {"transformers", "peft"}
    out = subprocess.run([sys.executable, "-m", "fastllm", "--help"], capture_output=True,
                         text=True, check=True, cwd="/").stdout
    assert "--json" in out


def test_import_against_another_torch_fails_with_rebuild_hint():
    code = ("import torch; torch.__version__ = '0.0.1'\n"
            "try:\n    import fastllm\nexcept ImportError as e:\n    print('ImportError:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd="/").stdout
    assert "ImportError:" in out
    assert "built against torch" in out and "0.0.1" in out
    assert "--no-build-isolation" in out


# ---- CMake configuration, without compiling ---------------------------------------------------

def _configure(tmp_path, mode: str, path_env: str):
    # The cmake the build uses (the PyPI package, >= 3.26), not an older one on the system PATH.
    try:
        import cmake as cmake_package
        cmake = os.path.join(cmake_package.CMAKE_BIN_DIR, "cmake")
    except ImportError:
        cmake = shutil.which("cmake")
    env = {**os.environ, "PATH": path_env}
    env.pop("CUDACXX", None)
    return subprocess.run(
        [cmake, "-S", str(REPO), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DPython_EXECUTABLE={sys.executable}", f"-DFASTLLM_CUDA={mode}"],
        capture_output=True, text=True, env=env)


PATH_WITHOUT_NVCC = os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin", "/bin"])


@pytest.mark.skipif(shutil.which("nvcc", path=PATH_WITHOUT_NVCC) is not None,
                    reason="nvcc is in a system directory; cannot hide it")
def test_cmake_cuda_on_without_compiler_says_what_is_missing(tmp_path):
    result = _configure(tmp_path, "ON", PATH_WITHOUT_NVCC)
    assert result.returncode != 0
    assert "FASTLLM_CUDA=ON but" in result.stderr
    assert "CUDA compiler" in result.stderr or "CPU-only build" in result.stderr


def test_cmake_cuda_off_says_cpu_only_in_one_line(tmp_path):
    result = _configure(tmp_path, "OFF", os.environ["PATH"])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("fastllm: building")]
    assert lines == ["fastllm: building CPU-only kernels: FASTLLM_CUDA=OFF."]


def test_cmake_rejects_unknown_mode(tmp_path):
    result = _configure(tmp_path, "MAYBE", os.environ["PATH"])
    assert result.returncode != 0
    assert "FASTLLM_CUDA must be AUTO, ON or OFF, got 'MAYBE'" in result.stderr
