"""The ONNX + numpy runtime against a plain-torch PatchCore (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv

from patchline.export.embedding import build_embedding
from patchline.runtime.artifact import load_artifact
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image
from tests import reference

# Tolerances: ORT and torch run the same fp32 graph with different kernels (≈1e-6 relative);
# the numpy and torch distance GEMMs differ in summation order (≈1e-5 relative on distances).
EMBED_RTOL = 1e-4
SCORE_RTOL = 1e-4


@pytest.fixture(scope="module")
def torch_model(small_config):
    model, _ = build_embedding(small_config.model.backbone, small_config.model.layers,
                               small_config.model.weights, small_config.model.seed)
    return model


def spread_images(folder):
    paths = list_images(folder / "test")
    return [read_image(p) for p in paths[:: max(1, len(paths) // 6)]]


@pytest.fixture(scope="module")
def test_images(sample_data):
    return spread_images(sample_data)


def test_onnx_embedding_matches_torch(small_artifact, torch_model, test_images):
    inspector = Inspector(small_artifact, device="cpu")
    batch = inspector.preprocess(test_images)
    got = inspector.engine(batch)
    with torch.no_grad():
        want = torch_model(torch.from_numpy(batch)).numpy()
    assert got.shape == want.shape
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= EMBED_RTOL * scale


def test_reference_embedding_matches_export_module(torch_model, test_images, small_config, small_artifact):
    """The export module's aggregation is anomalib's generate_embedding on the raw layer features."""
    batch = torch.from_numpy(Inspector(small_artifact, device="cpu").preprocess(test_images))
    with torch.no_grad():
        features = torch_model.backbone(batch)
        want = reference.generate_embedding(features).permute(0, 2, 3, 1)
        got = torch_model(batch)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("data", ["synthetic", "real photos"])
@pytest.mark.parametrize("search", ["pruned", "plain"])
@pytest.mark.parametrize("num_neighbors", [1, 9])
def test_runtime_scores_and_maps_match_torch_reference(request, torch_model, data, search, num_neighbors):
    """Both nearest-row searches (whichever the artifact's measurement chose), on synthetic parts and real photographs."""
    folder, images = ("small_artifact", "sample_data") if data == "synthetic" else ("real_photo_artifact", "real_photo_data")
    test_images = spread_images(request.getfixturevalue(images))
    artifact = load_artifact(request.getfixturevalue(folder))
    artifact.manifest = artifact.manifest.model_copy(update={"num_neighbors": num_neighbors})
    inspector = Inspector(artifact, device="cpu", search=search)
    assert (inspector.bank.search is None) == (search == "plain")
    bank = torch.from_numpy(artifact.bank)
    size = tuple(artifact.manifest.preprocess.image_size)
    batch = inspector.preprocess(test_images)
    with torch.no_grad():
        features = torch_model.backbone(torch.from_numpy(batch))
        scores, maps, _ = reference.patchcore_forward(features, bank, num_neighbors, size)
    for i, rgb in enumerate(test_images):
        result = inspector.inspect(rgb)
        assert result.score == pytest.approx(float(scores[i]), rel=SCORE_RTOL)
        want_map = maps[i, 0].numpy()
        assert result.anomaly_map.shape == want_map.shape
        assert np.abs(result.anomaly_map - want_map).max() <= SCORE_RTOL * want_map.max()
    # Reweighting must actually change the score when k > 1, or the comparison proves little.
    if num_neighbors > 1:
        plain, _, _ = reference.patchcore_forward(features, bank, 1, size)
        assert not torch.allclose(scores, plain, rtol=1e-3)
