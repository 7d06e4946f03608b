"""The memory bank's search index: computed once at export, stored beside the bank.

    bank_projection.npz  the bank mean and its top principal directions, for the exact
                         projected search's lower bounds (distance.ProjectedSearch)
    bank_knn.npy         int32 (rows, k): every bank row's k nearest bank rows, itself first,
                         so the reweighting needs no second bank-wide search per frame

Both are listed in ``Manifest.extra_files`` (so checksummed); an artifact without them
still loads and scores, with the plain blocked search.

Whether the pruned search pays depends on the bank (how much of its variance the leading
directions hold) and on the machine, so building the index also measures it: held-out rows
are searched by the plain blocked GEMM and by the pruned search in turns, and the manifest's
``search`` records the faster one (the pruned one only when clearly faster) with the
measured pruning rate. The runtime runs what it says.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from patchline.runtime.artifact import MANIFEST, Artifact, ArtifactError, SearchChoice
from patchline.runtime.search.distance import ProjectedSearch, available_cores, cpu_model, nearest, squared_norms

log = logging.getLogger("patchline.bank_index")

PROJECTION_KEY, PROJECTION_FILE = "bank_projection", "bank_projection.npz"
KNN_KEY, KNN_FILE = "bank_knn", "bank_knn.npy"
# Principal directions stored; the search uses the leading ones (see SEARCH_DIMS).
STORED_DIMS = 128
# Directions the exact search projects on by default: measured with `patchline bench --dims` (README).
SEARCH_DIMS = 64
_CHUNK = 2048  # rows per step when building: bounded temporaries on big banks
# The pruned search becomes the default only when its median time on the held-out rows is at most
# this fraction of the plain search's, so that timing noise cannot make the default the slower one.
PRUNED_MAX_RATIO = 0.9
HELD_OUT_IMAGES = 4  # training images kept out of the bank for the measurement (their patch grids are the frames)
BANK_ROW_QUERIES = 1024  # without training images: bank rows held out, searched against the rest
TIMING_ROUNDS = 3  # each frame is searched this many times by each search, in turns


@dataclass(frozen=True)
class BankIndex:
    mean: np.ndarray | None = None  # (D,) float32
    basis: np.ndarray | None = None  # (D, R) float32, orthonormal columns, leading variance first
    knn: np.ndarray | None = None  # (rows, k) int32
    choice: SearchChoice | None = None  # the measured default search (the manifest's ``search``)

    @property
    def prunes(self) -> bool:
        """Whether the measured default is the pruned search."""
        return self.basis is not None and self.choice is not None and self.choice.method == "pruned"


@dataclass(frozen=True)
class HeldOut:
    """Rows to measure the searches with: frames of query rows, and the bank rows to search them in."""

    frames: list[np.ndarray]
    bank_rows: np.ndarray  # indices into the bank
    source: str  # SearchChoice.held_out


def held_out_images(rows: np.ndarray, selected: np.ndarray, patches_per_image: int) -> HeldOut | None:
    """Whole training images as frames, with the bank rows the coreset took from them left out.

    ``selected`` are the training rows the coreset kept, in bank order; ``rows`` all training rows.
    """
    images = rows.shape[0] // patches_per_image
    if images < 2:
        return None
    picked = np.unique(np.linspace(0, images - 1, min(HELD_OUT_IMAGES, images - 1)).round().astype(np.int64))
    own = np.isin(selected // patches_per_image, picked)
    if own.all():
        return None
    frames = [rows[i * patches_per_image : (i + 1) * patches_per_image] for i in picked]
    return HeldOut(frames, np.flatnonzero(~own), "training images")


def held_out_bank_rows(bank: np.ndarray, seed: int = 0) -> HeldOut | None:
    """Without training images: a seeded sample of bank rows as one frame, searched against the other rows."""
    rows = bank.shape[0]
    count = min(BANK_ROW_QUERIES, rows // 8)
    if count < 1:
        return None
    queries = np.zeros(rows, bool)
    queries[np.random.default_rng(seed).choice(rows, count, replace=False)] = True
    return HeldOut([bank[queries]], np.flatnonzero(~queries), "bank rows")


def held_out_frames(folder: str | Path, images: str | Path) -> HeldOut:
    """Patch embeddings of ``images`` (good parts the model was not trained on) by the artifact's own model, as frames."""
    from patchline.runtime.inspector import Inspector
    from patchline.runtime.preprocess import ImageError, iter_images, list_images

    inspector = Inspector(folder, search="plain")
    frames = []
    for _, rgb in iter_images(list_images(images)):
        if isinstance(rgb, ImageError):
            log.warning("skipped %s", rgb)
            continue
        embedding = inspector.engine(inspector.preprocess([rgb]))[0]
        frames.append(embedding.reshape(-1, embedding.shape[-1]))
        if len(frames) == HELD_OUT_IMAGES:
            break
    if not frames:
        raise ValueError(f"{images}: no readable images to measure the search with")
    return HeldOut(frames, np.arange(inspector.artifact.bank.shape[0]), "given images")


