"""Engines run the exported backbone: preprocessed batch (N, 3, H, W) → patch embeddings (N, h, w, D).

Engines register by name (``@register("onnxruntime")``) and are chosen by config; GPU
engines import their libraries lazily so CPU boxes never need them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from patchline.runtime.artifact import Artifact, ArtifactError


class Engine(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


ENGINES: dict[str, Callable[..., Engine]] = {}
GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}


def register(name: str) -> Callable[[Callable[..., Engine]], Callable[..., Engine]]:
    def add(factory: Callable[..., Engine]) -> Callable[..., Engine]:
        ENGINES[name] = factory
        return factory

    return add


def create_engine(name: str, artifact: Artifact, **options: object) -> Engine:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(sorted(ENGINES))}")
    return ENGINES[name](artifact, **options)


@register("onnxruntime")
class OnnxRuntimeEngine:
    """ONNX Runtime session; the CUDA provider is used when this onnxruntime build has it."""

    name = "onnxruntime"

    def __init__(
        self,
        artifact: Artifact,
        device: str = "auto",
        threads: int | None = None,
        model_file: str | None = None,
        graph_optimization: str = "all",
    ) -> None:
        import onnxruntime as ort

        available = ort.get_available_providers()
        if device == "cpu" or (device == "auto" and "CUDAExecutionProvider" not in available):
            providers = ["CPUExecutionProvider"]
        elif "CUDAExecutionProvider" in available:
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            raise RuntimeError(f"device {device!r} asked for, but onnxruntime offers only {available}")
        options = ort.SessionOptions()
        if graph_optimization not in GRAPH_OPTIMIZATION:
            raise ValueError(f"graph_optimization {graph_optimization!r}: one of {', '.join(GRAPH_OPTIMIZATION)}")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[graph_optimization])
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        path = artifact.file(model_file or artifact.manifest.model.file)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such model file in the artifact")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        manifest = artifact.manifest
        self.input_name = manifest.preprocess.input_name
        self.output_name = manifest.model.output_name
        inputs = {i.name for i in self.session.get_inputs()}
        outputs = {o.name: o.shape for o in self.session.get_outputs()}
        if self.input_name not in inputs or self.output_name not in outputs:
            raise ArtifactError(
                f"{path}: graph has inputs {sorted(inputs)} and outputs {sorted(outputs)}, manifest names "
                f"{self.input_name!r} → {self.output_name!r}"
            )
        expected = [*manifest.model.patch_grid, manifest.model.embedding_dim]
        static = [d if isinstance(d, int) else None for d in outputs[self.output_name][1:]]
        if any(s is not None and s != e for s, e in zip(static, expected)) or len(static) != 3:
            raise ArtifactError(f"{path}: output shape {outputs[self.output_name]} disagrees with manifest {expected}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]
