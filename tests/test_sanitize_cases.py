"""bench/sanitize_cases.py is what compute-sanitizer runs on a GPU machine, where minutes are
scarce: run its cases on the CPU kernels here so that a broken case is found before then."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sanitize_cases_pass_on_cpu():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_cases.py"), "--device",
                             "cpu"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bad_index_cases ok" in result.stdout and "sanitize cases ok" in result.stdout
