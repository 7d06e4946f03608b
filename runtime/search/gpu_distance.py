"""Nearest bank rows on the GPU with the fused distance + top-k kernel (kernels/euclidean_topk.cu): the
``cuda`` (FP32 bank) and ``cuda-fp16`` distance backends.

The bank is uploaded once, as FP32 or FP16, and its row norms computed there; each call
uploads the queries and copies back only the k distances and indices per query. Results
match ``distance.nearest``: (n, k) float32 distances and int64 indices, ascending.

Planning the launches is plain Python, so this module imports without pycuda; the tests
run the same plan on the CPU against the kernel source (tests/cuda_emulation.cpp).
"""

from __future__ import annotations

import math
import os
import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchline.runtime.search import DISTANCES, DistanceBackend
from patchline.runtime.search.distance import NonFiniteError

if TYPE_CHECKING:
    from patchline.runtime.score import MemoryBank
    from patchline.runtime.search.cuda_device import CudaDevice

KERNEL_FILE = Path(__file__).parent / "kernels" / "euclidean_topk.cu"
# Past 16 the per-thread lists no longer fit in registers (ptxas spills them; tests/test_gpu_kernel.py).
MAX_K = 16
PRECISIONS = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}
FP16_MAX = float(np.finfo(np.float16).max)
_SUFFIX = {"fp32": "f32", "fp16": "f16"}


@cache
def kernel_source() -> str:
    return KERNEL_FILE.read_text()


@cache
def geometry() -> dict[str, int]:
    """The kernel's numeric #defines (TILE, THREADS, LANES, ...): its launch geometry lives only in the .cu file."""
    return {name: int(value) for name, value in re.findall(r"^#define (\w+) (\d+)\b", kernel_source(), re.M)}


def find_nvcc() -> str | None:
    """nvcc on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin (services rarely have the toolkit on PATH)."""
    homes = [os.environ[v] for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ] + ["/usr/local/cuda"]
    return shutil.which("nvcc") or next((str(p) for h in homes if (p := Path(h) / "bin" / "nvcc").is_file()), None)


def compile_options(k: int) -> list[str]:
    return [f"-DTOPK={k}"]


@dataclass(frozen=True)
class Launch:
    kernel: str
    grid: tuple[int, int]
    block: int
    args: tuple[str | int, ...]  # buffer names (pointers) and int scalars, in the kernel's order


@dataclass(frozen=True)
class QueryPlan:
    """The launches for one batch of queries and the device buffers they use besides the bank's."""

    launches: tuple[Launch, ...]
    buffers: dict[str, tuple[tuple[int, ...], np.dtype]]
    upload: str  # the buffer the host fills with the queries as they are: float32, (n, dim)


def padded_dim(dim: int, precision: str) -> int:
    # half2 loads need every row to start on a 4-byte boundary: an odd FP16 row gets a zero column.
    return dim + dim % 2 if precision == "fp16" else dim


def check_range(rows: np.ndarray, precision: str, what: str) -> None:
    """Refuse rows the precision cannot hold: cast to FP16, a value beyond ±65504 (or NaN) becomes a
    non-finite half, and no distance to it means anything. Raises NonFiniteError naming ``what``."""
    if precision != "fp16" or rows.size == 0:
        return
    peak = float(np.abs(rows).max())
    if not peak <= FP16_MAX:  # also NaN
        raise NonFiniteError(f"{what}: largest magnitude {peak:.6g} is beyond FP16's range (±{FP16_MAX:.0f}), so the "
                             "FP16 distance kernel cannot take it; use distance cuda (FP32)")


def prepare_rows(rows: np.ndarray, precision: str) -> np.ndarray:
    """``rows`` as the kernel reads them: C-contiguous, in the precision's dtype, zero-padded to ``padded_dim``."""
    n, dim = rows.shape
    out = np.zeros((n, padded_dim(dim, precision)), PRECISIONS[precision])
    out[:, :dim] = rows
    return out


def bank_norm_launch(m: int, dim: int, precision: str) -> Launch:
    g = geometry()
    return Launch(f"sq_norms_{_SUFFIX[precision]}", (m, 1), g["NORM_THREADS"], ("bank", dim, "bank_sq"))


