"""Real files of GPU-only packages from PyPI, for tests of the code that meets them only on a GPU box.

TensorRT's bindings and pycuda cannot be installed into the test venv (they need NVIDIA's libraries
and the CUDA toolkit), and the cu12 and cu13 bindings would overwrite each other's module. So the
tests download the exact files with pip, the ordinary client, honouring this machine's pip settings,
into pytest's cache folder (once per interpreter), and unpack them in a temporary folder. pip picks
the wheel built for the running Python, so the same test works in the 3.10 and the 3.11 venv.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def fetch(requirement: str, cache: Path, binary: bool = True) -> Path:
    """The wheel (``binary``) or sdist pip downloads for ``requirement`` (``NAME==VERSION``), kept in ``cache``."""
    name, version = requirement.split("==")
    folder = cache / f"py{sys.version_info.major}{sys.version_info.minor}"
    folder.mkdir(parents=True, exist_ok=True)

    def cached() -> list[Path]:
        return [p for p in folder.iterdir() if _canonical(p.name).startswith(f"{_canonical(name)}_{_canonical(version)}")]

    if not cached():
        # An sdist's metadata is prepared with the venv's own setuptools: no build environment is downloaded.
        kind = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:", "--no-build-isolation"]
        result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                                 *kind, "-d", str(folder), requirement], capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not cached():
            pytest.fail(f"pip could not download {requirement} from the package index (this test needs it):\n"
                        f"{result.stdout[-2000:]}{result.stderr[-2000:]}")
    return cached()[0]


def unpack(archive: Path, target: Path) -> Path:
    """A wheel's contents, or an sdist's top folder, under ``target``; returns the folder to put on sys.path."""
    target.mkdir(parents=True, exist_ok=True)
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            wheel.extractall(target)
        return target
    with tarfile.open(archive) as sdist:
        # The "data" filter (no links out, no special files) where this Python has it (3.11.4+).
        sdist.extractall(target, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return next(target.iterdir())
