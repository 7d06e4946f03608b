"""Where TensorRT engines live on the box, and whether a cached one fits this box and model.

An engine runs only with the TensorRT version and GPU that built it (TensorRT picks its kernels by
timing them on that GPU model, not just its architecture), and is built for one ONNX file, precision
and batch profile. Each engine file is named by that key
and has a JSON sidecar recording the key and the engine's sha256. An engine whose sidecar is
missing, names another key, or whose bytes changed is never used: it is rebuilt, or refused
with the reason when building is disabled. Plain Python; TensorRT itself is in trt_build.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pwd
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from patchline.runtime.artifact import now_iso, sha256_file
from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.config import TensorRtConfig, systemd_directory

log = logging.getLogger(__name__)

# systemd sets this for a unit with CacheDirectory= (several directories are ':'-separated).
CACHE_ENV = "CACHE_DIRECTORY"
_LABELS = {
    "onnx_sha256": "ONNX file",
    "precision": "precision",
    "batch_profile": "batch profile (min, opt, max)",
    "tensorrt": "TensorRT",
    "compute_capability": "GPU compute capability",
    "gpu": "GPU model",
    "calibration_sha256": "INT8 calibration cache",
}


class EngineError(ValueError):
    """An engine that cannot be built or used; the message names the file and the reason."""


def gpu_tag(compute_capability: str, gpu: str) -> str:
    """``sm87-orin``, ``sm90-h200``: the GPU in file names (two models of one architecture must not share)."""
    model = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-").removeprefix("nvidia-")
    return f"sm{compute_capability.replace('.', '')}-{model or 'gpu'}"


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    precision: str
    batch_profile: tuple[int, int, int]
    tensorrt: str
    compute_capability: str
    gpu: str  # the device's name, e.g. "Orin" or "NVIDIA H200"
    calibration_sha256: str | None = None

    @property
    def file_name(self) -> str:
        low, opt, high = self.batch_profile
        parts = [self.onnx_sha256[:16], self.precision, f"b{low}-{opt}-{high}",
                 gpu_tag(self.compute_capability, self.gpu), "trt" + self.tensorrt]
        if self.calibration_sha256:
            parts.append("cal" + self.calibration_sha256[:12])
        return "_".join(parts) + ".engine"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "batch_profile": list(self.batch_profile)}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> EngineKey:
        """Raises KeyError, TypeError or ValueError for anything that is not a key."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise ValueError(f"not an engine key: {data!r}")
        return cls(**{**data, "batch_profile": tuple(data["batch_profile"])})

    def differences(self, recorded: EngineKey) -> list[str]:
        """What ``recorded`` was built for that this key does not accept, in words."""
        return [f"{_LABELS[f.name]} {getattr(recorded, f.name)} (this box needs {getattr(self, f.name)})"
                for f in fields(self) if getattr(recorded, f.name) != getattr(self, f.name)]


def cache_directory(configured: str | Path | None = None) -> Path:
    """``configured``, else systemd's CacheDirectory, else ``$XDG_CACHE_HOME/patchline`` (``~/.cache``); created.

    A run config always configures it (config.RunTensorRtConfig: the service's cache)."""
    if configured:
        path = Path(configured)
    elif systemd_directory(CACHE_ENV):
        path = Path(systemd_directory(CACHE_ENV))
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patchline"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"{path}: cannot create the engine cache directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise EngineError(f"{path}: engine cache directory is not writable by this user")
    return path


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a name (containers): sudo takes "#UID"
        return f"#{uid}"


