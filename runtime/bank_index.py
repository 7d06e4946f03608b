"""The memory bank's search index: computed once at export, stored beside the bank.

    bank_projection.npz  the bank mean and its top principal directions, for the exact
                         projected search's lower bounds (runtime.distance.ProjectedSearch)
    bank_knn.npy         int32 (rows, k): every bank row's k nearest bank rows, itself first,
                         so the reweighting needs no second bank-wide search per frame

Both are listed in ``Manifest.extra_files`` (so checksummed); an artifact without them
still loads and scores, with the plain blocked search.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, ArtifactError
from patchline.runtime.distance import nearest, squared_norms

log = logging.getLogger("patchline.bank_index")

PROJECTION_KEY, PROJECTION_FILE = "bank_projection", "bank_projection.npz"
KNN_KEY, KNN_FILE = "bank_knn", "bank_knn.npy"
# Principal directions stored; the search uses the leading ones (see SEARCH_DIMS).
STORED_DIMS = 128
# Directions the exact search projects on by default: measured with `patchline bench --dims` (README).
SEARCH_DIMS = 64
_CHUNK = 2048  # rows per step when building: bounded temporaries on big banks


@dataclass(frozen=True)
class BankIndex:
    mean: np.ndarray | None = None  # (D,) float32
    basis: np.ndarray | None = None  # (D, R) float32, orthonormal columns, leading variance first
    knn: np.ndarray | None = None  # (rows, k) int32


def principal_directions(bank: np.ndarray, dims: int = STORED_DIMS) -> tuple[np.ndarray, np.ndarray]:
    """The bank mean and its ``dims`` leading principal directions (columns), as float32."""
    mean = bank.mean(axis=0, dtype=np.float64)
    mean32 = mean.astype(np.float32)
    scatter = np.zeros((bank.shape[1], bank.shape[1]), np.float64)
    for start in range(0, bank.shape[0], _CHUNK):
        chunk = bank[start : start + _CHUNK] - mean32
        scatter += chunk.T @ chunk
    _, vectors = np.linalg.eigh(scatter)  # ascending eigenvalues
    dims = min(dims, bank.shape[1])
    return mean32, np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)


def knn_graph(bank: np.ndarray, k: int) -> np.ndarray:
    """Every bank row's ``k`` nearest rows (distance, then index), by the same blocked search as at runtime."""
    k = min(k, bank.shape[0])
    bank_sq = squared_norms(bank)
    graph = np.empty((bank.shape[0], k), np.int32)
    for start in range(0, bank.shape[0], _CHUNK // 2):
        stop = min(start + _CHUNK // 2, bank.shape[0])
        graph[start:stop] = nearest(bank[start:stop], bank, k, bank_sq)[1]
    return graph


def build_index(bank: np.ndarray, num_neighbors: int, dims: int = STORED_DIMS) -> BankIndex:
    mean, basis = principal_directions(bank, dims)
    return BankIndex(mean, basis, knn_graph(bank, num_neighbors) if num_neighbors > 1 else None)


def write_index(folder: str | Path, index: BankIndex) -> dict[str, str]:
    """Write the index files; returns the entries to put in ``Manifest.extra_files``."""
    folder = Path(folder)
    extra = {}
    if index.basis is not None:
        np.savez(folder / PROJECTION_FILE, mean=index.mean, basis=index.basis)
        extra[PROJECTION_KEY] = PROJECTION_FILE
    if index.knn is not None:
        np.save(folder / KNN_FILE, index.knn)
        extra[KNN_KEY] = KNN_FILE
    return extra


def read_index(artifact: Artifact) -> BankIndex:
    """The artifact's index files (already checksummed by load_artifact); absent ones are None."""
    extra = artifact.manifest.extra_files
    rows, dim = artifact.bank.shape
    mean = basis = knn = None
    if PROJECTION_KEY in extra:
        path = artifact.file(extra[PROJECTION_KEY])
        try:
            with np.load(path, allow_pickle=False) as data:
                mean, basis = data["mean"], data["basis"]
        except (ValueError, KeyError, OSError) as exc:
            raise ArtifactError(f"{path}: not a bank projection file with 'mean' and 'basis' ({exc})") from None
        if mean.shape != (dim,) or basis.ndim != 2 or basis.shape[0] != dim or not 1 <= basis.shape[1] <= dim:
            raise ArtifactError(f"{path}: mean {mean.shape} / basis {basis.shape} do not fit a bank of {dim} dims")
    if KNN_KEY in extra:
        path = artifact.file(extra[KNN_KEY])
        try:
            knn = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ArtifactError(f"{path}: not a numpy array file ({exc})") from None
        if knn.ndim != 2 or knn.shape[0] != rows or knn.dtype.kind not in "iu" or knn.size and not (
            0 <= knn.min() and knn.max() < rows
        ):
            raise ArtifactError(f"{path}: {knn.dtype}{list(knn.shape)} is not a neighbour list of the {rows} bank rows")
    if basis is None:
        log.info("%s: no bank projection; using the plain blocked search", artifact.folder)
    return BankIndex(mean, basis, knn)


def add_index(folder: str | Path) -> BankIndex:
    """Build and add the index to an artifact exported without one; the manifest is re-checksummed."""
    from patchline.runtime.artifact import load_artifact, write_manifest

    artifact = load_artifact(folder)
    index = build_index(artifact.bank, artifact.manifest.num_neighbors)
    extra = {**artifact.manifest.extra_files, **write_index(artifact.folder, index)}
    write_manifest(artifact.folder, artifact.manifest.model_copy(update={"extra_files": extra}))
    return index
