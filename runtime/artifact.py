"""The exported artifact: the one contract between export, calibration and runtime.

An artifact is a folder::

    model.onnx        backbone + patch aggregation; input (N, 3, H, W) float32, output (N, h, w, D)
    memory_bank.npy   float32 (rows, D)
    manifest.json     this module's Manifest: what produced the files, their sha256, and how to score

Loading checks the schema version, every file's checksum and that the shapes agree,
and refuses with an ArtifactError naming the problem.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.decision import Calibration
from patchline.runtime.preprocess import Preprocessor

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
BANK_FILE = "memory_bank.npy"
# The INT8 model is an extra file (checksummed like the others), found by this key in extra_files.
INT8_KEY = "int8_model"
INT8_MODEL_FILE = "model.int8.onnx"
PRECISIONS = ("fp32", "int8")


class ArtifactError(ValueError):
    """An artifact that cannot be used; the message names the folder and the problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackboneInfo(Strict):
    name: str  # an ensemble's backbones joined by "+"
    layers: list[str]
    weights: str  # "pretrained", "random (seed N)" or the weights file name + its sha256
    # The original PatchCore's mean-mapping; None: anomalib's embedding (pooled layers concatenated).
    pretrain_embed_dimension: int | None = None
    target_embed_dimension: int | None = None


class PreprocessInfo(Strict):
    image_size: tuple[int, int]
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_name: str
    input_layout: str = "NCHW float32, RGB, (pixel/255 - mean) / std"
    center_crop: tuple[int, int] | None = None  # cut from the resized image before the network (anomalib imports)

    def preprocessor(self) -> Preprocessor:
        return Preprocessor(self.image_size, self.resize, self.mean, self.std, self.center_crop)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.preprocessor().input_size


class ModelInfo(Strict):
    file: str
    output_name: str
    embedding_dim: int
    patch_grid: tuple[int, int]
    opset: int
    onnx_max_abs_diff: float


class BankInfo(Strict):
    file: str
    shape: tuple[int, int]
    dtype: str
    coreset_ratio: float
    source_rows: int


class TrainingInfo(Strict):
    images_used: int
    images_skipped: int
    skipped: list[str]
    timings_s: dict[str, float] = {}


class SearchChoice(Strict):
    """The nearest-row search an artifact runs by default, and the measurement that chose it.

    Measured where the index was built (export, import, `patchline index`): held-out rows
    searched by the plain blocked GEMM and by the projection-pruned search in turns. The
    pruned search is chosen only when it was clearly faster there; otherwise the plain one.
    """

    method: Literal["pruned", "plain"]
    dims: int = Field(ge=1)  # projected directions of the pruned search
    pruning_rate: float = Field(ge=0.0, le=1.0)  # fraction of (row, bank row) distances the bounds ruled out
    pruned_ms: float = Field(gt=0.0)  # median time per held-out frame, both searches on the same rows
    plain_ms: float = Field(gt=0.0)
    queries: int = Field(ge=1)  # held-out rows per frame
    frames: int = Field(ge=1)
    # Where the rows came from: training images kept out of the bank, images given to `patchline index`, or bank rows.
    held_out: Literal["training images", "given images", "bank rows"]
    cpu: str
    threads: int = Field(ge=1)


class Manifest(Strict):
    schema_version: int
    model_id: str
    created: str
    backbone: BackboneInfo
    preprocess: PreprocessInfo
    model: ModelInfo
    memory_bank: BankInfo
    num_neighbors: int
    training: TrainingInfo
    tool_versions: dict[str, str]
    sha256: dict[str, str]
    calibration: Calibration | None = None
    extra_files: dict[str, str] = {}
    search: SearchChoice | None = None  # None: never measured (an older artifact); the plain search runs


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Recompute the sha256 of every file the manifest names and write it.

    Calibration calls this again after adding its fields, so checksums always match.
    """
    files = [manifest.model.file, manifest.memory_bank.file, *manifest.extra_files.values()]
    sums = {name: sha256_file(folder / name) for name in files}
    manifest = manifest.model_copy(update={"sha256": sums})
    # A new file renamed over the old: a crash or a concurrent load never sees half a manifest.
    write_atomically(folder / MANIFEST, (json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n").encode(),
                     fsync=False)
    return manifest


class Artifact:
    """A validated artifact folder: manifest plus the memory bank in memory."""

    def __init__(self, folder: Path, manifest: Manifest, bank: np.ndarray) -> None:
        self.folder = folder
        self.manifest = manifest
        self.bank = bank

    @property
    def model_path(self) -> Path:
        return self.folder / self.manifest.model.file

    def checksum(self, model_file: str | None = None) -> str:
        """What scores mean, in verdicts and score sets: the model file that runs (default: the fp32 one),
        the memory bank and num_neighbors, by their sha256; files added later (index, calibration) leave it be."""
        sums = self.manifest.sha256
        model_file = model_file or self.manifest.model.file
        if model_file not in sums:
            raise ArtifactError(f"{self.folder}: {model_file} is not a file the manifest checksums")
        parts = [sums[model_file], sums[self.manifest.memory_bank.file],
                 str(self.manifest.num_neighbors)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def file(self, name: str) -> Path:
        return self.folder / name

    def model_file(self, precision: str = "fp32") -> str:
        """The ONNX file to run for ``precision``: the exported fp32 model or its INT8 quantisation."""
        if precision == "fp32":
            return self.manifest.model.file
        if precision == "int8":
            if INT8_KEY not in self.manifest.extra_files:
                raise ArtifactError(f"{self.folder}: no INT8 model; create one with `patchline quantize`")
            return self.manifest.extra_files[INT8_KEY]
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder does not exist")
    if not path.is_file():
        raise ArtifactError(f"{folder}: missing {MANIFEST}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: unknown schema_version {version!r}; this patchline reads version {SCHEMA_VERSION}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ArtifactError(f"{path}: invalid manifest: {problems}") from None


def load_artifact(folder: str | Path) -> Artifact:
    """Read and validate an artifact folder; raise ArtifactError naming what is wrong."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    named = {manifest.model.file, manifest.memory_bank.file, *manifest.extra_files.values()}
    for name in sorted(named):
        path = folder / name
        if not path.is_file():
            raise ArtifactError(f"{folder}: missing file {name} named in the manifest")
        expected = manifest.sha256.get(name)
        if expected is None:
            raise ArtifactError(f"{folder}: manifest has no sha256 for {name}")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(
                f"{path}: checksum mismatch (manifest {expected[:12]}…, file {actual[:12]}…); "
                "the file was changed or corrupted after export"
            )
    try:
        bank = np.load(folder / manifest.memory_bank.file, allow_pickle=False)
    except ValueError as exc:
        raise ArtifactError(f"{folder / manifest.memory_bank.file}: not a numpy array file ({exc})") from None
    info = manifest.memory_bank
    if tuple(bank.shape) != tuple(info.shape) or str(bank.dtype) != info.dtype:
        raise ArtifactError(
            f"{folder / info.file}: holds {bank.dtype}{list(bank.shape)}, manifest says {info.dtype}{list(info.shape)}"
        )
    if bank.ndim != 2 or bank.shape[1] != manifest.model.embedding_dim:
        raise ArtifactError(
            f"{folder}: memory bank rows have {bank.shape[-1]} dims but the model's embedding_dim is "
            f"{manifest.model.embedding_dim}"
        )
    if manifest.num_neighbors < 1:
        raise ArtifactError(f"{folder}: num_neighbors must be ≥ 1, got {manifest.num_neighbors}")
    return Artifact(folder, manifest, bank)
