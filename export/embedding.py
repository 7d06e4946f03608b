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


class PatchEmbedding(torch.nn.Module):
    def __init__(self, backbone: torch.nn.Module, layers: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        produced = backbone.feature_info.module_name()
        # timm returns features in network order; keep the user's layer order for concatenation.
        self.order = [produced.index(layer) for layer in layers]
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
