"""Euclidean distances in matrix form, |x|² − 2x·y + |y|², on BLAS.

Never ``cdist``: the matrix form turns the bulk of the work into one GEMM, which is
what PatchCore's reference does and what the GPU kernel mirrors.
"""

from __future__ import annotations

import numpy as np

# Bank rows per block: bounds the temporary distance matrix to queries × BLOCK floats.
BLOCK_ROWS = 4096


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Row-wise |x|² as float32."""
    return np.einsum("ij,ij->i", x, x, dtype=np.float32)


def _squared_dist(
    x: np.ndarray, y: np.ndarray, x_sq: np.ndarray | None = None, y_sq: np.ndarray | None = None
) -> np.ndarray:
    out = x @ y.T
    out *= -2.0
    out += (squared_norms(x) if x_sq is None else x_sq)[:, None]
    out += (squared_norms(y) if y_sq is None else y_sq)[None, :]
    np.maximum(out, 0.0, out=out)
    return out


def euclidean_dist(
    x: np.ndarray, y: np.ndarray, x_sq: np.ndarray | None = None, y_sq: np.ndarray | None = None
) -> np.ndarray:
    """Pairwise distances (n, m) between rows of ``x`` (n, d) and ``y`` (m, d).

    ``x_sq``/``y_sq`` are optional precomputed squared row norms (the bank's are
    computed once at load).
    """
    return np.sqrt(_squared_dist(x, y, x_sq, y_sq), dtype=np.float32)


def nearest(
    x: np.ndarray, bank: np.ndarray, k: int = 1, bank_sq: np.ndarray | None = None, block: int = BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest bank rows of every query row: distances and indices, both (n, k), ascending.

    The bank is walked in blocks so memory stays at n × block floats whatever its size.
    """
    n, m = x.shape[0], bank.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the bank size {m}")
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    x_sq = squared_norms(x)
    rows = np.arange(n)[:, None]
    best_d = np.full((n, 0), np.inf, np.float32)
    best_i = np.zeros((n, 0), np.int64)
    for start in range(0, m, block):
        stop = min(start + block, m)
        d = _squared_dist(x, bank[start:stop], x_sq, bank_sq[start:stop])
        cand_d = np.concatenate([best_d, d], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(start, stop), (n, stop - start))], axis=1)
        if cand_d.shape[1] > k:
            keep = np.argpartition(cand_d, k - 1, axis=1)[:, :k]
            cand_d, cand_i = cand_d[rows, keep], cand_i[rows, keep]
        best_d, best_i = cand_d, cand_i
    order = np.lexsort((best_i, best_d), axis=1) if k > 1 else np.zeros((n, 1), np.int64)
    return np.sqrt(best_d[rows, order]), best_i[rows, order]
