"""The original PatchCore's patch embedding, for one backbone or an ensemble of several.

As PatchCore's ``_embed`` (patchcore.py / common.py): per layer, every 3×3 neighbourhood is unfolded
(zero padding, torch's Unfold order: channel, row, column), adaptive-averaged to ``pretrain_dim``
(``MeanMapper``) and bilinearly resized (align_corners=False) to the reference grid, the first layer's;
per backbone, its layers' vectors are concatenated and adaptive-averaged to ``target_dim``
(``Aggregator``). Mapping before resizing gives the same numbers as the original's resizing before
mapping (one is linear over channels, the other over positions) while resizing far fewer channels.

An ensemble runs its backbones in one graph on the first backbone's first-layer grid and concatenates
their embeddings: ``len(backbones) × target_dim`` dimensions, one memory bank, a joint nearest
neighbour. (PatchCore itself kept a bank per backbone and averaged their normalised scores; one bank
keeps the runtime's contract, (N, h, w, D) embeddings, unchanged.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from patchline.export.extractor import layer_order

PATCH_SIZE = 3


def unfold_patches(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) → (N, C·9, h, w): each position's zero-padded 3×3 neighbourhood, in torch.nn.Unfold's order."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    shifts = [padded[:, :, dy : dy + h, dx : dx + w] for dy in range(PATCH_SIZE) for dx in range(PATCH_SIZE)]
    return torch.stack(shifts, dim=2).reshape(n, c * PATCH_SIZE * PATCH_SIZE, h, w)


class AdaptiveMean(torch.nn.Module):
    """``F.adaptive_avg_pool1d`` over the channel axis of (N, C, h, w) maps, as a gather and a weighted sum.

    Output channel i averages input channels floor(i·C/out) … ceil((i+1)·C/out) − 1, as torch does; the
    gather form exports to ONNX for any sizes (ONNX's pooling needs the output to divide the input).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        starts = [(i * in_dim) // out_dim for i in range(out_dim)]
        ends = [math.ceil((i + 1) * in_dim / out_dim) for i in range(out_dim)]
        width = max(e - s for s, e in zip(starts, ends))
        index = torch.tensor([[min(s + k, e - 1) for k in range(width)] for s, e in zip(starts, ends)])
        weight = torch.tensor([[1.0 / (e - s) if k < e - s else 0.0 for k in range(width)] for s, e in zip(starts, ends)])
        self.out_dim, self.width = out_dim, width
        self.register_buffer("index", index.reshape(-1), persistent=False)
        self.register_buffer("weight", weight[:, :, None, None], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        picked = x.index_select(1, self.index)
        picked = picked.reshape(x.shape[0], self.out_dim, self.width, *x.shape[2:])
        return (picked * self.weight).sum(dim=2)


class PatchCoreEmbedding(torch.nn.Module):
    """Backbones (each returning its layers' maps, described by ``feature_info``) → (N, h, w, B·target_dim)."""

    def __init__(
        self, backbones: list[torch.nn.Module], layers: list[list[str]], pretrain_dim: int, target_dim: int
    ) -> None:
        super().__init__()
        self.backbones = torch.nn.ModuleList(backbones)
        self.orders = [layer_order(b, group) for b, group in zip(backbones, layers)]
        channels = [[b.feature_info.channels()[i] for i in order] for b, order in zip(backbones, self.orders)]
        pixels = PATCH_SIZE * PATCH_SIZE
        self.mappers = torch.nn.ModuleList(
            torch.nn.ModuleList(AdaptiveMean(c * pixels, pretrain_dim) for c in group) for group in channels
        )
        self.aggregators = torch.nn.ModuleList(AdaptiveMean(len(group) * pretrain_dim, target_dim) for group in layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = None
        embeddings = []
        for backbone, order, mappers, aggregate in zip(self.backbones, self.orders, self.mappers, self.aggregators):
            features = backbone(images)
            mapped = []
            for i, mapper in zip(order, mappers):
                x = mapper(unfold_patches(features[i]))
                grid = x.shape[-2:] if grid is None else grid
                if x.shape[-2:] != grid:
                    x = F.interpolate(x, size=grid, mode="bilinear", align_corners=False)
                mapped.append(x)
            embeddings.append(aggregate(torch.cat(mapped, dim=1)))
        return torch.cat(embeddings, dim=1).permute(0, 2, 3, 1)
