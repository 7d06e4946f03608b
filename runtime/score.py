"""PatchCore scoring on patch embeddings: nearest-neighbour patch scores, the paper's
k-neighbour reweighting of the image score, and the blurred anomaly map.

Formulas follow anomalib's PatchcoreModel (export/torch_baseline.py is the torch twin).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from patchline.runtime.search.bank_index import SEARCH_DIMS, BankIndex
from patchline.runtime.search.distance import ProjectedSearch, euclidean_dist, nearest, squared_norms

MAP_SIGMA = 4.0
MAP_KERNEL = 2 * int(4.0 * MAP_SIGMA + 0.5) + 1  # 33, as anomalib's AnomalyMapGenerator


SEARCHES = ("auto", "pruned", "plain")


class MemoryBank:
    """The bank rows with their squared norms, and the nearest-row search to run on them.

    ``search``: "auto" runs what the artifact's measurement chose (``BankIndex.choice``; the
    plain search when nothing was measured), "pruned" the projection-bounded
    ``ProjectedSearch`` on the index's leading ``dims`` directions (default: the measured
    choice's, else SEARCH_DIMS), "plain" the blocked GEMM. Both give exact results;
    ``approximate`` (opt-in) prunes without the check. With the index's k-NN graph the
    reweighting reads each row's neighbours instead of searching.
    """

    def __init__(
        self,
        rows: np.ndarray,
        index: BankIndex | None = None,
        dims: int | None = None,
        approximate: bool = False,
        threads: int | None = None,
        source: str | None = None,
        search: str = "auto",
    ) -> None:
        """``source`` names the artifact in errors."""
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.sq_norms = squared_norms(self.rows)
        index = index or BankIndex()
        self.threads = threads
        self.knn = index.knn
        self.search = None
        where = f"{source}: " if source else ""
        if search not in SEARCHES:
            raise ValueError(f"{where}search {search!r}: expected one of {', '.join(SEARCHES)}")
        prune = approximate or search == "pruned" or (search == "auto" and index.prunes)
        if prune and index.basis is None:
            raise ValueError(f"{where}the {'approximate' if approximate else 'pruned'} search needs the bank projection, "
                             f"which this artifact lacks; add it with `patchline index {source or 'ARTIFACT'}`")
        if prune:
            if dims is None:
                dims = index.choice.dims if index.choice else SEARCH_DIMS
            if not 1 <= dims <= index.basis.shape[1]:
                raise ValueError(f"{where}search dims {dims}: the bank projection has {index.basis.shape[1]} "
                                 f"directions; choose 1 to {index.basis.shape[1]}")
            basis = index.basis[:, :dims]
            self.search = ProjectedSearch(self.rows, self.sq_norms, index.mean, basis, approximate, threads)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def nearest(self, x: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        if k == 1 and self.search is not None:
            dist, index = self.search.nearest(x)
            return dist[:, None], index[:, None]
        return nearest(x, self.rows, k, self.sq_norms, threads=self.threads)

    def neighbours(self, row: int, k: int) -> np.ndarray:
        """The ``k`` nearest bank rows of bank row ``row`` (itself first): from the graph when it has them."""
        if self.knn is not None and self.knn.shape[1] >= k:
            return self.knn[row, :k].astype(np.int64)
        return nearest(self.rows[row : row + 1], self.rows, k, self.sq_norms, threads=self.threads)[1][0]


def reweight(
    bank: MemoryBank, patch: np.ndarray, patch_score: float, nn_index: int, num_neighbors: int
) -> float:
    """The paper's image score: s* scaled by 1 − softmax(distances from the patch to m*'s k nearest rows)[0]."""
    if num_neighbors == 1:
        return patch_score
    k = min(num_neighbors, len(bank))
    support = bank.neighbours(nn_index, k)
    # Only the first (m* itself) has a place in the formula; a fixed order for the others makes the
    # softmax sum, and so the score, bit-identical whichever search found them.
    support = np.concatenate([support[:1], np.sort(support[1:])])
    d = euclidean_dist(patch[None, :], bank.rows[support], y_sq=bank.sq_norms[support])[0].astype(np.float64)
    softmax = np.exp(d - d.max())
    softmax /= softmax.sum()
    return float((1.0 - softmax[0]) * patch_score)


def image_score(bank: MemoryBank, patches: np.ndarray, dist: np.ndarray, idx: np.ndarray, num_neighbors: int) -> tuple[float, int]:
    """Image score and the index of the highest-scoring patch, from each patch's nearest distance/row."""
    top = int(np.argmax(dist))
    return reweight(bank, patches[top], float(dist[top]), int(idx[top]), num_neighbors), top


@functools.lru_cache(maxsize=16)
def _nearest_indices(h: int, w: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Source row and column of each output pixel, read-only: the same for every frame of one grid and size."""
    # torch's 'nearest' picks floor(dst · in/out); index arrays reproduce it exactly for any ratio.
    rows = np.minimum((np.arange(height) * (h / height)).astype(np.int64), h - 1)
    cols = np.minimum((np.arange(width) * (w / width)).astype(np.int64), w - 1)
    rows.flags.writeable = cols.flags.writeable = False
    return rows, cols


def anomaly_map(patch_scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Patch scores nearest-upsampled to ``size`` (H, W), then Gaussian-blurred with σ=4."""
    rows, cols = _nearest_indices(*patch_scores.shape, *size)
    upsampled = np.ascontiguousarray(patch_scores[np.ix_(rows, cols)], dtype=np.float32)
    # torch's 'reflect' padding does not repeat the edge pixel: OpenCV's BORDER_REFLECT_101.
    return cv2.GaussianBlur(upsampled, (MAP_KERNEL, MAP_KERNEL), MAP_SIGMA, MAP_SIGMA, cv2.BORDER_REFLECT_101)
