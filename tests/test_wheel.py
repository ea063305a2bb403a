"""`pip wheel` produces a wheel that installs into a fresh virtual environment and works there.

The wheel is built CPU-only (FASTLLM_CUDA=OFF) in its own build directory, which also proves the
CPU-only build path on machines whose main build compiles CUDA. The fresh environment reaches this
environment's torch through a .pth file instead of installing torch again (gigabytes).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import venv
import zipfile

import pytest
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_and_imports(tmp_path):
    dist = tmp_path / "dist"
    env = {**os.environ, "FASTLLM_CUDA": "OFF"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", str(dist),
         "--config-settings=build-dir=" + str(tmp_path / "build"), str(REPO)],
        check=True, env=env, capture_output=True)
    wheels = list(dist.glob("fastllm-*.whl"))
    assert len(wheels) == 1
    # What `make wheel` does next: the manylinux tag, after checking the extension links nothing
    # but torch's libraries and the manylinux policy's.
    repaired = subprocess.run([sys.executable, str(REPO / "tools" / "manylinux_wheel.py"),
                               str(wheels[0])], capture_output=True, text=True)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    wheels = list(dist.glob("fastllm-*.whl"))
    assert len(wheels) == 1 and "-manylinux_" in wheels[0].name, wheels
    with zipfile.ZipFile(wheels[0]) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = z.read(name).decode()
    # The extension loads only against the torch it was compiled with, so the wheel pins it.
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}" in metadata.splitlines()
    # PEP 561: type checkers use the package's inline hints only if the marker ships.
    assert "fastllm/py.typed" in zipfile.ZipFile(wheels[0]).namelist()

    fresh = tmp_path / "venv"
    venv.create(fresh, with_pip=False)
    fresh_python = fresh / "bin" / "python"
    fresh_site = subprocess.run(
        [fresh_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    torch_site = pathlib.Path(torch.__file__).parents[1]
    (pathlib.Path(fresh_site) / "torch_from_build_env.pth").write_text(f"{torch_site}\n")
    # Install with this environment's pip, targeting the fresh venv's site-packages.
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                    "--target", fresh_site, str(wheels[0])], check=True, capture_output=True)

    code = (
        "import torch, fastllm, fastllm.ops as ops\n"
        "assert fastllm.__file__.startswith(%r), fastllm.__file__\n"
        "assert fastllm.build_info()['cuda'] is False\n"
        "pool = torch.randn(10, 4); slots = torch.tensor([7, 2])\n"
        "assert torch.equal(ops.pool_gather(pool, slots), pool[slots])\n"
        "print('ok', fastllm.build_info()['torch'])\n"
    ) % fresh_site
    out = subprocess.run([fresh_python, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env={k: v for k, v in os.environ.items()
                                            if k not in ("PYTHONPATH", "VIRTUAL_ENV")})
    assert out.stdout.strip() == f"ok {torch.__version__}"
