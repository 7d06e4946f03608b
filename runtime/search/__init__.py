"""Where patch embeddings meet the memory bank: the nearest bank rows of each patch.

``distance.py`` holds the BLAS distances and the CPU searches (blocked, and exact search pruned by projection
bounds), ``bank_index.py`` the index written at export that the pruned search reads, ``gpu_distance.py`` the
fused CUDA kernel (``kernels/``) on a ``cuda_device.CudaDevice``.

A camera's ``distance`` names a backend of the registry DISTANCES. A backend is a factory
``(bank, gpu, cache_dir) -> search``: ``bank`` is the CPU search over the bank (``score.MemoryBank``, which the
scorer keeps in any case for the reweighting), ``gpu`` the CudaDevice the engine holds (None: the default GPU),
``cache_dir`` the engine cache, where compiled kernels are kept. A new backend is a module that registers its
factory with ``@DISTANCES.register(name)``, and its import line at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from patchline.runtime.registry import Registry

if TYPE_CHECKING:
    from patchline.runtime.score import MemoryBank
    from patchline.runtime.search.cuda_device import CudaDevice


class NearestRows(Protocol):
    def nearest(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) float32 squared distances and int64 bank row indices of each query row's k nearest rows."""


DistanceBackend = Callable[["MemoryBank", "CudaDevice | None", "str | Path | None"], NearestRows]
DISTANCES: Registry[DistanceBackend] = Registry("distance")


@DISTANCES.register("cpu")
def _bank_itself(bank: MemoryBank, gpu: CudaDevice | None, cache_dir: str | Path | None) -> NearestRows:
    return bank


# Imported last: the backends register themselves in DISTANCES above.
from patchline.runtime.search import gpu_distance  # noqa: E402, F401