def plan_queries(n: int, m: int, dim: int, k: int, precision: str, sm_count: int) -> QueryPlan:
    """Launches for ``n`` queries of ``dim`` dims against an ``m``-row bank.

    The bank is split into slices so that even one frame's queries fill about four blocks
    per multiprocessor; every slice gets at least one tile.
    """
    g = geometry()
    tile, suffix, padded = g["TILE"], _SUFFIX[precision], padded_dim(dim, precision)
    tiles, query_blocks = math.ceil(m / tile), math.ceil(n / tile)
    wanted = max(1, math.ceil(4 * sm_count / query_blocks))
    per_slice = math.ceil(tiles / min(wanted, tiles))
    slices = math.ceil(tiles / per_slice)
    lists = slices * g["LANES"]
    f32, i32 = np.dtype(np.float32), np.dtype(np.int32)
    # FP32 queries are searched as uploaded; FP16 ones are rounded on the GPU first (kernel to_half).
    convert = (Launch("to_half", (n, 1), g["NORM_THREADS"], ("x_in", dim, padded, "x")),) if precision == "fp16" else ()
    launches = (
        *convert,
        Launch(f"sq_norms_{suffix}", (n, 1), g["NORM_THREADS"], ("x", padded, "x_sq")),
        Launch(f"euclidean_topk_{suffix}", (query_blocks, slices), g["THREADS"],
               ("x", "x_sq", "bank", "bank_sq", n, m, padded, per_slice, "part_d", "part_i")),
        Launch("merge_topk", (math.ceil(n / g["MERGE_ROWS"]), 1), g["MERGE_THREADS"],
               ("part_d", "part_i", n, lists, "out_d", "out_i")),
    )
    buffers = {
        **({"x_in": ((n, dim), f32)} if convert else {}),
        "x": ((n, padded), PRECISIONS[precision]),
        "x_sq": ((n,), f32),
        "part_d": ((lists * k, n), f32),
        "part_i": ((lists * k, n), i32),
        "out_d": ((n, k), f32),
        "out_i": ((n, k), i32),
    }
    return QueryPlan(launches, buffers, "x_in" if convert else "x")


def check_query(x: np.ndarray, bank_shape: tuple[int, int], k: int) -> None:
    m, dim = bank_shape
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"queries of shape {x.shape} do not match the bank's {dim} dims")
    if not 1 <= k <= min(MAX_K, m):
        raise ValueError(f"k={k} must be between 1 and {min(MAX_K, m)} (the bank has {m} rows; the kernel keeps "
                         f"at most {MAX_K})")


