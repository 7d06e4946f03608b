"""PatchCore's backbone catalogue: every entry built offline, layers extracted by PatchCore's names,
one model per family exported to ONNX and checked against torch."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # the export extra: not in the runtime-only venv
import timm

from patchline.export.catalogue import CATALOGUE, construct, resolve
from patchline.export.backbone import BackboneError
from patchline.export.embedding import build_from_config
from patchline.export.ensemble import PatchCoreEmbedding
from patchline.export.extractor import LayerExtractor, module_layouts
from patchline.export.onnx_export import export_onnx, verify_onnx
from patchline.runtime.cli import main
from patchline.export.config import load_export_config

# The keys of PatchCore's src/patchcore/backbones.py _BACKBONES.
PATCHCORE_NAMES = {
    "alexnet", "bninception", "resnet50", "resnet101", "resnext101", "resnet200", "resnest50",
    "resnetv2_50_bit", "resnetv2_50_21k", "resnetv2_101_bit", "resnetv2_101_21k", "resnetv2_152_bit",
    "resnetv2_152_21k", "resnetv2_152_384", "resnetv2_101", "vgg11", "vgg19", "vgg19_bn", "wideresnet50",
    "wideresnet101", "mnasnet_100", "mnasnet_a1", "mnasnet_b1", "densenet121", "densenet201", "inception_v4",
    "vit_small", "vit_base", "vit_large", "vit_r50", "vit_deit_base", "vit_deit_distilled", "vit_swin_base",
    "vit_swin_large", "efficientnet_b7", "efficientnet_b5", "efficientnet_b3", "efficientnet_b1",
    "efficientnetv2_m", "efficientnetv2_l", "efficientnet_b3a",
}
META_SIZE = (224, 224)


def test_catalogue_has_every_patchcore_name_and_says_what_is_missing():
    assert set(CATALOGUE) == PATCHCORE_NAMES
    unsupported = {name for name, entry in CATALOGUE.items() if not entry.supported}
    assert unsupported == {"bninception"}
    assert "pretrainedmodels" in CATALOGUE["bninception"].note
    with pytest.raises(BackboneError, match="bninception.*not supported"):
        resolve("bninception")
    with pytest.raises(BackboneError, match="unknown backbone 'no_such_net'"):
        resolve("no_such_net")
    for entry in CATALOGUE.values():
        if entry.source == "timm":
            assert timm.is_model(entry.model.split(".")[0]), entry.name


def _embed_on_meta(name: str) -> dict:
    """Build ``name`` on the meta device (shapes only) and run both embeddings over its default layers."""
    entry = CATALOGUE[name]
    layers = list(entry.layers)
    with torch.device("meta"):
        model, _ = construct(entry, "random", 0, META_SIZE)
        listed = module_layouts(model, META_SIZE)  # what `patchline backbones NAME --layers` shows
        extractor = LayerExtractor(model, layers, META_SIZE)
        embedding = PatchCoreEmbedding([extractor], [layers], 256, 128)(torch.zeros(1, 3, *META_SIZE))
    return {
        "listed": {layer: (listed[layer].channels, listed[layer].grid) for layer in layers if layer in listed},
        "extracted": [(layout.channels, layout.grid) for layout in extractor.layouts],
        "embedding": tuple(embedding.shape),
    }


def test_every_supported_entry_extracts_its_default_layers():
    names = [name for name, entry in CATALOGUE.items() if entry.supported]
    workers = min(2, os.cpu_count() or 1)
    # spawn: a forked child of a process that already ran torch ops can hang in OpenMP.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = dict(zip(names, pool.map(_embed_on_meta, names)))
    for name, got in results.items():
        layers = CATALOGUE[name].layers
        assert list(got["listed"]) == list(layers), f"{name}: default layers not all listed"
        assert got["extracted"] == [got["listed"][layer] for layer in layers], name
        assert got["embedding"] == (1, *got["extracted"][0][1], 128), name  # on the first layer's grid
    # Layer names as PatchCore's users write them, at the strides they expect.
    assert results["wideresnet50"]["extracted"] == [(512, (28, 28)), (1024, (14, 14))]
    assert results["densenet201"]["extracted"] == [(512, (28, 28)), (1792, (14, 14))]
    assert results["vit_base"]["extracted"] == [(768, (14, 14)), (768, (14, 14))]  # 197 tokens − class token
    assert results["vit_deit_distilled"]["extracted"] == [(768, (14, 14)), (768, (14, 14))]  # − 2 tokens
    assert results["vit_swin_base"]["extracted"] == [(256, (28, 28)), (512, (14, 14))]  # channels-last stages


@pytest.mark.parametrize(
    "name, layer, size",
    [
        ("densenet121", "features.denseblock2", 64),
        ("efficientnet_b1", "blocks.3", 64),  # not one of timm's features_only stages
        ("vgg11", "features.7", 64),
        ("vit_small", "blocks.6", 64),
        ("deit_tiny_distilled_patch16_224", "blocks.2", 64),  # DeiT's two prefix tokens, by timm name
        ("swin_tiny_patch4_window7_224", "layers.1", 64),
    ],
)
def test_extracted_layer_is_the_modules_output(name, layer, size):
    """What the traced graph returns is what a forward hook on the module sees, reshaped to (N, C, h, w)."""
    entry = resolve(name)
    model, _ = construct(entry, "random", 0, (size, size))
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        model(images)
        handle.remove()
        (got,) = LayerExtractor(model, [layer], (size, size))(images)
    hooked = seen["out"]
    if hooked.ndim == 3:  # tokens: the patch tokens follow the class (and distillation) tokens
        prefix = hooked.shape[1] - got.shape[2] * got.shape[3]
        assert prefix == model.num_prefix_tokens
        hooked = hooked[:, prefix:].reshape(2, got.shape[2], got.shape[3], -1).permute(0, 3, 1, 2)
    elif getattr(model, "output_fmt", "NCHW") == "NHWC":
        hooked = hooked.permute(0, 3, 1, 2)
    torch.testing.assert_close(got, hooked, rtol=0, atol=0)


def test_unknown_layer_names_the_listing():
    model, _ = construct(resolve("mnasnet_100"), "random", 0, (64, 64))
    with pytest.raises(BackboneError, match=r"no module\(s\) \['blocks.9'\].*patchline backbones"):
        LayerExtractor(model, ["blocks.9"], (64, 64))


# One model per family, exported to ONNX and run by ONNX Runtime. Where a family's catalogue members are
# all large, a small timm sibling goes through the same extraction path (noted).
FAMILIES = [
    ("ResNet", "resnest50", ["layer2", "layer3"], 64, None),
    ("WideResNet", "wideresnet50", ["layer2"], 64, (64, 32)),
    ("ResNetV2/BiT", "resnetv2_101", ["stages.1", "stages.2"], 64, None),
    ("VGG", "vgg11", ["features.14", "features.19"], 64, (128, 64)),
    ("DenseNet", "densenet121", ["features.denseblock2", "features.denseblock3"], 64, (128, 64)),
    ("EfficientNet", "efficientnet_b1", ["blocks.2", "blocks.4"], 64, None),
    ("MNASNet", "mnasnet_a1", ["blocks.2", "blocks.4"], 64, (64, 64)),
    ("Inception", "inception_v4", ["features.5", "features.9"], 96, None),
    ("AlexNet", "alexnet", ["features.4", "features.11"], 96, (64, 32)),
    ("ViT", "vit_small", ["blocks.3", "blocks.5"], 64, (64, 64)),
    ("DeiT", "deit_tiny_distilled_patch16_224", ["blocks.3"], 64, None),  # vit_deit_* are 87M-parameter
    ("Swin", "swin_tiny_patch4_window7_224", ["layers.1", "layers.2"], 64, (64, 32)),  # vit_swin_* ≥ 88M
]


@pytest.mark.parametrize("family, name, layers, size, dims", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_exports_to_onnx(tmp_path: Path, family, name, layers, size, dims):
    overrides = [f"model.backbone={name}", f"model.layers={layers}", "model.weights=random"]
    if dims:  # alternate between anomalib's and the original PatchCore's embedding
        overrides += [f"model.pretrain_embed_dimension={dims[0]}", f"model.target_embed_dimension={dims[1]}"]
    model = load_export_config(None, overrides).model
    module, _ = build_from_config(model, (size, size))
    export_onnx(module, (size, size), tmp_path / "model.onnx", 17)
    # Raises unless ONNX Runtime's embedding of a random batch is within 1e-4 (relative) of torch's.
    verify_onnx(module, tmp_path / "model.onnx", (size, size), 1e-4)


def test_cli_lists_catalogue_and_layers(capsys):
    main(["backbones", "densenet121", "--layers", "--image-size", "64"])
    out = capsys.readouterr().out
    assert "features.denseblock2" in out and " 512 " in out and "8x8" in out
    main(["backbones"])
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == PATCHCORE_NAMES
    assert "unsupported" in rows["bninception"] and "pretrainedmodels" in rows["bninception"]
    assert "wide_resnet50_2.tv_in1k" in rows["wideresnet50"] and "68.9M" in rows["wideresnet50"]
    assert "blocks.6, blocks.9" in rows["vit_base"] and "86.6M" in rows["vit_base"]
    main(["backbones", "wideresnet50"])  # NAME alone: its entry, not its layers
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1] == rows["wideresnet50"]
    main(["backbones", "resnet18"])  # a timm name outside the catalogue
    assert "11.7M" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layers needs a NAME"):
        main(["backbones", "--layers"])
