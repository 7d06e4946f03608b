"""PatchCore's scoring in plain torch, written from anomalib's PatchcoreModel
(src/anomalib/models/image/patchcore/), independent of patchline's numpy runtime it checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    return (x_norm - 2 * torch.matmul(x, y.transpose(-2, -1)) + y_norm.transpose(-2, -1)).clamp_min(0).sqrt()


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
