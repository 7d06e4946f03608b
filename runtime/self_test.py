"""An artifact's self-test: a few of its training images and the scores the runtime gave them at export.

A model loaded beside a running one (a hot swap, runtime/model_updates.py) must score these within a
tolerance before it judges a single part: an engine that loads but computes garbage — a wrong TensorRT
build, a half-copied file with a fresh manifest, an INT8 model far from its fp32 one — is refused while
the running model keeps going. The images are stored at the model's input size (uint8), so the file
stays small; the scores come from ONNX Runtime on the CPU in fp32, the reference every engine is held to.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from patchline.runtime.artifact import Artifact, ArtifactError, load_artifact, write_manifest
from patchline.runtime.inspector import Inspector

SELF_TEST_KEY = "self_test"  # in the manifest's extra_files: checksummed like the model
SELF_TEST_FILE = "self_test.npz"
IMAGES = 4


def add_self_test(folder: str | Path, images: list[np.ndarray]) -> np.ndarray:
    """Score ``images`` (RGB uint8, any size; the first IMAGES are kept) with the runtime and store them with
    their scores in the artifact at ``folder``; returns the scores."""
    if not images:
        raise ValueError("a self-test needs at least one image")
    artifact = load_artifact(folder)
    height, width = artifact.manifest.preprocess.image_size
    kept = np.stack([cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA) for image in images[:IMAGES]])
    inspector = Inspector(artifact, engine="onnxruntime", distance="cpu", device="cpu")
    try:
        scores = np.array([i.score for i in inspector.inspect_batch(list(kept))], np.float64)
    finally:
        inspector.close()
    np.savez(artifact.file(SELF_TEST_FILE), images=kept, scores=scores)
    extra = {**artifact.manifest.extra_files, SELF_TEST_KEY: SELF_TEST_FILE}
    write_manifest(artifact.folder, artifact.manifest.model_copy(update={"extra_files": extra}))
    return scores


def check(artifact: Artifact, inspector: Inspector, tolerance: float) -> np.ndarray:
    """Score the artifact's self-test images with ``inspector``; raise ArtifactError when it has none, or when any
    score is further than ``tolerance`` (relative) from the stored one. Returns the scores."""
    name = artifact.manifest.extra_files.get(SELF_TEST_KEY)
    if name is None:
        raise ArtifactError(f"{artifact.folder}: has no self-test images to check a new model with; add them with "
                            "`patchline self-test ARTIFACT --images GOOD_IMAGES`")
    with np.load(artifact.file(name), allow_pickle=False) as stored:
        images, expected = stored["images"], stored["scores"]
    scores = np.array([i.score for i in inspector.inspect_batch(list(images))], np.float64)
    error = np.abs(scores - expected) / np.maximum(np.abs(expected), 1e-12)
    worst = int(np.argmax(error))
    if error[worst] > tolerance:
        raise ArtifactError(f"{artifact.folder}: self-test image {worst} scores {scores[worst]:.6g}, the artifact says "
                            f"{expected[worst]:.6g} (off by {error[worst]:.2%}, tolerance {tolerance:.2%}): this engine "
                            "does not compute what was exported")
    return scores