def measure_search(bank: np.ndarray, index: BankIndex, held_out: HeldOut, dims: int = SEARCH_DIMS,
                   threads: int | None = None, rounds: int = TIMING_ROUNDS) -> SearchChoice:
    """Time the plain and the pruned search on the held-out frames, in turns, and choose the default."""
    rows = np.ascontiguousarray(bank[held_out.bank_rows])
    rows_sq = squared_norms(rows)
    dims = min(dims, index.basis.shape[1])
    pruned = ProjectedSearch(rows, rows_sq, index.mean, index.basis[:, :dims], threads=threads)
    searches = {"plain": lambda frame: nearest(frame, rows, 1, rows_sq, threads=threads), "pruned": pruned.nearest}
    times: dict[str, list[float]] = {name: [] for name in searches}
    rates = []
    for name, search in searches.items():  # warm-up: thread pools, caches
        search(held_out.frames[0])
    for round_ in range(rounds):
        for frame in held_out.frames:
            for name in sorted(searches, reverse=round_ % 2 == 1):  # alternate which goes first
                start = time.perf_counter()
                searches[name](frame)
                times[name].append((time.perf_counter() - start) * 1000.0)
            rates.append(pruned.stats.pruning_rate)
    pruned_ms, plain_ms = float(np.median(times["pruned"])), float(np.median(times["plain"]))
    choice = SearchChoice(
        method="pruned" if pruned_ms <= PRUNED_MAX_RATIO * plain_ms else "plain",
        dims=dims, pruning_rate=round(float(np.clip(np.median(rates), 0.0, 1.0)), 4),
        pruned_ms=round(pruned_ms, 3), plain_ms=round(plain_ms, 3), queries=int(held_out.frames[0].shape[0]),
        frames=len(held_out.frames), held_out=held_out.source, cpu=cpu_model(), threads=threads or available_cores(),
    )
    log.info("search: %s (pruned %.1f ms vs plain %.1f ms per frame, pruning rate %.3f, on %s)", choice.method,
             pruned_ms, plain_ms, choice.pruning_rate, held_out.source)
    return choice


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


def build_index(bank: np.ndarray, num_neighbors: int, held_out: HeldOut | None = None,
                dims: int = STORED_DIMS) -> BankIndex:
    """Projection, k-NN graph and the measured default search (held-out bank rows unless ``held_out`` is given)."""
    mean, basis = principal_directions(bank, dims)
    index = BankIndex(mean, basis, knn_graph(bank, num_neighbors) if num_neighbors > 1 else None)
    held_out = held_out or held_out_bank_rows(bank)
    if held_out is None:  # a bank too small to hold rows out: nothing worth pruning
        return index
    return replace(index, choice=measure_search(bank, index, held_out))


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
    choice = artifact.manifest.search
    if choice is not None and choice.method == "pruned" and (basis is None or choice.dims > basis.shape[1]):
        raise ArtifactError(f"{artifact.folder / MANIFEST}: search 'pruned' on {choice.dims} directions needs a bank "
                            f"projection with as many; the artifact has "
                            f"{'none' if basis is None else basis.shape[1]} (re-run `patchline index`)")
    if basis is None:
        log.info("%s: no bank projection; using the plain blocked search", artifact.folder)
    elif choice is None:
        log.info("%s: the pruned search was never measured here; using the plain search (`patchline index` "
                 "measures it)", artifact.folder)
    return BankIndex(mean, basis, knn, choice)


def index_for_this_machine(artifact: Artifact) -> BankIndex:
    """The artifact's index, its search choice measured again (in memory) when another CPU or core count measured it.

    The choice says which search was faster where it was measured; an edge box with another
    processor can rank them otherwise, so it measures for itself on held-out bank rows
    (about a second) and logs what it found. `patchline index ART` there writes it down.
    """
    index = read_index(artifact)
    choice = index.choice
    if choice is None or (choice.cpu, choice.threads) == (cpu_model(), available_cores()):
        return index
    held_out = held_out_bank_rows(artifact.bank)
    if held_out is None:
        return index
    log.info("%s: search measured on %s with %d threads; measuring again on this %s with %d", artifact.folder,
             choice.cpu, choice.threads, cpu_model(), available_cores())
    return replace(index, choice=measure_search(artifact.bank, index, held_out, choice.dims))


def add_index(folder: str | Path, held_out: HeldOut | None = None) -> BankIndex:
    """Build the index and measure the default search again (on this machine); the manifest is re-checksummed.

    ``held_out`` gives frames to measure with (held-out images); without it, bank rows are held out.
    """
    from patchline.runtime.artifact import load_artifact, write_manifest

    artifact = load_artifact(folder)
    index = build_index(artifact.bank, artifact.manifest.num_neighbors, held_out)
    extra = {**artifact.manifest.extra_files, **write_index(artifact.folder, index)}
    write_manifest(artifact.folder, artifact.manifest.model_copy(update={"extra_files": extra, "search": index.choice}))
    return index