class GpuNearest:
    """The memory bank on a GPU; ``nearest(x, k)`` as ``distance.nearest``. One thread at a time."""

    def __init__(self, bank: np.ndarray, precision: str = "fp32", device: object = None,
                 cache_dir: str | Path | None = None) -> None:
        from patchline.runtime.engines.engine_cache import cache_directory
        from patchline.runtime.search.cuda_device import CudaDevice

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        self.device = device if isinstance(device, CudaDevice) else CudaDevice(device or "cuda")
        import pycuda.driver as cuda  # importable now that CudaDevice found the driver

        check_range(bank, precision, "the memory bank")
        self.precision = precision
        self.shape = bank.shape
        self.dim = padded_dim(bank.shape[1], precision)
        # pycuda keys its on-disk cubin cache by source, options and GPU architecture.
        self.cache_dir = cache_directory(cache_dir) / "kernels"
        self.cache_dir.mkdir(exist_ok=True)
        self._modules: dict[int, object] = {}
        self._functions: dict[tuple[int, str], object] = {}
        self._device_buffers: dict[str, tuple[object, int]] = {}
        self._host_buffers: dict[str, np.ndarray] = {}
        with self.device.active():
            self.stream = cuda.Stream()
            rows = prepare_rows(bank, precision)
            self._bank = cuda.mem_alloc(rows.nbytes)
            cuda.memcpy_htod(self._bank, rows)
            self._bank_sq = cuda.mem_alloc(4 * bank.shape[0])
            self._run([bank_norm_launch(bank.shape[0], self.dim, precision)], 1, {})
            self.stream.synchronize()

    def _function(self, k: int, name: str, args: tuple[str | int, ...]):  # noqa: ANN202 - pycuda Function
        from pycuda.compiler import SourceModule

        from patchline.runtime.search.cuda_device import GpuUnavailable

        if (k, name) not in self._functions:
            if k not in self._modules:
                # pycuda asks nvcc for its version even when the compiled module is cached.
                nvcc = find_nvcc()
                if nvcc is None:
                    raise GpuUnavailable("the distance kernel is compiled by nvcc, which is not on PATH, in "
                                         "$CUDA_HOME/bin or /usr/local/cuda/bin; install the CUDA toolkit")
                # The source has its own extern "C" entry points around C++ templates.
                self._modules[k] = SourceModule(kernel_source(), nvcc=nvcc, options=compile_options(k),
                                                no_extern_c=True, cache_dir=str(self.cache_dir))
            function = self._modules[k].get_function(name)
            self._functions[k, name] = function.prepare("".join("P" if isinstance(a, str) else "i" for a in args))
        return self._functions[k, name]

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: np.dtype):  # noqa: ANN202 - DeviceAllocation
        import pycuda.driver as cuda

        nbytes = max(1, math.prod(shape) * dtype.itemsize)
        held = self._device_buffers.get(name)
        if held is None or held[1] < nbytes:  # grow only: frames of one line have the same size
            held = (cuda.mem_alloc(nbytes), nbytes)
            self._device_buffers[name] = held
        return held[0]

    def _pinned(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        import pycuda.driver as cuda

        size = math.prod(shape)
        held = self._host_buffers.get(name)
        if held is None or held.size < size or held.dtype != dtype:
            held = cuda.pagelocked_empty(size, dtype)
            self._host_buffers[name] = held
        return held[:size].reshape(shape)

    def _run(self, launches: list[Launch] | tuple[Launch, ...], k: int, buffers: dict[str, object]) -> None:
        pointers = {"bank": self._bank, "bank_sq": self._bank_sq, **buffers}
        for launch in launches:
            function = self._function(k, launch.kernel, launch.args)
            values = [int(pointers[a]) if isinstance(a, str) else a for a in launch.args]
            function.prepared_async_call(launch.grid, (launch.block, 1, 1), self.stream, *values)

    def _enqueue(self, x: np.ndarray, k: int) -> tuple[QueryPlan, dict[str, object]]:
        import pycuda.driver as cuda

        check_query(x, self.shape, k)
        plan = plan_queries(x.shape[0], self.shape[0], self.shape[1], k, self.precision, self.device.sm_count)
        buffers = {name: self._buffer(name, *spec) for name, spec in plan.buffers.items()}
        staged = self._pinned(plan.upload, *plan.buffers[plan.upload])
        staged[:] = x
        cuda.memcpy_htod_async(buffers[plan.upload], staged, self.stream)
        return plan, buffers

    def nearest(self, x: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distances (n, k) float32 and bank row indices (n, k) int64 of each query row's k nearest rows."""
        import pycuda.driver as cuda

        if x.shape[0] == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        with self.device.active():
            plan, buffers = self._enqueue(x, k)
            self._run(plan.launches, k, buffers)
            out_d = self._pinned("out_d", *plan.buffers["out_d"])
            out_i = self._pinned("out_i", *plan.buffers["out_i"])
            cuda.memcpy_dtoh_async(out_d, buffers["out_d"], self.stream)
            cuda.memcpy_dtoh_async(out_i, buffers["out_i"], self.stream)
            self.stream.synchronize()
        return out_d.copy(), out_i.astype(np.int64)

    def close(self) -> None:
        """Free the bank, the buffers, the stream and the compiled modules now, in this device's context.

        pycuda frees an object when its last reference goes, and only if its context can be made current
        there: at exit or on another thread it cannot, and the memory leaks (with a warning). Not usable after."""
        if self.stream is None:
            return
        with self.device.active():
            for allocation in [self._bank, self._bank_sq, *(held for held, _ in self._device_buffers.values())]:
                allocation.free()
            # The last references to pinned buffers, stream and modules go here, so they are freed in the context.
            self._device_buffers, self._host_buffers, self._functions, self._modules = {}, {}, {}, {}
            self._bank = self._bank_sq = self.stream = None

    def time_kernels(self, x: np.ndarray, k: int, repeats: int) -> list[float]:
        """Device time in ms of the query launches alone (queries uploaded once), for the benchmark."""
        import pycuda.driver as cuda

        times = []
        with self.device.active():
            plan, buffers = self._enqueue(x, k)
            self._run(plan.launches, k, buffers)  # compiles and loads the module outside the timing
            for _ in range(repeats):
                start, end = cuda.Event(), cuda.Event()
                start.record(self.stream)
                self._run(plan.launches, k, buffers)
                end.record(self.stream)
                end.synchronize()
                times.append(end.time_since(start))
        return times


def _backend(precision: str) -> DistanceBackend:
    def on_gpu(bank: MemoryBank, gpu: CudaDevice | None, cache_dir: str | Path | None) -> GpuNearest:
        return GpuNearest(bank.rows, precision, gpu, cache_dir)

    return on_gpu


DISTANCES.register("cuda")(_backend("fp32"))
DISTANCES.register("cuda-fp16")(_backend("fp16"))
