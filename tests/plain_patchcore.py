"""PatchCore's scoring in plain torch, written from anomalib's PatchcoreModel and AnomalyMapGenerator
(src/anomalib/models/image/patchcore/), independent of patchline's numpy runtime it checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    return (x_norm - 2 * torch.matmul(x, y.transpose(-2, -1)) + y_norm.transpose(-2, -1)).clamp_min(0).sqrt()


def anomalib_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    """PatchcoreModel: AvgPool2d(3, 1, 1) per layer, bilinear to the first layer's grid, concatenated (N, D, h, w)."""
    pooled = [F.avg_pool2d(f, 3, 1, 1) for f in features]
    embedding = pooled[0]
    for layer in pooled[1:]:
        embedding = torch.cat((embedding, F.interpolate(layer, size=embedding.shape[-2:], mode="bilinear")), 1)
    return embedding


def score(embedding: torch.Tensor, bank: torch.Tensor, num_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """compute_anomaly_score on channels-last embeddings (N, h, w, D): image scores (N,), patch scores (N, h, w)."""
    batch, h, w, dim = embedding.shape
    flat = embedding.reshape(-1, dim)
    patch_scores, locations = euclidean_dist(flat, bank).min(1)
    patch_scores, locations = patch_scores.reshape(batch, -1), locations.reshape(batch, -1)
    if num_neighbors == 1:
        return patch_scores.amax(1), patch_scores.reshape(batch, h, w)
    rows = torch.arange(batch)
    top = torch.argmax(patch_scores, dim=1)
    top_features = flat.reshape(batch, h * w, -1)[rows, top]
    nearest = bank[locations[rows, top]]
    _, support = euclidean_dist(nearest, bank).topk(k=min(num_neighbors, len(bank)), largest=False, dim=1)
    distances = euclidean_dist(top_features.unsqueeze(1), bank[support])
    weights = (1 - F.softmax(distances.squeeze(1), 1))[..., 0]
    return weights * patch_scores[rows, top], patch_scores.reshape(batch, h, w)


def anomaly_map(patch_scores: torch.Tensor, size: tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """AnomalyMapGenerator: nearest upsampling to ``size``, Gaussian blur (reflect padding)."""
    maps = F.interpolate(patch_scores.unsqueeze(1), size=size)
    kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = (k1 / k1.sum()).to(maps.dtype)
    pad = kernel_size // 2
    blurred = F.conv2d(F.pad(maps, (pad, pad, pad, pad), mode="reflect"), (k1[:, None] * k1[None, :])[None, None])
    return blurred[:, 0]
