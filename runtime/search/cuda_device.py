"""One CUDA GPU through pycuda, shared by the TensorRT engine and the distance kernel.

pycuda works on the device's *primary* context, the one the CUDA runtime gives TensorRT,
ONNX Runtime and CuPy, so buffers and streams can be handed between them. Each use makes
it current on the calling thread and releases it after, so an instance may be used from
any thread (one at a time). pycuda is imported here, so import this module lazily.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class GpuUnavailable(RuntimeError):
    """The GPU cannot do this job: no driver or device, a GPU library that cannot start, out of device
    memory, a kernel that does not compile. The message says which."""


def driver_facts() -> str:
    """The NVIDIA driver's release and the newest CUDA it supports, in words, for error messages.

    Read from the kernel module and libcuda directly: this is what explains why CUDA libraries built
    for a newer CUDA cannot start, and it must work where pycuda cannot.
    """
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
        release = f"NVIDIA driver {found.group(1)}" if found else "an NVIDIA driver of unknown release"
    except OSError:  # Jetson's driver has no such file
        release = None
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return f"{release}, but libcuda.so.1 cannot be loaded" if release else "no NVIDIA driver (no libcuda.so.1)"
    version = ctypes.c_int(0)
    supports = (f"supporting CUDA up to {version.value // 1000}.{version.value % 1000 // 10}"
                if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else "not reporting its CUDA version")
    return f"{release or 'an NVIDIA driver (release unknown)'}, {supports}"


def device_index(device: str | int) -> int:
    """``"cuda"`` or ``"auto"`` → 0, ``"cuda:N"`` → N, an int as is."""
    if isinstance(device, int):
        return device
    name, _, number = device.partition(":")
    if name not in ("cuda", "auto") or (number and not number.isdigit()):
        raise ValueError(f"device {device!r}: expected 'cuda' or 'cuda:N'")
    return int(number or 0)


def _driver():  # noqa: ANN202 - the pycuda.driver module
    try:
        import pycuda.driver as cuda
    except ImportError as exc:  # also raised when pycuda is installed but libcuda.so is not
        raise GpuUnavailable(f"pycuda cannot be imported ({exc}); install the 'gpu' extra on a machine with "
                             "an NVIDIA driver") from None
    try:
        cuda.init()
    except cuda.Error as exc:
        raise GpuUnavailable(f"the CUDA driver did not initialise: {exc}") from None
    return cuda


class CudaDevice:
    def __init__(self, device: str | int = "cuda") -> None:
        cuda = _driver()
        index = device_index(device)
        count = cuda.Device.count()
        if not 0 <= index < count:
            raise GpuUnavailable(f"CUDA device {index} asked for, but this machine has {count}")
        self.index = index
        self.name = f"#{index}"  # until the device says its name, for errors
        with self._errors():
            self.device = cuda.Device(index)
            self.context = self.device.retain_primary_context()
            self.name = self.device.name()
            major, minor = self.device.compute_capability()
            self.compute_capability = f"{major}.{minor}"
            self.sm_count: int = self.device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
            self.driver_version: int = cuda.get_driver_version()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        # pycuda's errors (its MemoryError, CompileError, LogicError, ...) are not Python's: callers that
        # refuse to start on a GPU problem see one kind, GpuUnavailable, naming the device.
        import pycuda.driver as cuda

        try:
            yield
        except cuda.Error as exc:
            raise GpuUnavailable(f"CUDA device {self.index} ({self.name}): {type(exc).__name__}: {exc}") from exc

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this device's primary context current on the calling thread for the block; pycuda errors
        raised in it become GpuUnavailable."""
        import pycuda.driver as cuda

        with self._errors():
            self.context.push()
            try:
                yield
            finally:
                cuda.Context.pop()

    def describe(self) -> dict[str, object]:
        return {"index": self.index, "name": self.name, "compute_capability": self.compute_capability,
                "multiprocessors": self.sm_count, "driver_version": self.driver_version,
                "memory_gib": round(self.device.total_memory() / 2**30, 2)}


def gpu_unavailable_reason(device: str | int = "cuda") -> str | None:
    """Why no GPU work can run here, or None when a device is ready (used to skip GPU tests and benchmarks)."""
    try:
        CudaDevice(device)
    except GpuUnavailable as exc:
        return str(exc)
    return None
