"""Shared fixtures: a small synthetic data set, a small exported artifact, a real broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.broker import Mosquitto

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
    from patchline.runtime.config import load_config

    return load_config(None, SMALL_OVERRIDES)


@pytest.fixture(scope="session")
def small_artifact(sample_data: Path, small_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An artifact exported once per session; tests that modify one copy it first."""
    from patchline.export.fit import export_artifact

    out = tmp_path_factory.mktemp("artifact")
    export_artifact(small_config, sample_data, out, progress=False)
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
