"""Fit PatchCore on a folder of good images and write the artifact.

images → patch embeddings (torch) → coreset → memory bank; module → ONNX → verified.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from patchline.export.coreset import greedy_coreset
from patchline.export.embedding import backbone_label, build_from_config
from patchline.export.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, verify_onnx
from patchline.runtime.artifact import (
    BANK_FILE,
    MODEL_FILE,
    SCHEMA_VERSION,
    BackboneInfo,
    BankInfo,
    Manifest,
    ModelInfo,
    PreprocessInfo,
    TrainingInfo,
    now_iso,
    read_manifest,
    write_manifest,
)
from patchline.export.config import Config
from patchline.runtime.decision import Calibration
from patchline.runtime.preprocess import ImageError, Preprocessor, iter_images, list_images, training_root
from patchline.runtime.search.bank_index import HeldOut, build_index, held_out_images, write_index
from patchline.runtime.self_test import IMAGES as SELF_TEST_IMAGES
from patchline.runtime.self_test import add_self_test

log = logging.getLogger("patchline.export")


def load_good_images(folder: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """Readable images of the folder (or an MVTec category's train/good), and 'path: reason' for each one skipped."""
    images, skipped = [], []
    for _, rgb in iter_images(list_images(training_root(folder))):
        if isinstance(rgb, ImageError):
            skipped.append(str(rgb))
            log.warning("skipped %s", rgb)
        else:
            images.append(rgb)
    return images, skipped


def embed_images(
    module: torch.nn.Module, preprocess: Preprocessor, images: list[np.ndarray], batch_size: int, progress: bool = True
) -> tuple[np.ndarray, tuple[int, int]]:
    """All patch embeddings of ``images`` as rows (N·h·w, D), and the patch grid (h, w)."""
    rows: np.ndarray | None = None
    grid = (0, 0)
    with torch.inference_mode(), tqdm(total=len(images), desc="embedding", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            out = module(torch.from_numpy(preprocess(chunk))).numpy()
            n, h, w, d = out.shape
            if rows is None:  # preallocate once the grid is known: no list of copies
                grid = (h, w)
                rows = np.empty((len(images) * h * w, d), np.float32)
            rows[start * h * w : (start + n) * h * w] = out.reshape(-1, d)
            bar.update(n)
    assert rows is not None
    return rows, grid


def tool_versions() -> dict[str, str]:
    """Versions of the tools that built an artifact, for its manifest."""
    names = ("torch", "timm", "onnx", "onnxruntime", "numpy", "opencv-python-headless", "patchline")
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def write_artifact(
    out: Path,
    module: torch.nn.Module,
    bank: np.ndarray,
    *,
    id_prefix: str,
    backbone: BackboneInfo,
    preprocess: PreprocessInfo,
    patch_grid: tuple[int, int],
    coreset_ratio: float,
    source_rows: int,
    num_neighbors: int,
    training: TrainingInfo,
    opset: int,
    tolerance: float,
    calibration: Calibration | None = None,
    held_out: HeldOut | None = None,
) -> Manifest:
    """Save the bank and its search index, export the module to ONNX and verify it, and write the manifest.

    The model id is ``id_prefix`` and the bank's digest; the index's build time joins ``training.timings_s``.
    ``held_out`` are the rows the default search is measured with (default: held-out bank rows).
    """
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    np.save(out / BANK_FILE, bank)
    index = build_index(bank, num_neighbors, held_out)
    extra_files = write_index(out, index)
    index_s = time.perf_counter() - start
    log.info("bank index (projection, k-NN graph, search measured) in %.1f s", index_s)

    input_size = preprocess.input_size
    export_onnx(module, input_size, out / MODEL_FILE, opset)
    diff = verify_onnx(module, out / MODEL_FILE, input_size, tolerance)
    log.info("ONNX Runtime vs torch: max abs diff %.3g", diff)

    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        model_id=f"{id_prefix}-{hashlib.sha256(bank.tobytes()).hexdigest()[:12]}",
        created=now_iso(),
        backbone=backbone,
        preprocess=preprocess,
        model=ModelInfo(
            file=MODEL_FILE,
            output_name=OUTPUT_NAME,
            embedding_dim=int(bank.shape[1]),
            patch_grid=patch_grid,
            opset=opset,
            onnx_max_abs_diff=diff,
        ),
        memory_bank=BankInfo(
            file=BANK_FILE, shape=bank.shape, dtype=str(bank.dtype), coreset_ratio=coreset_ratio, source_rows=source_rows
        ),
        num_neighbors=num_neighbors,
        training=training.model_copy(update={"timings_s": {**training.timings_s, "bank_index": round(index_s, 3)}}),
        tool_versions=tool_versions(),
        sha256={},
        calibration=calibration,
        extra_files=extra_files,
        search=index.choice,
    )
    return write_manifest(out, manifest)


def export_artifact(config: Config, images_dir: str | Path, out_dir: str | Path, progress: bool = True) -> Manifest:
    """Fit on the good images in ``images_dir`` and write a verified artifact to ``out_dir``."""
    images, skipped = load_good_images(images_dir)
    if not images:
        raise ValueError(f"{images_dir}: no usable images ({len(skipped)} skipped)")
    log.info("%d images used, %d skipped", len(images), len(skipped))

    pre = config.preprocess
    info = PreprocessInfo(image_size=pre.image_size, resize=pre.resize, mean=pre.mean, std=pre.std, input_name=INPUT_NAME)
    module, weights_source = build_from_config(config.model, info.input_size)

    t0 = time.perf_counter()
    rows, grid = embed_images(module, info.preprocessor(), images, config.export.batch_size, progress)
    t1 = time.perf_counter()
    log.info("embedded %d images into %d rows × %d dims in %.1f s", len(images), *rows.shape, t1 - t0)
    selected = np.sort(greedy_coreset(rows, config.coreset.ratio, config.coreset.projection_dim, config.coreset.seed,
                                      progress))
    bank = np.ascontiguousarray(rows[selected])
    t2 = time.perf_counter()
    log.info("coreset: %d of %d rows in %.1f s", bank.shape[0], rows.shape[0], t2 - t1)

    label = backbone_label(config.model)
    pretrain_dim, target_dim = config.model.embed_dimensions() or (None, None)
    write_artifact(
        Path(out_dir),
        module,
        bank,
        id_prefix=label,
        backbone=BackboneInfo(
            name=label,
            layers=list(config.model.layers),
            weights=weights_source,
            pretrain_embed_dimension=pretrain_dim,
            target_embed_dimension=target_dim,
        ),
        preprocess=info,
        patch_grid=grid,
        coreset_ratio=config.coreset.ratio,
        source_rows=int(rows.shape[0]),
        num_neighbors=config.scoring.num_neighbors,
        training=TrainingInfo(
            images_used=len(images),
            images_skipped=len(skipped),
            skipped=skipped,
            timings_s={"embedding": round(t1 - t0, 3), "coreset": round(t2 - t1, 3)},
        ),
        opset=config.export.opset,
        tolerance=config.export.tolerance,
        held_out=held_out_images(rows, selected, grid[0] * grid[1]),
    )
    # Spread over the training set: what a new model loaded beside a running one must score the same.
    step = max(1, len(images) // SELF_TEST_IMAGES)
    add_self_test(out_dir, images[::step][:SELF_TEST_IMAGES])
    return read_manifest(out_dir)
