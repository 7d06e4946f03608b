"""Euclidean distances in matrix form, |x|² − 2x·y + |y|², on BLAS, and exact nearest-row searches.

Never ``cdist``: the matrix form turns the bulk of the work into one GEMM, which is
what PatchCore's reference does and what the GPU kernel mirrors. ``euclidean_dist`` is
the reference primitive; ``nearest`` walks the bank in blocks with the minimum fused in,
and ``ProjectedSearch`` rules most bank rows out with lower bounds from an orthonormal
projection before any full-dimension arithmetic.
"""

from __future__ import annotations

import os
import platform
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

# Bank rows per block: bounds the temporary distance matrix to queries × BLOCK floats.
BLOCK_ROWS = 4096
# Queries per block of the projected search: its bound matrix (queries × bank rows) stays in cache.
QUERY_BLOCK = 64
# Bank rows lifted at a time by the projected search: bounds its float64 temporaries.
LIFT_ROWS = 4096
# Bank rows per cluster of the pruned search (checked a cluster at a time, by GEMM), and the
# k-means iterations that make the clusters at load.
CLUSTER_ROWS = 64
KMEANS_ITERATIONS = 8
# A query whose candidate clusters cover more than this fraction of the bank is searched by the
# blocked GEMM instead: checking clusters costs more per row than streaming the whole bank.
FALLBACK_FRACTION = 0.5
# Once more than this fraction of a call's queries fell back, the rest skip the bounds too.
GIVE_UP_FRACTION = 0.9
# A query block left with at most this many candidate rows per query has them measured pair by
# pair (Σ(x−y)²); with more, whole clusters are checked by GEMM, ~20× cheaper per row.
DIRECT_PAIRS = 4
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


def cpu_model() -> str:
    """The processor's model name (/proc/cpuinfo), for results that depend on the machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


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

    |x|² is the same for every bank row, so it is left out of the minimum; scaling x by −2 is
    exact in floating point. The nearest row's distance is then measured as Σ(x−y)²: the matrix
    form cancels for close pairs (~1e-4 relative error in float32, which the anomaly map shows),
    Σ(x−y)² does not, and it costs one row per query.
    """
    n, m = x.shape[0], bank.shape[0]
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
    return np.sqrt(_direct_sq(x, bank[best_i]))[:, None], best_i[:, None]


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


def _kmeans_order(coords: np.ndarray, clusters: int, iterations: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by a seeded k-means of ``coords``: the row order (cluster by cluster) and each cluster's start."""
    rows = coords.shape[0]
    rng = np.random.default_rng(seed)
    centres = coords[np.sort(rng.choice(rows, clusters, replace=False))].astype(np.float32)
    labels = np.zeros(rows, np.int64)
    for _ in range(iterations):
        scores = coords @ centres.T
        scores *= -2.0
        scores += squared_norms(centres)
        labels = scores.argmin(axis=1)
        members = np.zeros((clusters, rows), np.float32)
        members[labels, np.arange(rows)] = 1.0
        counts = members.sum(axis=1)
        filled = counts > 0  # an emptied cluster keeps its centre
        centres[filled] = (members @ coords)[filled] / counts[filled, None]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=clusters)
    return order, np.concatenate([[0], np.cumsum(counts[counts > 0])])


@dataclass
class SearchStats:
    """What one search call did: how much of the (query × bank row) work the bounds saved."""

    queries: int = 0
    bank_rows: int = 0
    rows_checked: int = 0  # full-dimension distances computed (whole clusters, or the whole bank)
    queries_unpruned: int = 0  # queries searched by the blocked GEMM (bounds too weak for them)

    @property
    def pruning_rate(self) -> float:
        """Fraction of the plain search's (query, row) distances that the bounds ruled out."""
        total = self.queries * self.bank_rows
        return 1.0 - self.rows_checked / total if total else 0.0

    def add(self, other: SearchStats) -> None:
        self.queries += other.queries
        self.rows_checked += other.rows_checked
        self.queries_unpruned += other.queries_unpruned


