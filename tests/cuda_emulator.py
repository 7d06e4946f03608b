"""The distance kernel's CUDA C source run on the CPU (see cuda_emulation.cpp), driven by the same
launch plan as GpuNearest, for machines without a GPU."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from patchline.runtime.search.gpu_distance import (
    KERNEL_FILE,
    bank_norm_launch,
    check_query,
    find_nvcc,
    padded_dim,
    plan_queries,
    prepare_rows,
)

HARNESS = Path(__file__).with_name("cuda_emulation.cpp")


def cuda_include_dir() -> Path | None:
    """The CUDA toolkit's headers (cuda_fp16.h): beside nvcc, or where find_nvcc looks (nvcc may be a wrapper)."""
    nvcc = find_nvcc()
    homes = [Path(nvcc).resolve().parent.parent] if nvcc else []
    homes += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ] + [Path("/usr/local/cuda")]
    return next((h / "include" for h in homes if (h / "include" / "cuda_fp16.h").is_file()), None)


def unavailable_reason() -> str | None:
    if shutil.which("g++") is None:
        return "g++ is not installed"
    if cuda_include_dir() is None:
        return "no CUDA toolkit (nvcc and its cuda_fp16.h) on PATH, in $CUDA_HOME or /usr/local/cuda"
    return None


class EmulatedKernels:
    """The kernels compiled for the CPU with TOPK = k."""

    def __init__(self, k: int, workdir: Path) -> None:
        self.k = k
        library = workdir / f"euclidean_topk_k{k}.so"
        subprocess.run(
            ["g++", "-std=c++20", "-O1", "-shared", "-fPIC", f"-I{cuda_include_dir()}", f"-DTOPK={k}",
             f'-DKERNEL_SOURCE="{KERNEL_FILE}"', str(HARNESS), "-o", str(library)],
            check=True, capture_output=True, text=True,
        )
        self.lib = ctypes.CDLL(str(library))

    def run(self, launch, buffers: dict[str, np.ndarray]) -> None:  # noqa: ANN001 - gpu_distance.Launch
        args = [ctypes.c_void_p(buffers[a].ctypes.data) if isinstance(a, str) else ctypes.c_int(a)
                for a in launch.args]
        getattr(self.lib, f"emu_{launch.kernel}")(*map(ctypes.c_int, (*launch.grid, launch.block)), *args)

    def nearest(self, x: np.ndarray, bank: np.ndarray, precision: str, sm_count: int) -> tuple[np.ndarray, np.ndarray]:
        """What GpuNearest(bank, precision).nearest(x, k) computes, on the CPU."""
        m, dim = bank.shape
        check_query(x, bank.shape, self.k)
        dim_p = padded_dim(dim, precision)
        buffers = {"bank": prepare_rows(bank, precision), "bank_sq": np.zeros(m, np.float32)}
        self.run(bank_norm_launch(m, dim_p, precision), buffers)
        plan = plan_queries(x.shape[0], m, dim, self.k, precision, sm_count)
        buffers.update({name: np.full(shape, -7, dtype) for name, (shape, dtype) in plan.buffers.items()})
        buffers[plan.upload] = np.ascontiguousarray(x, np.float32)
        for launch in plan.launches:
            self.run(launch, buffers)
        return buffers["out_d"], buffers["out_i"].astype(np.int64)
