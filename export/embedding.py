"""Locally aware patch features, as anomalib's PatchcoreModel computes them.

Each layer's map is 3×3 average-pooled (stride 1, padding 1); deeper layers are
bilinearly upsampled (align_corners=False) to the first layer's grid; all are
concatenated in layer order. The output is channels-last (N, h, w, D) so that
row-major flattening gives one embedding row per patch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from patchline.export.backbone import create_backbone
from patchline.export.catalogue import build_extractor
from patchline.export.ensemble import PatchCoreEmbedding
from patchline.export.extractor import layer_order
from patchline.export.config import ModelConfig


class PatchEmbedding(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        # Keep the user's layer order for concatenation.
        self.order = layer_order(backbone, layers)
        self.pool = torch.nn.AvgPool2d(kernel_size=3, stride=1, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        maps = [self.pool(features[i]) for i in self.order]
        grid = maps[0].shape[-2:]
        maps = [maps[0]] + [F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps[1:]]
        return torch.cat(maps, dim=1).permute(0, 2, 3, 1)


def build_embedding(name: str, layers: list[str], weights: str, seed: int = 0) -> tuple[PatchEmbedding, str]:
    backbone, source = create_backbone(name, layers, weights, seed)
    return PatchEmbedding(backbone, layers).eval(), source


def build_from_config(model: ModelConfig, image_size: tuple[int, int]) -> tuple[torch.nn.Module, str]:
    """The embedding module a model config asks for, and a description of its weights.

    One backbone without mean-mapping dimensions: anomalib's embedding (the default's exact path for a
    timm name with features_only layers). An ensemble, or explicit dimensions: the original PatchCore's.
    """
    parts = [
        build_extractor(name, layers, weights, model.seed, image_size)
        for name, layers, weights in zip(model.backbones, model.layers_by_backbone(), model.weights_by_backbone())
    ]
    sources = "; ".join(source for _, source in parts)
    dims = model.embed_dimensions()
    if dims is None:
        return PatchEmbedding(parts[0][0], model.layers).eval(), sources
    return PatchCoreEmbedding([module for module, _ in parts], model.layers_by_backbone(), *dims).eval(), sources


def backbone_label(model: ModelConfig) -> str:
    """The backbone's name for the manifest and model id; an ensemble's names joined by "+"."""
    return "+".join(model.backbones)