class ProjectedSearch:
    """Exact nearest bank row, ruling rows out with lower bounds from an orthonormal projection.

    With P the orthonormal basis (the bank's top principal directions, computed at export)
    and μ the bank mean, every row y is lifted to [Pᵀ(y−μ), ρ(y)] with ρ the norm of the
    part P does not see; for two lifted points, |x̂ − ŷ| ≤ |x − y| (projection shrinks
    distances and |ρ(x) − ρ(y)| ≤ |residual(x) − residual(y)|). One small GEMM gives this
    bound for every (query, row); the row with the smallest bound gives an upper bound on
    the nearest distance, and every row whose bound exceeds it is ruled out.

    Rows left are checked in full dimension, as cheaply as their number allows: a query
    block with at most DIRECT_PAIRS candidates per query has them measured pair by pair;
    with more, one GEMM per cluster of about CLUSTER_ROWS rows (a seeded k-means of the
    projected bank, made at load; the bank is held in cluster order) for all the queries
    with a candidate in it, since measuring rows one pair at a time costs ~20× more per row
    than a GEMM. Rounding of the bounds and of the GEMM's matrix-form distances is covered
    by margins (Higham's γ), and the rows the matrix form cannot separate from the best are
    measured by Σ(x−y)², so the result is the exact nearest row (ties and ~1e-6 near-ties
    aside; ties go to the lowest row).

    A query whose candidate clusters cover more than FALLBACK_FRACTION of the bank gets the
    plain blocked GEMM's answer instead, and once more than GIVE_UP_FRACTION of a call's
    queries did, the rest skip the bounds too: a frame the bounds cannot prune costs about
    what the plain search costs. ``stats`` says what the last call pruned.

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
        with _single_threaded_blas():  # multithreaded OpenBLAS QR took 2.3 s instead of 25 ms on a busy 2-core box
            self._prepare(bank, bank_sq, mean, basis)
        self.approximate = approximate
        self.threads = threads
        self.stats = SearchStats(bank_rows=bank.shape[0])

    def _prepare(self, bank: np.ndarray, bank_sq: np.ndarray, mean: np.ndarray, basis: np.ndarray) -> None:
        self.mean = mean.astype(np.float64)
        # Re-orthonormalise in float64: the bound needs |Pᵀv| ≤ |v| exactly, not up to float32 storage.
        self.basis = np.linalg.qr(basis.astype(np.float64))[0]
        dims = self.basis.shape[1]
        lifted = np.empty((bank.shape[0], dims + 2), np.float32)
        for start in range(0, bank.shape[0], LIFT_ROWS):
            rows = slice(start, start + LIFT_ROWS)
            lifted[rows, :dims], lifted[rows, dims], lifted[rows, dims + 1] = self._project(bank[rows])
        clusters = max(1, -(-bank.shape[0] // CLUSTER_ROWS))
        self.order, self.starts = _kmeans_order(lifted[:, :dims], clusters, KMEANS_ITERATIONS)
        # The bank in cluster order (a copy: the caller keeps its own order); results map back through order.
        self.rows = np.ascontiguousarray(bank[self.order])
        self.rows_sq = np.ascontiguousarray(bank_sq[self.order])
        # Rows of the bound GEMM's right operand: [ŷ, |ŷ|²]; queries come as [−2x̂, 1], so one
        # product gives |ŷ|² − 2x̂·ŷ and the bound is that plus |x̂|².
        self.lifted = np.ascontiguousarray(lifted[self.order])
        self.max_sq = float(lifted[:, dims + 1].max())
        self.max_norm = float(np.sqrt(bank_sq.max())) if bank.shape[0] else 0.0
        # fl32 GEMM of dims + 2 terms, plus rounding of both operands to float32 (Higham's γ).
        terms = dims + 2
        self.gamma = terms * UNIT_ROUNDOFF / (1.0 - terms * UNIT_ROUNDOFF) + 2.0 * UNIT_ROUNDOFF
        # The matrix form |x|² − 2x·y + |y|² in float32 over the full dimension.
        terms = bank.shape[1] + 2
        self.gamma_full = terms * UNIT_ROUNDOFF / (1.0 - terms * UNIT_ROUNDOFF)

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
        """Nearest bank row of every query row: distances and indices (the caller's row numbers), both (n,)."""
        parts = in_row_chunks(lambda chunk: self._search(chunk, block), x, self.threads, align=block)
        self.stats = SearchStats(bank_rows=self.rows.shape[0])
        for part in parts:
            self.stats.add(part[2])
        return np.concatenate([p[0] for p in parts]), self.order[np.concatenate([p[1] for p in parts])]

    def _search(self, x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, SearchStats]:
        """Distances and positions (in cluster order) of the nearest rows of ``x``, and what was pruned."""
        n, m = x.shape[0], self.rows.shape[0]
        stats = SearchStats(queries=n, bank_rows=m)
        x_sq = squared_norms(x)
        sizes = np.diff(self.starts)
        bounds = np.empty((min(block, n), m), np.float32)
        mask = np.zeros((min(block, n), -(-m // 8) * 8), bool)
        first = np.zeros(n, np.int64)
        first_sq = np.zeros(n, np.float32)
        needs = np.zeros((n, len(sizes)), bool)
        unpruned = np.zeros(n, bool)
        pair_q, pair_i = [], []
        for start in range(0, n, block):
            stop = min(start + block, n)
            if start and np.count_nonzero(unpruned[:start]) > GIVE_UP_FRACTION * start:
                unpruned[start:] = True  # the bounds failed nearly every query so far: they will fail the rest
                stats.rows_checked += (n - start) * m
                break
            lifted, query_sq = self._lift_queries(x[start:stop])
            part = bounds[: stop - start]
            np.matmul(lifted, self.lifted.T, out=part)  # bound² − |x̂|²
            first[start:stop] = part.argmin(axis=1)
            if self.approximate:
                continue
            first_sq[start:stop] = _direct_sq(x[start:stop], self.rows[first[start:stop]])
            # Keep row j unless bound²(j) − margin > the first row's distance²: then j cannot be nearer.
            margin = self.gamma * (query_sq + 2.0 * self.max_sq)
            limit = first_sq[start:stop].astype(np.float64) * (1.0 + 1e-5) + margin - query_sq
            limit = np.nextafter(limit.astype(np.float32), np.float32(np.inf))
            rows_mask = mask[: stop - start]
            np.less_equal(part, limit[:, None], out=rows_mask[:, :m])
            if np.count_nonzero(rows_mask) <= DIRECT_PAIRS * (stop - start):
                q, j = _sparse_nonzero(rows_mask)  # few candidates: measured one by one
                other = j != first[start:stop][q]  # the first row is measured already
                pair_q.append(q[other] + start)
                pair_i.append(j[other])
                stats.rows_checked += len(q)
                continue
            need = np.minimum.reduceat(part, self.starts[:-1], axis=1) <= limit[:, None]
            work = need @ sizes
            crowded = work > FALLBACK_FRACTION * m
            unpruned[start:stop] = crowded
            needs[start:stop] = need & ~crowded[:, None]
            stats.rows_checked += int(work[~crowded].sum()) + int(crowded.sum()) * m
        if self.approximate:
            return np.sqrt(_direct_sq(x, self.rows[first])), first, stats
        found = [(np.arange(n), first, first_sq)]
        if pair_q:
            q, i = np.concatenate(pair_q), np.concatenate(pair_i)
            found.append((q, i, _direct_sq(x[q], self.rows[i])))
        found.append(self._check_clusters(x, x_sq, needs))
        dist_sq, index = _nearest_found(found, self.order, n)
        if unpruned.any():
            rows = np.flatnonzero(unpruned)
            plain_d, plain_i = _nearest_one(x[rows], self.rows, 1, self.rows_sq, BLOCK_ROWS)
            dist_sq[rows], index[rows] = np.square(plain_d[:, 0]), plain_i[:, 0]
            stats.queries_unpruned = len(rows)
        return np.sqrt(dist_sq), index, stats

    def _check_clusters(self, x: np.ndarray, x_sq: np.ndarray, needs: np.ndarray) -> Found:
        """Full-dimension distances to every needed cluster, one GEMM per cluster for the queries that need it.

        Returns each query's best row by the matrix form with its near-ties: a row whose
        matrix-form distance² exceeds the best by more than twice the rounding slack cannot
        be nearest; those left are measured by Σ(x−y)².
        """
        # Largest rounding error of a matrix-form distance² from each query to any row.
        slack = self.gamma_full * np.square(np.sqrt(x_sq.astype(np.float64)) + self.max_norm)
        best = np.full(len(x), np.inf)
        tie_q, tie_i, tie_d = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for c in np.flatnonzero(needs.any(axis=0)):
            queries = np.flatnonzero(needs[:, c])
            lo, hi = self.starts[c], self.starts[c + 1]
            d = x[queries] @ self.rows[lo:hi].T
            d *= -2.0
            d += self.rows_sq[lo:hi]
            d += x_sq[queries, None]
            low = d.min(axis=1)
            np.minimum.at(best, queries, low)
            q, j = np.nonzero(d <= (low + 2.0 * slack[queries])[:, None])
            tie_q.append(queries[q])
            tie_i.append(j + lo)
            tie_d.append(d[q, j])
        q, i, d = np.concatenate(tie_q), np.concatenate(tie_i), np.concatenate(tie_d)
        near = d <= best[q] + 2.0 * slack[q]
        q, i = q[near], i[near]
        return q, i, _direct_sq(x[q], self.rows[i])


Found = tuple[np.ndarray, np.ndarray, np.ndarray]  # query, row position, exact distance² of measured pairs


def _nearest_found(found: list[Found], order: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the measured row with the smallest distance² (ties: the lowest row in the caller's numbering)."""
    q, i, dist_sq = (np.concatenate(parts) for parts in zip(*found))
    ranked = np.lexsort((order[i], dist_sq, q))
    q, i, dist_sq = q[ranked], i[ranked], dist_sq[ranked]
    head = np.ones(len(q), bool)
    head[1:] = q[1:] != q[:-1]
    nearest_sq, index = np.zeros(n, np.float32), np.zeros(n, np.int64)
    nearest_sq[q[head]], index[q[head]] = dist_sq[head], i[head]
    return nearest_sq, index
