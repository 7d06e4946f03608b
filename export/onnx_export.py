"""Trace the patch-embedding module to ONNX and check ONNX Runtime reproduces torch."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from patchline.runtime.engines.onnxruntime import import_onnxruntime

INPUT_NAME = "image"
OUTPUT_NAME = "embedding"


class ExportVerificationError(RuntimeError):
    """ONNX Runtime's output differs from torch's by more than the tolerance."""


def export_onnx(module: torch.nn.Module, image_size: tuple[int, int], path: Path, opset: int) -> None:
    """Write ``module`` as ONNX with a dynamic batch axis."""
    dummy = torch.zeros(1, 3, *image_size)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo, but handles these CNNs in
        # seconds with a plain dynamic batch axis; its deprecation warning is noise to the user.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (dummy,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    onnx.checker.check_model(str(path))


def verify_onnx(module: torch.nn.Module, path: Path, image_size: tuple[int, int], tolerance: float, seed: int = 0) -> float:
    """Max |onnx − torch| over a random batch of two; raises when above ``tolerance`` × max|torch|."""
    ort = import_onnxruntime()

    batch = np.random.default_rng(seed).standard_normal((2, 3, *image_size), dtype=np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
    with torch.no_grad():
        want = module(torch.from_numpy(batch)).numpy()
    diff = float(np.abs(got - want).max())
    bound = tolerance * max(1.0, float(np.abs(want).max()))
    if got.shape != want.shape or not diff <= bound:
        raise ExportVerificationError(
            f"{path}: ONNX Runtime output {got.shape} differs from torch {want.shape} by {diff:.3g} "
            f"(bound {bound:.3g}); the export is not faithful"
        )
    return diff
