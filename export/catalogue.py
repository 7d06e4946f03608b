"""PatchCore's backbone catalogue by name, mapped onto timm and torchvision.

The names are those of PatchCore's ``src/patchcore/backbones.py`` (``wideresnet50``, ``vit_base``,
``efficientnet_b7`` …). Each maps to the same network in timm (or torchvision where timm has none). Where
PatchCore loaded torchvision's weights, the timm name carries timm's ``tv_in1k`` tag (the same tensors);
where timm has renamed a model since (BiT, MNASNet, efficientnet_b3a) the current name is used. Layers are
named as PatchCore users write them and extracted by module path (``export/extractor.py``).

Any timm model name works as a backbone too; a CNN whose layers are all in timm's ``features_only`` list
keeps anomalib's extraction (``export/backbone.py``), so a plain ``wide_resnet50_2`` stays anomalib's model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import timm
import torch
import torchvision

from patchline.export.backbone import BackboneError, build_with_weights, create_backbone, feature_layers
from patchline.export.extractor import LayerExtractor, Layout, module_layouts


@dataclass(frozen=True)
class Entry:
    name: str  # PatchCore's name
    family: str
    source: str  # "timm", "torchvision", or "" where neither has the network
    model: str  # timm model name (with a pretrained tag where it matters) or torchvision builder
    layers: tuple[str, ...] = ()  # default layers
    note: str = ""  # weights caveat, or why there is no equivalent

    @property
    def supported(self) -> bool:
        return bool(self.source)


def _family(family: str, source: str, layers: tuple[str, ...], *rows: tuple[str, str] | tuple[str, str, str]) -> list[Entry]:
    return [Entry(row[0], family, source, row[1], layers, *row[2:]) for row in rows]


_MID = ("layer2", "layer3")  # stride 8 and 16: PatchCore's recommended pair
_VIT12, _VIT24 = ("blocks.6", "blocks.9"), ("blocks.12", "blocks.18")  # half and three quarters deep
_BLOCKS = ("blocks.2", "blocks.4")  # EfficientNet/MNASNet stages ending at stride 8 and 16

CATALOGUE: dict[str, Entry] = {
    entry.name: entry
    for entry in [
        *_family(
            "ResNet", "timm", _MID,
            ("resnet50", "resnet50.tv_in1k"),
            ("resnet101", "resnet101.tv_in1k"),
            ("resnext101", "resnext101_32x8d.tv_in1k"),
            ("resnet200", "resnet200", "timm publishes no weights for resnet200: set model.weights to a file"),
            ("resnest50", "resnest50d_4s2x40d"),
        ),
        *_family(
            "WideResNet", "timm", _MID,
            ("wideresnet50", "wide_resnet50_2.tv_in1k"),
            ("wideresnet101", "wide_resnet101_2.tv_in1k"),
        ),
        *_family(
            "ResNetV2/BiT", "timm", ("stages.1", "stages.2"),
            ("resnetv2_50_bit", "resnetv2_50x3_bit.goog_in21k_ft_in1k"),
            ("resnetv2_50_21k", "resnetv2_50x3_bit.goog_in21k"),
            ("resnetv2_101_bit", "resnetv2_101x3_bit.goog_in21k_ft_in1k"),
            ("resnetv2_101_21k", "resnetv2_101x3_bit.goog_in21k"),
            ("resnetv2_152_bit", "resnetv2_152x4_bit.goog_in21k_ft_in1k"),
            ("resnetv2_152_21k", "resnetv2_152x4_bit.goog_in21k"),
            ("resnetv2_152_384", "resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384"),
            ("resnetv2_101", "resnetv2_101"),
        ),
        # VGG: the ReLU closing the blocks at stride 8 and 16.
        Entry("vgg11", "VGG", "timm", "vgg11.tv_in1k", ("features.14", "features.19")),
        Entry("vgg19", "VGG", "timm", "vgg19.tv_in1k", ("features.26", "features.35")),
        Entry("vgg19_bn", "VGG", "timm", "vgg19_bn.tv_in1k", ("features.38", "features.51")),
        *_family(
            "DenseNet", "timm", ("features.denseblock2", "features.denseblock3"),
            ("densenet121", "densenet121"),
            ("densenet201", "densenet201"),
        ),
        *_family(
            "EfficientNet", "timm", _BLOCKS,
            ("efficientnet_b1", "tf_efficientnet_b1"),
            ("efficientnet_b3", "tf_efficientnet_b3"),
            ("efficientnet_b5", "tf_efficientnet_b5"),
            ("efficientnet_b7", "tf_efficientnet_b7"),
            ("efficientnet_b3a", "efficientnet_b3", "timm merged efficientnet_b3a into efficientnet_b3"),
            ("efficientnetv2_m", "tf_efficientnetv2_m"),
            ("efficientnetv2_l", "tf_efficientnetv2_l"),
        ),
        *_family(
            "ViT", "timm", _VIT12,
            ("vit_small", "vit_small_patch16_224"),
            ("vit_base", "vit_base_patch16_224"),
        ),
        *_family(
            "ViT", "timm", _VIT24,
            ("vit_large", "vit_large_patch16_224"),
            ("vit_r50", "vit_large_r50_s32_224"),
        ),
        *_family(
            "DeiT", "timm", _VIT12,
            ("vit_deit_base", "deit_base_patch16_224"),
            ("vit_deit_distilled", "deit_base_distilled_patch16_224"),
        ),
        *_family(
            "Swin", "timm", ("layers.1", "layers.2"),
            ("vit_swin_base", "swin_base_patch4_window7_224"),
            ("vit_swin_large", "swin_large_patch4_window7_224"),
        ),
        *_family(
            "MNASNet", "timm", _BLOCKS,
            ("mnasnet_100", "mnasnet_100"),
            ("mnasnet_a1", "semnasnet_100", "timm renamed mnasnet_a1 to semnasnet_100"),
            ("mnasnet_b1", "mnasnet_100", "timm renamed mnasnet_b1 to mnasnet_100"),
        ),
        Entry("inception_v4", "Inception", "timm", "inception_v4", ("features.9", "features.17")),
        Entry("alexnet", "AlexNet", "torchvision", "alexnet", ("features.4", "features.11")),
        Entry(
            "bninception", "BN-Inception", "", "",
            note="only in Cadene's pretrainedmodels package (unmaintained since 2018); neither timm nor torchvision has it",
        ),
    ]
}


def resolve(name: str) -> Entry:
    """The catalogue entry for ``name``, or an ad-hoc entry for a timm model name."""
    if name in CATALOGUE:
        entry = CATALOGUE[name]
        if not entry.supported:
            raise BackboneError(f"backbone {name!r} is not supported: {entry.note}")
        return entry
    if timm.is_model(name):
        return Entry(name, "timm", "timm", name)
    raise BackboneError(
        f"unknown backbone {name!r}: not in PatchCore's catalogue (`patchline backbones` lists it) nor a timm model"
    )


SIZED_FAMILIES = {"ViT", "DeiT", "Swin"}  # token grids fixed at construction: built for the input size


@functools.cache
def _takes_image_size(model: str) -> bool:
    """Whether a timm model outside the catalogue has a token grid (a patch_embed): built on the meta device."""
    with torch.device("meta"):
        return hasattr(timm.create_model(model, pretrained=False), "patch_embed")


def construct(
    entry: Entry, weights: str, seed: int, image_size: tuple[int, int] | None
) -> tuple[torch.nn.Module, str]:
    """The whole network of ``entry`` with the configured weights, and a description of them.

    ``image_size`` fixes a transformer's token grid (None: the model's default). Under
    ``torch.device("meta")`` this builds a shape-only model: no init, no memory.
    """
    if entry.source == "torchvision":
        builder = getattr(torchvision.models, entry.model)
        model, source = build_with_weights(
            lambda pretrained: builder(weights="DEFAULT" if pretrained else None), entry.name, weights, seed, "torchvision"
        )
        return model.eval(), source
    sized_model = entry.family in SIZED_FAMILIES or (entry.name not in CATALOGUE and _takes_image_size(entry.model))
    sized = {"img_size": image_size} if image_size and sized_model else {}
    model, source = build_with_weights(
        lambda pretrained: timm.create_model(entry.model, pretrained=pretrained, exportable=True, **sized),
        entry.name,
        weights,
        seed,
    )
    return model.eval(), source


def build_extractor(
    name: str, layers: list[str], weights: str, seed: int, image_size: tuple[int, int]
) -> tuple[torch.nn.Module, str]:
    """A module returning the named layers' maps (with ``feature_info``), and its weights' description."""
    entry = resolve(name)
    if name not in CATALOGUE and not _takes_image_size(name) and set(layers) <= set(feature_layers(name)):
        return create_backbone(name, layers, weights, seed)  # anomalib's extraction, unchanged
    model, source = construct(entry, weights, seed, image_size)
    return LayerExtractor(model, layers, image_size), source


def parameter_count(entry: Entry) -> int:
    with torch.device("meta"):
        model, _ = construct(entry, "random", 0, None)
    return sum(p.numel() for p in model.parameters())


def extractable_layers(name: str, image_size: tuple[int, int] = (224, 224)) -> dict[str, Layout]:
    """Modules of ``name`` (up to two path components, as PatchCore looks them up) that output feature maps."""
    with torch.device("meta"):
        model, _ = construct(resolve(name), "random", 0, image_size)
    return module_layouts(model, image_size)
