"""The original PatchCore's mean-mapped embedding and ensembles: against PatchCore's own algorithm,
and one ensemble exported and scored end to end by the runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
import torch.nn.functional as F

from patchline.export.embedding import build_from_config
from patchline.export.ensemble import AdaptiveMean, unfold_patches
from patchline.export.fit import export_artifact
from patchline.export.torch_baseline import TorchPatchcore
from patchline.runtime.artifact import load_artifact
from patchline.export.config import load_export_config
from patchline.runtime.config import ConfigError
from patchline.runtime.inspector import Inspector
from patchline.runtime.preprocess import list_images, read_image
from tests import plain_patchcore
from tests.conftest import SMALL_OVERRIDES


def original_patchcore_embed(features: list[torch.Tensor], pretrain_dim: int, target_dim: int) -> torch.Tensor:
    """PatchCore's _embed (patchcore.py, common.py) on given layer maps: (N·h·w, target_dim), row-major patches."""
    unfold = torch.nn.Unfold(kernel_size=3, stride=1, padding=1, dilation=1)
    patches, shapes = [], []
    for x in features:
        unfolded = unfold(x).reshape(*x.shape[:2], 3, 3, -1).permute(0, 4, 1, 2, 3)
        patches.append(unfolded)
        shapes.append(x.shape[-2:])
    ref = shapes[0]
    for i in range(1, len(patches)):
        f = patches[i].reshape(patches[i].shape[0], *shapes[i], *patches[i].shape[2:])
        f = f.permute(0, -3, -2, -1, 1, 2)
        base = f.shape
        f = f.reshape(-1, *f.shape[-2:])
        f = F.interpolate(f.unsqueeze(1), size=tuple(ref), mode="bilinear", align_corners=False).squeeze(1)
        f = f.reshape(*base[:-2], *ref).permute(0, -2, -1, 1, 2, 3)
        patches[i] = f.reshape(len(f), -1, *f.shape[-3:])
    patches = [x.reshape(-1, *x.shape[-3:]) for x in patches]
    mapped = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in patches]
    stacked = torch.stack(mapped, dim=1)
    return F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim).reshape(len(stacked), -1)


@pytest.mark.parametrize("in_dim, out_dim", [(4608, 1024), (9216, 1024), (576, 1024), (2048, 384), (7, 3), (3, 7)])
def test_adaptive_mean_is_adaptive_avg_pool1d(in_dim, out_dim):
    x = torch.randn(2, in_dim, 3, 4)
    want = F.adaptive_avg_pool1d(x.permute(0, 2, 3, 1).reshape(-1, 1, in_dim), out_dim)
    want = want.reshape(2, 3, 4, out_dim).permute(0, 3, 1, 2)
    torch.testing.assert_close(AdaptiveMean(in_dim, out_dim)(x), want, rtol=1e-5, atol=1e-6)


def test_unfold_patches_is_torch_unfold():
    x = torch.randn(2, 5, 6, 7)
    want = torch.nn.Unfold(kernel_size=3, padding=1)(x).reshape(2, 45, 6, 7)
    torch.testing.assert_close(unfold_patches(x), want, rtol=0, atol=0)


def _ensemble_config(**extra: str):
    overrides = [
        *SMALL_OVERRIDES,
        "model.backbone=[resnet18, mnasnet_100]",  # a timm features_only CNN and a catalogue entry
        "model.layers=[0.layer2, 0.layer3, 1.blocks.2, 1.blocks.4]",  # first layers both at stride 8
        "model.pretrain_embed_dimension=64",
        "model.target_embed_dimension=32",
    ]
    return load_export_config(None, overrides + [f"{k}={v}" for k, v in extra.items()])


def test_embedding_is_the_original_patchcore_per_backbone_concatenated():
    config = _ensemble_config()
    module, _ = build_from_config(config.model, (128, 128))
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        got = module(images)
        want = [
            original_patchcore_embed([maps[i] for i in order], 64, 32)
            for backbone, order in zip(module.backbones, module.orders)
            for maps in [backbone(images)]
        ]
    assert got.shape == (2, 16, 16, 64)
    torch.testing.assert_close(got.reshape(-1, 64), torch.cat(want, dim=1), rtol=1e-4, atol=1e-5)


