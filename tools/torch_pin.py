"""Build-time metadata provider: a fastllm wheel requires exactly the torch it was compiled against.

The extension links against one libtorch's C++ ABI (fastllm refuses to load against another torch,
see fastllm/_host.py), so a wheel that declared ``torch>=2.6`` would install beside a torch it cannot
load. The pin drops the local label (``+cu130``) so that pip can satisfy it from any index carrying
that release; which CUDA the wheel serves is in its build info and docs/build.md#wheels.
"""

from __future__ import annotations

from typing import Any, Mapping


def torch_requirement(version: str) -> str:
    """``torch==X.Y.Z`` for a torch version string such as ``2.14.1+cu130``."""
    public = version.split("+", 1)[0]
    if not public or not public[0].isdigit():
        raise ValueError(f"torch_pin: cannot pin torch version {version!r}")
    return f"torch=={public}"


def dynamic_metadata(settings: Mapping[str, Any], _project: Mapping[str, Any]) -> dict[str, Any]:
    field = settings.get("field")
    if field != "dependencies":
        raise ValueError(f"torch_pin provides the 'dependencies' field, not {field!r}")
    # Imported here: the build runs without isolation, so this is the torch CMake compiles against.
    import torch

    return {"dependencies": [torch_requirement(torch.__version__), "numpy"]}
