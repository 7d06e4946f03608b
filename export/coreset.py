"""Greedy k-center coreset subsampling of the patch embeddings into the memory bank.

As in PatchCore, the rows are first mapped through a seeded Gaussian random
projection (distances roughly preserved, far less memory traffic per step); each
step adds the row farthest from the centres chosen so far. Distances use the
runtime's ``euclidean_dist``.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from patchline.runtime.search.distance import euclidean_dist, nearest, squared_norms


def random_projection(rows: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Project rows to ``dim`` dimensions with a seeded Gaussian matrix (identity when dim is 0 or ≥ d)."""
    if dim <= 0 or dim >= rows.shape[1]:
        return rows
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows.shape[1], dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    out = np.empty((rows.shape[0], dim), np.float32)
    for start in range(0, rows.shape[0], 65536):  # bounded temporaries on big embedding sets
        out[start : start + 65536] = rows[start : start + 65536] @ matrix
    return out


def greedy_coreset(
    rows: np.ndarray, ratio: float, projection_dim: int = 128, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """Indices of the selected rows, in selection order; deterministic for a given seed."""
    n = rows.shape[0]
    size = max(1, int(round(n * ratio)))
    if size >= n:
        return np.arange(n)
    points = random_projection(rows, projection_dim, seed)
    sq = squared_norms(points)
    first = int(np.random.default_rng(seed).integers(n))
    selected = np.empty(size, np.int64)
    selected[0] = first
    min_dist = euclidean_dist(points, points[first : first + 1], x_sq=sq, y_sq=sq[first : first + 1])[:, 0]
    for step in tqdm(range(1, size), desc="coreset", unit="row", disable=not progress, mininterval=1.0):
        chosen = int(np.argmax(min_dist))
        selected[step] = chosen
        d = euclidean_dist(points, points[chosen : chosen + 1], x_sq=sq, y_sq=sq[chosen : chosen + 1])[:, 0]
        np.minimum(min_dist, d, out=min_dist)
    return selected


def covering_radius(rows: np.ndarray, centres: np.ndarray) -> float:
    """Largest distance from any row to its nearest centre (the k-center objective)."""
    return float(nearest(rows, rows[centres], 1)[0].max())