def build_command(artifact_dir: Path, device: str, settings: TensorRtConfig, cache_dir: Path) -> str:
    """The `patchline engine` command that builds the engine ``settings`` ask for into ``cache_dir``.

    It runs as the cache's owner (the service's user for the service's cache), so that the service can
    replace the files later; from the service itself, a person runs it from a shell."""
    executable = Path(sys.executable).with_name("patchline")  # the console script of this environment
    words = [str(executable) if executable.is_file() else "patchline", "engine",
             "--artifact", str(artifact_dir.resolve()), "--device", device]
    sets = {"cache_dir": cache_dir.resolve(), "precision": settings.precision,
            "batch_profile": "[{},{},{}]".format(*settings.batch_profile), "workspace_mb": settings.workspace_mb,
            "calibration_cache": settings.calibration_cache}
    for name, value in sets.items():
        if value is not None:
            words += ["--set", f"tensorrt.{name}={value}"]
    owner = _user_name(cache_dir.stat().st_uid)
    as_service = "INVOCATION_ID" in os.environ  # systemd sets it for every unit it starts
    if as_service or owner != _user_name(os.geteuid()):
        words = ["sudo", "-u", owner, *words]
    return shlex.join(words)


def sidecar(engine: Path) -> Path:
    return engine.with_suffix(".json")


def _recorded_key(engine: Path) -> tuple[EngineKey, str]:
    meta = json.loads(sidecar(engine).read_text())
    return EngineKey.from_json(meta["key"]), meta["engine_sha256"]


def engine_problem(path: Path, key: EngineKey) -> str | None:
    """Why the engine at ``path`` must not be used for ``key``; None when it can be."""
    if not path.is_file():
        return "no engine has been built for it yet"
    try:
        recorded, digest = _recorded_key(path)
    except FileNotFoundError:
        return f"{sidecar(path).name} is missing, so where the engine came from is unknown"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{sidecar(path).name} is unreadable ({exc})"
    differences = key.differences(recorded)
    if differences:
        return "it was built for " + "; ".join(differences)
    if sha256_file(path) != digest:
        return "its bytes no longer match the checksum recorded when it was built (truncated or corrupted)"
    return None


def write_engine(path: Path, key: EngineKey, plan: bytes, info: dict[str, object]) -> None:
    """Write the engine, then its sidecar: an engine left without one by a crash is never used."""
    write_atomically(path, plan, fsync=False)
    meta = {"key": key.to_json(), "engine_sha256": hashlib.sha256(plan).hexdigest(), "built": now_iso(), **info}
    write_atomically(sidecar(path), (json.dumps(meta, indent=2) + "\n").encode(), fsync=False)


def remove_superseded(cache_dir: Path, key: EngineKey) -> list[Path]:
    """Delete engines of the same model, precision, profile and GPU built by another TensorRT version:
    this box can never load them again. Files without a readable sidecar are left alone."""
    removed = []
    for other in sorted(cache_dir.glob("*.engine")):
        if other.name == key.file_name:
            continue
        try:
            recorded, _ = _recorded_key(other)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if recorded.tensorrt != key.tensorrt and replace(recorded, tensorrt=key.tensorrt) == key:
            other.unlink(missing_ok=True)
            sidecar(other).unlink(missing_ok=True)
            removed.append(other)
    return removed


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    # Two services starting together on one box must not both write the same engine.
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_engine(
    cache_dir: Path, key: EngineKey, build: bool, make_plan: Callable[[], tuple[bytes, dict[str, object]]],
    fix_command: str,
) -> tuple[Path, bool]:
    """The path of a usable engine for ``key`` and whether it was built now.

    ``make_plan`` returns the serialised engine and facts to record with it; it is called only
    when no usable engine is cached and ``build`` is true, otherwise the problem is raised, with
    ``fix_command`` (:func:`build_command`): what builds the engine without building on the line.
    Processes that need the same engine at once build it once: the others wait on its lock file.
    """
    path = cache_dir / key.file_name
    if engine_problem(path, key) is None:
        return path, False
    with _exclusive(path.with_suffix(".lock")):
        problem = engine_problem(path, key)  # another process may have built it while we waited
        if problem is None:
            return path, False
        if not build:
            raise EngineError(f"{path}: cannot use a cached TensorRT engine: {problem}; building is disabled "
                              f"(tensorrt.build: false), so build it on this box with: {fix_command}")
        log.info("building TensorRT engine %s: %s", path.name, problem)
        plan, info = make_plan()
        write_engine(path, key, plan, info)
    for old in remove_superseded(cache_dir, key):
        log.info("removed %s: built by another TensorRT version", old.name)
    return path, True
