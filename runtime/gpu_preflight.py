"""Before a camera's daemon starts on the GPU: can this process open the GPU's device nodes?

CUDA's own failure for a node it cannot open is a bare "no CUDA-capable device" (or a hang in
the driver). Under the hardened unit the usual causes are deployment ones: a node the unit's
device policy does not allow, /dev/nvidia-uvm never created because the service may not load
kernel modules, a user outside the node's group. This names the node and the fix instead.
Plain Python: nothing here needs CUDA.
"""

from __future__ import annotations

import errno
import grp
import os
from pathlib import Path

from patchline.runtime.config import CameraConfig, ConfigError
from patchline.runtime.search.cuda_device import device_index

DROP_IN = "systemctl edit patchline@<camera>"
NVIDIA_MODPROBE = ("the NVIDIA driver's nvidia-modprobe creates it: `sudo nvidia-modprobe -u -c={index}` (the camera's "
                   "own unit may not load modules; patchline-nvidia-devices.service does this at boot); `nvidia-smi` "
                   "says whether the driver is loaded")
NVGPU = "JetPack's GPU driver (nvgpu) creates it: see `dmesg | grep -i nvgpu`"


class GpuDeviceError(ConfigError):
    """The GPU the run config asks for cannot be opened from this process; a restart does not change that."""


def needs_gpu(config: CameraConfig) -> bool:
    """Whether the run config cannot run without a GPU (``device: auto`` falls back to the CPU)."""
    return config.engine == "tensorrt" or config.distance != "cpu" or config.device not in ("auto", "cpu")


def required_nodes(index: int, dev: Path = Path("/dev")) -> dict[Path, str]:
    """The nodes CUDA opens for GPU ``index``, each with what creates it: a Jetson's (JetPack 6) where nvmap or
    nvgpu exist, else a discrete GPU's (the control node, the card, CUDA's unified memory)."""
    if (dev / "nvmap").exists() or (dev / "nvgpu").exists():
        return {dev / "nvmap": NVGPU, dev / "nvgpu" / "igpu0" / "ctrl": NVGPU}
    make = NVIDIA_MODPROBE.format(index=index)
    return {dev / "nvidiactl": make, dev / f"nvidia{index}": make, dev / "nvidia-uvm": make}


def _problem(node: Path, created_by: str) -> str | None:
    try:
        os.close(os.open(node, os.O_RDWR))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return f"{node} does not exist; {created_by}"
        if exc.errno == errno.EPERM:  # the device cgroup: DevicePolicy=closed and no DeviceAllow= for this node
            return (f"{node} may not be opened by this service (its device policy): allow it with `DeviceAllow={node} "
                    f"rw` in a drop-in ({DROP_IN}); `grep nvidia /proc/devices` shows the driver's names for the "
                    "char-nvidia* groups the unit allows")
        if exc.errno == errno.EACCES:
            group = grp.getgrgid(node.stat().st_gid).gr_name
            return (f"{node} may not be opened by this user: it belongs to group {group!r}; add the service's user to "
                    f"it (SupplementaryGroups={group} in a drop-in: {DROP_IN})")
        return f"{node} cannot be opened: {exc.strerror}"
    return None


def check_gpu_nodes(index: int, dev: Path = Path("/dev")) -> None:
    """Raise GpuDeviceError naming the first node of GPU ``index`` this process cannot open, and how to fix it."""
    for node, created_by in required_nodes(index, dev).items():
        problem = _problem(node, created_by)
        if problem is not None:
            raise GpuDeviceError(f"GPU {index} cannot be used from this process: {problem}")


def preflight(config: CameraConfig, dev: Path = Path("/dev")) -> None:
    """The daemon's GPU check at start, for a run config that needs the GPU."""
    if needs_gpu(config):
        # The CUDA distance kernel beside a CPU backbone, and ONNX Runtime's TensorRT provider, run on GPU 0.
        check_gpu_nodes(device_index(config.device) if config.device.startswith("cuda") else 0, dev)