def test_single_backbone_with_dimensions_is_the_original_patchcore():
    config = load_export_config(None, [*SMALL_OVERRIDES, "model.layers=[layer3, layer2]", "model.pretrain_embed_dimension=96"])
    assert config.model.embed_dimensions() == (96, 1024)
    module, _ = build_from_config(config.model, (128, 128))
    images = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        maps = module.backbones[0](images)
        want = original_patchcore_embed([maps[i] for i in module.orders[0]], 96, 1024)
        got = module(images)
    assert got.shape == (1, 8, 8, 1024)  # layer3's grid: the first layer named sets it
    torch.testing.assert_close(got.reshape(-1, 1024), want, rtol=1e-4, atol=1e-5)


def test_ensemble_exports_and_scores_end_to_end(sample_data: Path, tmp_path: Path):
    config = _ensemble_config()
    manifest = export_artifact(config, sample_data, tmp_path, progress=False)
    assert manifest.backbone.name == "resnet18+mnasnet_100"
    assert manifest.model_id.startswith("resnet18+mnasnet_100-")
    assert (manifest.backbone.pretrain_embed_dimension, manifest.backbone.target_embed_dimension) == (64, 32)
    assert manifest.model.embedding_dim == 64 and manifest.model.patch_grid == (16, 16)
    assert load_artifact(tmp_path).bank.shape[1] == 64

    # The unchanged runtime scores the ensemble as plain-torch PatchCore does with the same module and bank.
    inspector = Inspector(tmp_path, device="cpu")
    module, _ = build_from_config(config.model, (128, 128))
    paths = list_images(sample_data / "test")
    images = [read_image(p) for p in paths]
    with torch.no_grad():
        embedding = module(torch.from_numpy(inspector.preprocess(images)))
    want, _ = plain_patchcore.score(embedding, torch.from_numpy(inspector.bank.rows), manifest.num_neighbors)
    got = [inspector.inspect(image).score for image in images]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)

    # The bench's eager-torch baseline rebuilds the same ensemble from the manifest alone.
    artifact = load_artifact(tmp_path)
    baseline = TorchPatchcore(artifact, artifact.bank)
    scores, maps, _ = baseline.forward(inspector.preprocess(images))
    assert maps.shape == (len(images), 128, 128)
    np.testing.assert_allclose(scores, got, rtol=1e-3)


def test_ensemble_config_errors_name_the_layer():
    with pytest.raises(ConfigError, match=r"layer 'layer2': an ensemble's layers start with the backbone's index 0\.\.1"):
        load_export_config(None, ["model.backbone=[resnet18, densenet121]", "model.layers=[layer2, 1.features.denseblock2]"])
    with pytest.raises(ConfigError, match=r"no layers for backbone\(s\) \['densenet121'\]"):
        load_export_config(None, ["model.backbone=[resnet18, densenet121]", "model.layers=[0.layer2]"])
    with pytest.raises(ConfigError, match="3 weights for 2 backbones"):
        load_export_config(None, ["model.backbone=[a, b]", "model.layers=[0.x, 1.y]", "model.weights=[random, random, random]"])
    assert load_export_config(None, ["model.backbone=[a, b]", "model.layers=[0.x, 1.y]"]).model.embed_dimensions() == (1024, 384)


def test_ensemble_example_config_builds_patchcores_best_ensemble():
    """configs/ensemble.yaml (the README's example) is valid and its layers exist: built on the meta device."""
    path = Path(__file__).parents[1] / "configs" / "ensemble.yaml"
    config = load_export_config(path, ["model.weights=random"])  # no download; shapes only
    assert config.model.backbones == ["wideresnet101", "resnext101", "densenet201"]
    assert config.model.embed_dimensions() == (1024, 384)
    size = config.preprocess.image_size
    with torch.device("meta"):
        module, _ = build_from_config(config.model, size)
        embedding = module(torch.zeros(1, 3, *size))
    assert embedding.shape == (1, 28, 28, 3 * 384)  # on wideresnet101's layer2 grid, 224 / 8
