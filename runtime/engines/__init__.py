"""Engines run the exported backbone: preprocessed batch (N, 3, H, W) → patch embeddings (N, h, w, D).

A camera's ``engine`` names an engine of the registry ENGINES. An engine is a module here that registers its
factory, ``factory(artifact, settings) -> Engine``, with ``@ENGINES.register(name)``, and its import line at the
end of this file: the factory reads from the EngineSettings the fields it has a use for and refuses, with a ValueError
saying what to set instead, a setting it cannot honour. GPU engines import their libraries when an engine is
made, so CPU boxes never need them.

``onnxruntime.py``: ONNX Runtime on the CPU, CUDA, or its TensorRT provider. ``tensorrt.py``: a TensorRT
engine built on the box (``trt_build.py``) and kept in the engine cache (``engine_cache.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from patchline.runtime.artifact import Artifact
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.registry import Registry

if TYPE_CHECKING:
    from patchline.runtime.search.cuda_device import CudaDevice


class Engine(Protocol):
    name: str
    model_file: str  # the artifact's file it runs: its checksum is the model identity verdicts carry
    gpu: CudaDevice | None  # the GPU it holds, which a GPU search shares; None where it holds none of its own

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EngineSettings:
    """Everything an engine may be told besides the artifact; each engine reads the fields it has a use for."""

    device: str = "auto"  # onnxruntime: its provider (DEVICES); tensorrt: the GPU, cuda or cuda:N (auto: cuda)
    precision: str = "fp32"  # the artifact's model to run: fp32, or its INT8 quantisation (`patchline quantize`)
    model_file: str | None = None  # another ONNX file of the artifact, instead of the precision's (benchmarks)
    threads: int | None = None  # CPU threads (None: every core this process may use)
    graph_optimization: str = "all"  # ONNX Runtime's graph optimisation level (GRAPH_OPTIMIZATION)
    tensorrt: TensorRtConfig = field(default_factory=TensorRtConfig)  # the config's tensorrt section
    warm_up: bool = True  # tensorrt: run its profile's smallest and largest batch once, before the first frame


EngineFactory = Callable[[Artifact, EngineSettings], Engine]
ENGINES: Registry[EngineFactory] = Registry("engine")


def create_engine(name: str, artifact: Artifact, settings: EngineSettings = EngineSettings()) -> Engine:
    """The engine registered as ``name`` for ``artifact``; a ValueError naming the known engines for another name."""
    return ENGINES[name](artifact, settings)


# Imported last: the engines register themselves in ENGINES above.
from patchline.runtime.engines import onnxruntime, tensorrt  # noqa: E402, F401
