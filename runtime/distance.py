"""Euclidean distances in matrix form, |x|² − 2x·y + |y|², on BLAS, and exact nearest-row searches.

Never ``cdist``: the matrix form turns the bulk of the work into one GEMM, which is
what PatchCore's reference does and what the GPU kernel mirrors. ``euclidean_dist`` is
the reference primitive; ``nearest`` walks the bank in blocks with the minimum fused in,
and ``ProjectedSearch`` rules most bank rows out with lower bounds from an orthonormal
projection before any full-dimension arithmetic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

# Bank rows per block: bounds the temporary distance matrix to queries × BLOCK floats.
BLOCK_ROWS = 4096
# Queries per block of the projected search: its bound matrix (queries × bank rows) stays in cache.
QUERY_BLOCK = 64
# Bank rows lifted at a time by the projected search: bounds its float64 temporaries.
LIFT_ROWS = 4096
# A query left with more candidates than this fraction of the bank (a far outlier patch) is
# checked by the blocked GEMM instead: gathering its rows would cost more than streaming the bank.
CANDIDATE_FRACTION = 1 / 16
UNIT_ROUNDOFF = 2.0**-24  # float32
T = TypeVar("T")


class NonFiniteError(ValueError):
    """NaN or infinity where a score is made (embeddings, distances, the score itself): no verdict can be
    given for that image, and none must be guessed."""


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (taskset, a systemd CPUAffinity or cpuset), not
    the machine's count, so a service confined to some cores does not start a thread per core of the box."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_WORKERS = available_cores()
_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()  # guards the lazily made pool and controller, and the BLAS user count
_blas_users = 0
_blas_controller: ThreadpoolController | None = None  # finding the BLAS libraries takes ~0.5 ms: once
_blas_limiter = None


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """BLAS at one thread while any search runs (searches of several cameras may overlap)."""
    global _blas_users, _blas_controller, _blas_limiter
    with _lock:
        if _blas_users == 0:
            _blas_controller = _blas_controller or ThreadpoolController()
            _blas_limiter = _blas_controller.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()


def _search_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_WORKERS, thread_name_prefix="patchline-search")
        return _pool


def in_row_chunks(fn: Callable[[np.ndarray], T], x: np.ndarray, threads: int | None = None, align: int = 1) -> list[T]:
    """``fn`` on up to ``threads`` contiguous row ranges of ``x`` (multiples of ``align`` rows), in worker threads.

    BLAS is held to one thread meanwhile: the numpy passes between GEMMs then run in parallel
    too, and no BLAS pool is left spinning to fight ONNX Runtime's threads on the next frame
    (measured: `patchline bench`, README).
    """
    pool = _search_pool()
    n = x.shape[0]
    units = -(-n // align)
    parts = max(1, min(threads or _WORKERS, _WORKERS, units))
    cuts = [min(n, align * (units * i // parts)) for i in range(parts + 1)]
    ranges = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a] or [(0, n)]
    with _single_threaded_blas():
        return list(pool.map(lambda r: fn(x[r[0] : r[1]]), ranges))


def squared_norms(x: np.ndarray) -> np.ndarray:
    """Row-wise |x|², in x's float type (float32 for the runtime; float64 gives a precise reference)."""
    return np.einsum("ij,ij->i", x, x, dtype=np.result_type(x.dtype, np.float32))


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
    computed once at load). float32 in, float32 out; float64 in, float64 out.
    """
    return np.sqrt(_squared_dist(x, y, x_sq, y_sq))


def nearest(
    x: np.ndarray,
    bank: np.ndarray,
    k: int = 1,
    bank_sq: np.ndarray | None = None,
    block: int = BLOCK_ROWS,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest bank rows of every query row: distances and indices, both (n, k), ascending.

    The bank is walked in blocks so memory stays at n × block floats whatever its size; the
    queries are split over ``threads`` worker threads (default: one per core).
    """
    m = bank.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"k={k} must be between 1 and the bank size {m}")
    if bank_sq is None:
        bank_sq = squared_norms(bank)
    search = _nearest_one if k == 1 else _nearest_k
    parts = in_row_chunks(lambda chunk: search(chunk, bank, k, bank_sq, block), x, threads)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _nearest_k(
    x: np.ndarray, bank: np.ndarray, k: int, bank_sq: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    n, m = x.shape[0], bank.shape[0]
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
    order = np.lexsort((best_i, best_d), axis=1)
    return np.sqrt(best_d[rows, order]), best_i[rows, order]


def _nearest_one(
    x: np.ndarray, bank: np.ndarray, k: int, bank_sq: np.ndarray, block: int
) -> tuple[np.ndarray, np.ndarray]:
    """k = 1 with the minimum fused into the blocked GEMM: three passes over each block, no concatenation.

    |x|² is the same for every bank row, so it is added once to the minimum instead of to the
    whole block; scaling x by −2 is exact in floating point.
    """
    n, m = x.shape[0], bank.shape[0]
    x_sq = squared_norms(x)
    rows = np.arange(n)
    minus_2x = np.float32(-2.0) * x
    best = np.full(n, np.inf, np.float32)
    best_i = np.zeros(n, np.int64)
    buffer = np.empty((n, min(block, m)), np.float32)
    for start in range(0, m, block):
        stop = min(start + block, m)
        part = buffer[:, : stop - start]
        np.matmul(minus_2x, bank[start:stop].T, out=part)
        part += bank_sq[start:stop]
        j = part.argmin(axis=1)
        value = part[rows, j]
        better = value < best  # strict: the earlier block keeps exact ties, as argmin does within one
        best[better] = value[better]
        best_i[better] = j[better] + start
    best += x_sq
    return np.sqrt(np.maximum(best, 0.0))[:, None], best_i[:, None]


def _direct_sq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Σ(x−y)² row by row in float32: no cancellation, relative error ~1e-6 (pairwise summation)."""
    diff = x - y
    np.square(diff, out=diff)
    return diff.sum(axis=1)


def _sparse_nonzero(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero`` of a mostly-False C-contiguous bool matrix whose width is a multiple of 8.

    Scanning it as 64-bit words finds the few set bytes 8× faster than a byte scan.
    """
    width = mask.shape[1]
    words = np.flatnonzero(mask.view(np.uint64))
    word, byte = np.nonzero(mask.reshape(-1, 8)[words])
    flat = words[word] * 8 + byte
    return flat // width, flat % width


class ProjectedSearch:
    """Exact nearest bank row, ruling rows out with lower bounds from an orthonormal projection.

    With P the orthonormal basis (the bank's top principal directions, computed at export)
    and μ the bank mean, every row y is lifted to [Pᵀ(y−μ), ρ(y)] with ρ the norm of the
    part P does not see; for two lifted points, |x̂ − ŷ| ≤ |x − y| (projection shrinks
    distances and |ρ(x) − ρ(y)| ≤ |residual(x) − residual(y)|). One small GEMM gives this
    bound for every (query, row); the row with the smallest bound gives an upper bound on
    the nearest distance, every row whose bound exceeds it is ruled out, and the few left
    are checked in full dimension. Rounding of the bound arithmetic is covered by a
    margin, so the result is the exact nearest row (ties and ~1e-6 near-ties aside).

    With ``approximate`` the check is skipped: the row with the smallest bound is taken,
    its true distance reported (never below the exact one). Opt-in only.
    """

    def __init__(
        self,
        bank: np.ndarray,
        bank_sq: np.ndarray,
        mean: np.ndarray,
        basis: np.ndarray,
        approximate: bool = False,
        threads: int | None = None,
    ) -> None:
        self.bank, self.bank_sq = bank, bank_sq
        self.approximate = approximate
        self.threads = threads
        self.mean = mean.astype(np.float64)
        # Re-orthonormalise in float64: the bound needs |Pᵀv| ≤ |v| exactly, not up to float32 storage.
        self.basis = np.linalg.qr(basis.astype(np.float64))[0]
        dims = self.basis.shape[1]
        lifted = np.empty((bank.shape[0], dims + 2), np.float32)
        for start in range(0, bank.shape[0], LIFT_ROWS):
            rows = slice(start, start + LIFT_ROWS)
            lifted[rows, :dims], lifted[rows, dims], lifted[rows, dims + 1] = self._project(bank[rows])
        # Rows of the bound GEMM's right operand: [ŷ, |ŷ|²]; queries come as [−2x̂, 1], so one
        # product gives |ŷ|² − 2x̂·ŷ and the bound is that plus |x̂|².
        self.lifted = lifted
        self.max_sq = float(lifted[:, dims + 1].max())
        # fl32 GEMM of dims + 2 terms, plus rounding of both operands to float32 (Higham's γ).
        terms = dims + 2
        self.gamma = terms * UNIT_ROUNDOFF / (1.0 - terms * UNIT_ROUNDOFF) + 2.0 * UNIT_ROUNDOFF

    @property
    def dims(self) -> int:
        return self.basis.shape[1]

    def _project(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The lift of rows ``x`` in float64: Pᵀ(x−μ), ρ(x) and |x−μ|²."""
        centred = x.astype(np.float64) - self.mean
        projected = centred @ self.basis
        centred_sq = np.square(centred).sum(axis=1)
        residual = np.sqrt(np.maximum(centred_sq - np.square(projected).sum(axis=1), 0.0))
        return projected, residual, centred_sq

    def _lift_queries(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        projected, residual, centred_sq = self._project(x)
        lifted = np.empty((x.shape[0], self.dims + 2), np.float32)
        lifted[:, : self.dims] = -2.0 * projected
        lifted[:, self.dims] = -2.0 * residual
        lifted[:, self.dims + 1] = 1.0
        return lifted, centred_sq

    def nearest(self, x: np.ndarray, block: int = QUERY_BLOCK) -> tuple[np.ndarray, np.ndarray]:
        """Nearest bank row of every query row: distances and indices, both (n,)."""
        parts = in_row_chunks(lambda chunk: self._search(chunk, block), x, self.threads, align=block)
        dist = np.concatenate([p[0] for p in parts])
        index = np.concatenate([p[1] for p in parts])
        offsets = np.cumsum([0, *(len(p[0]) for p in parts[:-1])])
        far = np.concatenate([p[2] + offset for p, offset in zip(parts, offsets)])
        if far.size:
            index[far] = nearest(x[far], self.bank, 1, self.bank_sq, threads=self.threads)[1][:, 0]
            dist[far] = np.sqrt(_direct_sq(x[far], self.bank[index[far]]))
        return dist, index

    def _search(self, x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distances, rows, and the queries left with too many candidates (for the blocked search)."""
        n, m = x.shape[0], self.bank.shape[0]
        lifted, query_sq = self._lift_queries(x)
        first = np.empty(n, np.int64)
        first_sq = np.empty(n, np.float32)
        bounds = np.empty((min(block, n), m), np.float32)
        mask = np.zeros((min(block, n), -(-m // 8) * 8), bool)
        most = max(1, int(m * CANDIDATE_FRACTION))
        pair_q, pair_b, crowded = [], [], [np.zeros(0, np.int64)]
        for start in range(0, n, block):
            stop = min(start + block, n)
            part = bounds[: stop - start]
            np.matmul(lifted[start:stop], self.lifted.T, out=part)  # bound² − |x̂|²
            best = part.argmin(axis=1)
            first[start:stop] = best
            first_sq[start:stop] = _direct_sq(x[start:stop], self.bank[best])
            if self.approximate:
                continue
            # Keep row j unless bound²(j) − margin > upper²: then j cannot be nearer than the row found.
            margin = self.gamma * (query_sq[start:stop] + 2.0 * self.max_sq)
            limit = first_sq[start:stop].astype(np.float64) * (1.0 + 1e-5) + margin - query_sq[start:stop]
            limit = np.nextafter(limit.astype(np.float32), np.float32(np.inf))
            rows_mask = mask[: stop - start]
            np.less_equal(part, limit[:, None], out=rows_mask[:, :m])
            q, b = _sparse_nonzero(rows_mask)
            many = np.bincount(q, minlength=stop - start) > most
            if many.any():
                crowded.append(np.flatnonzero(many) + start)
            keep = (b != best[q]) & ~many[q]  # the first row is checked already
            pair_q.append(q[keep] + start)
            pair_b.append(b[keep])
        if self.approximate:
            return np.sqrt(first_sq), first, crowded[0]
        q, b = np.concatenate(pair_q), np.concatenate(pair_b)
        dist_sq = np.concatenate([first_sq, _direct_sq(x[q], self.bank[b])])
        q, b = np.concatenate([np.arange(n), q]), np.concatenate([first, b])
        order = np.lexsort((b, dist_sq, q))  # per query: smallest distance, then lowest row
        q, b, dist_sq = q[order], b[order], dist_sq[order]
        head = np.ones(len(q), bool)
        head[1:] = q[1:] != q[:-1]
        return np.sqrt(dist_sq[head]), b[head], np.concatenate(crowded)
