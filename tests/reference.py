"""Plain-torch PatchCore, written from the reference formulas (anomalib's PatchcoreModel).

Independent of patchline's code on purpose: the tests check the ONNX + numpy runtime
against this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x_norm = x.pow(2).sum(dim=-1, keepdim=True)
    y_norm = y.pow(2).sum(dim=-1, keepdim=True)
    res = x_norm - 2 * torch.matmul(x, y.transpose(-2, -1)) + y_norm.transpose(-2, -1)
    return res.clamp_min(0).sqrt()


def generate_embedding(features: list[torch.Tensor]) -> torch.Tensor:
    pooled = [F.avg_pool2d(f, 3, 1, 1) for f in features]
    embeddings = pooled[0]
    for layer in pooled[1:]:
        layer = F.interpolate(layer, size=embeddings.shape[-2:], mode="bilinear")
        embeddings = torch.cat((embeddings, layer), 1)
    return embeddings


def nearest_neighbors(embedding: torch.Tensor, bank: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    distances = euclidean_dist(embedding, bank)
    if n == 1:
        return distances.min(1)
    return distances.topk(k=n, largest=False, dim=1)


def compute_anomaly_score(patch_scores, locations, embedding, bank, num_neighbors):
    if num_neighbors == 1:
        return patch_scores.amax(1)
    batch_size, num_patches = patch_scores.shape
    max_patches = torch.argmax(patch_scores, dim=1)
    max_patches_features = embedding.reshape(batch_size, num_patches, -1)[torch.arange(batch_size), max_patches]
    score = patch_scores[torch.arange(batch_size), max_patches]
    nn_index = locations[torch.arange(batch_size), max_patches]
    nn_sample = bank[nn_index, :]
    _, support_samples = nearest_neighbors(nn_sample, bank, n=min(num_neighbors, bank.shape[0]))
    distances = euclidean_dist(max_patches_features.unsqueeze(1), bank[support_samples])
    weights = (1 - F.softmax(distances.squeeze(1), 1))[..., 0]
    return weights * score


def gaussian_blur(amap: torch.Tensor, sigma: float = 4.0) -> torch.Tensor:
    kernel_size = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    k1 = torch.exp(-(x**2) / (2 * sigma**2))
    k1 = (k1 / k1.sum()).to(amap.dtype)
    kernel = (k1[:, None] * k1[None, :])[None, None]
    pad = kernel_size // 2
    return F.conv2d(F.pad(amap, (pad, pad, pad, pad), mode="reflect"), kernel)


def patchcore_forward(features: list[torch.Tensor], bank: torch.Tensor, num_neighbors: int, image_size):
    """Features of the chosen layers (in order) → (image scores (B,), anomaly maps (B,1,H,W), embedding)."""
    embedding = generate_embedding(features)
    batch, dim, h, w = embedding.shape
    flat = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
    patch_scores, locations = nearest_neighbors(flat, bank, 1)
    patch_scores = patch_scores.reshape(batch, -1)
    locations = locations.reshape(batch, -1)
    scores = compute_anomaly_score(patch_scores, locations, flat, bank, num_neighbors)
    maps = F.interpolate(patch_scores.reshape(batch, 1, h, w), size=image_size)
    return scores, gaussian_blur(maps), embedding

