"""Optional dependencies: fastllm itself needs only torch and numpy.

The capabilities that plug into Hugging Face models (``fastllm.kv``; saving and loading
safetensors files in ``fastllm.sparse`` and ``fastllm.lora``) need packages from the ``hf`` extra.
They import them where they are used, so ``import fastllm`` and ``import fastllm.ops`` work
without them, and a missing one is reported by name together with the install command.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from importlib import metadata
from types import ModuleType

EXTRA = "hf"
INSTALL_HINT = f"pip install 'fastllm[{EXTRA}]'"


def _dependency_error(package: str, feature: str, error: ImportError) -> ImportError | None:
    name = error.name or ""
    if name != package and not name.startswith(package + "."):
        # About some other module: a fastllm bug or a broken dependency of ``package`` keeps its
        # own message.
        return None
    if _missing(package):
        return ImportError(f"{feature} needs {package}, which is not installed: {INSTALL_HINT}",
                           name=package)
    try:
        installed = f"the installed {package} {metadata.version(package)}"
    except metadata.PackageNotFoundError:
        installed = f"the installed {package}"
    return ImportError(f"{feature} cannot use {installed} ({error}); it needs a newer one: "
                       f"{INSTALL_HINT} --upgrade", name=package)


def _missing(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except ValueError:  # already imported without a spec: present
        return False


@contextlib.contextmanager
def needs(package: str, feature: str):
    """Within this block, an ImportError of ``package`` (or of a part of it) becomes one that says
    ``feature`` needs it and how to install it."""
    try:
        yield
    except ImportError as error:
        replacement = _dependency_error(package, feature, error)
        if replacement is None:
            raise
        raise replacement from error


def require(module: str, feature: str) -> ModuleType:
    """``module`` (e.g. ``"safetensors.torch"``), imported for ``feature``; a clear ImportError
    naming the package and the extra that installs it if it is missing."""
    with needs(module.partition(".")[0], feature):
        return importlib.import_module(module)
