"""Shared fixtures: small synthetic and real-photo data sets, small artifacts exported from them, a real broker."""

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


@pytest.fixture(scope="session")
def real_photo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Crops of scikit-image's real photographs, one training crop per photograph."""
    from patchline.export.real_photos import DEFAULT_PHOTOS, generate_real

    return generate_real(tmp_path_factory.mktemp("real"), DEFAULT_PHOTOS, train=len(DEFAULT_PHOTOS), test_good=4,
                         per_defect=2, size=128, seed=1)


@pytest.fixture(scope="session")
def real_photo_artifact(real_photo_data: Path, small_config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from patchline.export.fit import export_artifact

    out = tmp_path_factory.mktemp("real_artifact")
    export_artifact(small_config, real_photo_data, out, progress=False)
    return out


@pytest.fixture()
def mosquitto(tmp_path: Path):
    broker = Mosquitto(tmp_path)
    broker.start()
    yield broker
    broker.stop()
