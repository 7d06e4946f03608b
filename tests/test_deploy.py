"""The systemd units (deploy/) and the daemon's GPU preflight: what the hardened service can reach."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from patchline.runtime.config import RunConfig
from patchline.runtime.gpu_preflight import GpuDeviceError, check_gpu_nodes, needs_gpu, preflight, required_nodes

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
CAMERA_UNIT = DEPLOY / "patchline@.service"
DEVICES_UNIT = DEPLOY / "patchline-nvidia-devices.service"


def directives(unit: Path) -> dict[str, list[str]]:
    """``Section.Key`` → its values in order (systemd allows a key more than once)."""
    found: dict[str, list[str]] = defaultdict(list)
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[f"{section}.{key}"].append(value)
    return found


def allowed(unit: Path) -> dict[str, str]:
    """The unit's DeviceAllow= entries: device path or char-GROUP → access."""
    return dict(entry.rsplit(" ", 1) for entry in directives(unit)["Service.DeviceAllow"])


def fake_dev(root: Path, nodes: list[str]) -> Path:
    for name in nodes:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    # As `make install` writes them, with executables that exist on this machine.
    (tmp_path / "patchline@cam1.service").write_text(
        CAMERA_UNIT.read_text().replace("/opt/patchline/venv/bin/patchline", str(Path(sys.executable))))
    (tmp_path / DEVICES_UNIT.name).write_text(DEVICES_UNIT.read_text().replace("/usr/bin/nvidia-modprobe", "/bin/true"))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", "patchline@cam1.service", DEVICES_UNIT.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_cameras_share_one_engine_cache_and_keep_their_own_state() -> None:
    unit = directives(CAMERA_UNIT)
    assert unit["Service.CacheDirectory"] == ["patchline"]  # not patchline/%i: one engine build for all cameras
    assert unit["Service.StateDirectory"] == ["patchline/%i"]
    assert unit["Service.Environment"] == ["PYTHONUNBUFFERED=1", "CUDA_CACHE_PATH=%C/patchline/cuda"]


def test_camera_unit_allows_every_node_the_preflight_requires(tmp_path: Path) -> None:
    devices = allowed(CAMERA_UNIT)
    assert directives(CAMERA_UNIT)["Service.DevicePolicy"] == ["closed"]
    # /proc/devices names major 195 "nvidia-frontend" (older drivers) or "nvidia" and "nvidiactl" (driver 580.159 on an
    # H200: 195 nvidia, 195 nvidiactl, 238 nvidia-uvm, 241 nvidia-caps).
    groups = {"nvidiactl": ("char-nvidia-frontend", "char-nvidiactl"), "nvidia0": ("char-nvidia-frontend", "char-nvidia"),
              "nvidia-uvm": ("char-nvidia-uvm",)}
    for node in required_nodes(0, tmp_path / "x86"):
        assert all(devices.get(group) == "rw" for group in groups[node.name]), node
    jetson = fake_dev(tmp_path / "jetson", ["nvmap"])
    for node in required_nodes(0, jetson):
        assert devices.get("/dev/" + str(node.relative_to(jetson))) == "rw", node
    assert devices["char-video4linux"] == "rw" and devices["char-nvidia-caps"] == "r"


def test_camera_unit_orders_after_the_unit_that_creates_nvidia_uvm() -> None:
    unit, devices = directives(CAMERA_UNIT), directives(DEVICES_UNIT)
    assert "patchline-nvidia-devices.service" in unit["Unit.After"][0].split()
    assert "patchline-nvidia-devices.service" in unit["Unit.Wants"][0].split()
    assert devices["Service.ExecStart"] == ["/usr/bin/nvidia-modprobe -u -c=0"]
    assert devices["Unit.ConditionPathExists"] == ["/usr/bin/nvidia-modprobe"]  # skipped on a Jetson
    # The hardening that keeps the camera's unit from doing it itself stays on.
    assert directives(CAMERA_UNIT)["Service.NoNewPrivileges"] == ["yes"]
    assert directives(CAMERA_UNIT)["Service.ProtectKernelModules"] == ["yes"]


def test_preflight_names_the_missing_discrete_gpu_node_and_the_fix(tmp_path: Path) -> None:
    dev = fake_dev(tmp_path, ["nvidiactl", "nvidia1"])
    with pytest.raises(GpuDeviceError, match=rf"GPU 1 cannot be used from this process: {dev}/nvidia-uvm does not "
                                             r"exist; .*`sudo nvidia-modprobe -u -c=1`"):
        check_gpu_nodes(1, dev)
    with pytest.raises(GpuDeviceError, match=rf"{dev}/nvidia0 does not exist"):
        check_gpu_nodes(0, dev)
    fake_dev(dev, ["nvidia-uvm"])
    check_gpu_nodes(1, dev)


def test_preflight_on_a_jetson_checks_its_nvgpu_nodes(tmp_path: Path) -> None:
    dev = fake_dev(tmp_path, ["nvmap"])
    with pytest.raises(GpuDeviceError, match=rf"{dev}/nvgpu/igpu0/ctrl does not exist; JetPack's GPU driver"):
        check_gpu_nodes(0, dev)
    fake_dev(dev, ["nvgpu/igpu0/ctrl"])
    check_gpu_nodes(0, dev)
    (dev / "nvmap").unlink()
    (dev / "nvmap").mkdir()  # present but not a device that opens
    with pytest.raises(GpuDeviceError, match=rf"{dev}/nvmap cannot be opened: Is a directory"):
        check_gpu_nodes(0, dev)


RUN = {"camera": "cam1", "artifact": "/nonexistent/model", "source": {"kind": "folder", "path": "/srv/inbox"},
       "threshold": 1.0}


@pytest.mark.parametrize("settings,gpu", [
    ({}, False), ({"device": "auto"}, False), ({"device": "cpu"}, False),
    ({"device": "cuda"}, True), ({"device": "tensorrt"}, True), ({"engine": "tensorrt"}, True),
    ({"distance": "cuda-fp16"}, True),
    ({"device": "cpu", "distance": "cuda"}, True),  # the kernel beside a CPU backbone: GPU 0
])
def test_only_run_configs_that_need_the_gpu_are_checked(tmp_path: Path, settings: dict, gpu: bool) -> None:
    config = RunConfig.model_validate({**RUN, **settings})
    assert needs_gpu(config) is gpu
    if gpu:  # an empty /dev: refused only when the GPU is needed
        with pytest.raises(GpuDeviceError, match="nvidiactl does not exist"):
            preflight(config, tmp_path)
    else:
        preflight(config, tmp_path)
