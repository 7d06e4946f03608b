"""Shared fixtures: small synthetic and real-photo data sets, small artifacts exported from them, a real broker.

The runtime's tests also run on Python 3.10 in a venv with only the runtime and test dependencies
(`make test`, `.venv310`): there, PATCHLINE_RUNTIME_ONLY=1, modules that need torch or the calibration
extra skip with the reason (``pytest.importorskip`` at their top), test artifacts are exported by the
Python that PATCHLINE_EXPORT_PYTHON names (as an edge box runs artifacts exported elsewhere), and the
run fails unless at least RUNTIME_ONLY_MIN_PASSED tests passed, so that it cannot pass by skipping.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from patchline.runtime.tools.broker import Mosquitto

RUNTIME_ONLY = os.environ.get("PATCHLINE_RUNTIME_ONLY") == "1"
EXPORT_PYTHON_ENV = "PATCHLINE_EXPORT_PYTHON"
RUNTIME_ONLY_MIN_PASSED = 150

try:
    import gi

    gi.require_version("Gst", "1.0")
    GSTREAMER_MISSING = None
except (ImportError, ValueError) as exc:
    GSTREAMER_MISSING = str(exc)
# Debian builds GStreamer's Python bindings (python3-gst-1.0) for its own Python 3.11 only. On 3.11 a missing
# binding is a broken test machine and fails loudly; on 3.10 the GStreamer tests skip.
needs_gstreamer = pytest.mark.skipif(
    GSTREAMER_MISSING is not None and sys.version_info < (3, 11),
    reason=f"GStreamer's Python bindings come from Debian for its Python 3.11 only ({GSTREAMER_MISSING})",
)


def patchline(*args: str, python: str = sys.executable, cwd: Path | None = None, check: bool = True):
    """Run the `patchline` command in a subprocess, as a user does."""
    result = subprocess.run([python, "-m", "patchline.runtime.cli", *args], capture_output=True, text=True,
                            cwd=cwd, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"patchline {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def export_python() -> str:
    """A Python that can run `patchline export`: this one when it has torch, else $PATCHLINE_EXPORT_PYTHON."""
    if importlib.util.find_spec("torch") is not None:
        return sys.executable
    if os.environ.get(EXPORT_PYTHON_ENV):
        return os.environ[EXPORT_PYTHON_ENV]
    pytest.skip(f"exporting a test artifact needs torch, which this Python lacks, and ${EXPORT_PYTHON_ENV} "
                "names no Python that has it")


def pytest_configure(config: pytest.Config) -> None:
    if RUNTIME_ONLY and importlib.util.find_spec("torch") is not None:
        raise pytest.UsageError("PATCHLINE_RUNTIME_ONLY=1 tests the runtime without torch, but this Python "
                                f"({sys.executable}) can import it: something installed it into the runtime venv")


_passed = 0


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _passed
    if report.when == "call" and report.passed:
        _passed += 1


def pytest_terminal_summary(terminalreporter, exitstatus: int) -> None:  # noqa: ANN001 - pytest's TerminalReporter
    if RUNTIME_ONLY and _passed < RUNTIME_ONLY_MIN_PASSED:
        terminalreporter.write_line(f"runtime-only run: {_passed} tests passed, fewer than the "
                                    f"{RUNTIME_ONLY_MIN_PASSED} expected: too many were skipped or deselected",
                                    red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if RUNTIME_ONLY and _passed < RUNTIME_ONLY_MIN_PASSED and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED

# A small model that keeps the suite fast on 2 cores; the maths is the same as the default's.
# With random weights the shallow layers separate the synthetic defects far better than deep ones.
SMALL_OVERRIDES = [
    "model.backbone=resnet18",
    "model.layers=[layer1, layer2]",
    "model.weights=random",
    "preprocess.image_size=128",
    "coreset.ratio=0.1",
]


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from patchline.export.synthetic import generate

    return generate(tmp_path_factory.mktemp("data"), train=20, test_good=6, per_defect=3, size=128, seed=1)


@pytest.fixture(scope="session")
def small_config():
    from patchline.export.config import load_export_config

    return load_export_config(None, SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def small_artifact(sample_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact exported once per session, by `patchline export`; tests that modify one copy it first."""
    out = tmp_path_factory.mktemp("artifact")
    sets = [arg for override in SMALL_OVERRIDES for arg in ("--set", override)]
    patchline("export", "--images", str(sample_data), "--out", str(out), "--quiet", *sets, python=export_python())
    return out


@pytest.fixture(scope="session")
def real_photo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of scikit-image's real photographs (`patchline sample-data --real`), one training crop per photograph,
    made by the export Python (scikit-image is not a runtime dependency)."""
    from patchline.export.real_photos import DEFAULT_PHOTOS

    out = tmp_path_factory.mktemp("real") / "data"
    patchline("sample-data", str(out), "--real", "--train", str(len(DEFAULT_PHOTOS)), "--test-good", "4",
              "--per-defect", "2", "--size", "128", "--seed", "1", python=export_python())
    return out


@pytest.fixture(scope="session")
def real_photo_artifact(real_photo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small model exported from the real-photo data set, as small_artifact is from the synthetic one."""
    out = tmp_path_factory.mktemp("real_artifact")
    sets = [arg for override in SMALL_OVERRIDES for arg in ("--set", override)]
    patchline("export", "--images", str(real_photo_data), "--out", str(out), "--quiet", *sets, python=export_python())
    return out


@pytest.fixture()
def mosquitto(tmp_path: Path):
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture()
def small_disk(tmp_path: Path):
    """mount(size_mb) → a real tmpfs of that size mounted for this test (unmounted after it); skipped, with
    the reason, where mounting is not permitted (the full-disk tests need root or CAP_SYS_ADMIN)."""
    import subprocess

    mounted: list[Path] = []

    def mount(size_mb: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a {size_mb} MB tmpfs here: {result.stderr.strip() or result.returncode}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "--lazy", str(point)], check=False)


def fill(disk: Path) -> Path:
    """Write a file into ``disk`` until the filesystem refuses (ENOSPC): 100 % full. Returns the file."""
    import errno
    import os

    hog = disk / f"hog{len(list(disk.glob('hog*')))}"
    fd = os.open(hog, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
    try:
        while True:  # the last pages, a little at a time
            os.write(fd, bytes(512))
    except OSError:
        pass
    finally:
        os.close(fd)
    return hog
