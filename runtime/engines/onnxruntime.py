"""The ``onnxruntime`` engine: the artifact's ONNX model in an ONNX Runtime session on the CPU, CUDA, or ONNX
Runtime's TensorRT provider; and the check that exactly one ONNX Runtime is installed."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, distribution
from types import ModuleType

import numpy as np

from patchline.runtime.artifact import Artifact, ArtifactError
from patchline.runtime.config import TensorRtConfig
from patchline.runtime.engines import ENGINES, EngineSettings
from patchline.runtime.search.cuda_device import GpuUnavailable
from patchline.runtime.search.distance import available_cores

GRAPH_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                      "all": "ORT_ENABLE_ALL"}
# Where the session runs: the provider lists onnxruntime_providers makes.
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
# ONNX Runtime's builds on PyPI (and NVIDIA's for Jetson): each installs the same `onnxruntime` module.
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "onnxruntime-qnn", "onnxruntime-training")
INSTALL_ONE_ORT = ("pip install 'patchline[cpu]', or on an NVIDIA GPU box 'patchline[gpu-cu12]' (driver >= 525) or "
                   "'patchline[gpu-cu13]' (driver >= 580); on a Jetson, NVIDIA's onnxruntime-gpu wheel for JetPack")


class InstallError(ValueError):
    """A package the runtime needs is missing, or installed twice over; the message says how to fix it."""


def installed_distributions(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` that are installed in this Python environment."""
    found = []
    for name in names:
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return found


def import_onnxruntime() -> ModuleType:
    """The ``onnxruntime`` module, refused with the fix when no ONNX Runtime or more than one is installed.

    Two ONNX Runtime distributions overwrite each other's files, so which one runs, and whether it still
    has its CUDA provider, depends on the order they were installed in.
    """
    installed = installed_distributions(ORT_DISTRIBUTIONS)
    if len(installed) > 1:
        raise InstallError(f"{' and '.join(installed)} are installed together and overwrite each other's `onnxruntime` "
                           f"module; keep exactly one: pip uninstall -y {' '.join(installed)}, then {INSTALL_ONE_ORT}")
    try:
        import onnxruntime
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        raise InstallError(f"no ONNX Runtime is installed: {INSTALL_ONE_ORT}") from None
    return onnxruntime


def onnxruntime_providers(
    device: str, available: list[str], artifact: Artifact, tensorrt: TensorRtConfig | None = None
) -> list[str | tuple[str, dict[str, object]]]:
    """ONNX Runtime's provider list for ``device``, or GpuUnavailable naming what this onnxruntime lacks.

    "auto": CUDA when this onnxruntime has it, else CPU. "cuda": the CUDA provider (onnxruntime-gpu).
    "tensorrt": ONNX Runtime's TensorRT provider, with CUDA under it for what TensorRT cannot run,
    for boxes without TensorRT's own Python package; it builds and caches its engines itself.
    """
    if device not in DEVICES:
        raise ValueError(f"device {device!r}: expected one of {', '.join(DEVICES)}")
    cuda = "CUDAExecutionProvider" in available
    if device == "cpu" or (device == "auto" and not cuda):
        return ["CPUExecutionProvider"]
    if device in ("auto", "cuda"):
        if not cuda:
            raise GpuUnavailable(f"device 'cuda' needs onnxruntime-gpu (CUDAExecutionProvider); this onnxruntime "
                               f"offers {available}")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in available:
        raise GpuUnavailable(f"device 'tensorrt' needs an onnxruntime-gpu built with TensorrtExecutionProvider and "
                           f"TensorRT's libraries; this onnxruntime offers {available}")
    from patchline.runtime.engines.engine_cache import cache_directory

    settings = tensorrt or TensorRtConfig()
    if settings.precision == "int8":
        raise ValueError("device 'tensorrt' through ONNX Runtime runs fp16 or fp32; use the tensorrt engine for int8")
    cache = cache_directory(settings.cache_dir) / "onnxruntime-trt"
    cache.mkdir(exist_ok=True)
    name, (height, width) = artifact.manifest.preprocess.input_name, artifact.manifest.preprocess.input_size
    low, opt, high = (f"{name}:{b}x3x{height}x{width}" for b in settings.batch_profile)
    options = {
        "trt_fp16_enable": settings.precision == "fp16",
        "trt_max_workspace_size": settings.workspace_mb << 20,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": settings.timing_cache,
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": low,
        "trt_profile_opt_shapes": opt,
        "trt_profile_max_shapes": high,
    }
    return [("TensorrtExecutionProvider", options), *(["CUDAExecutionProvider"] if cuda else []), "CPUExecutionProvider"]


@ENGINES.register("onnxruntime")
class OnnxRuntimeEngine:
    """ONNX Runtime session on the CPU, CUDA, or ONNX Runtime's TensorRT provider (see onnxruntime_providers)."""

    name = "onnxruntime"
    gpu = None  # ONNX Runtime's CUDA provider holds GPU 0 itself, not through a CudaDevice

    def __init__(self, artifact: Artifact, settings: EngineSettings = EngineSettings()) -> None:
        ort = import_onnxruntime()
        providers = onnxruntime_providers(settings.device, ort.get_available_providers(), artifact, settings.tensorrt)
        options = ort.SessionOptions()
        level = settings.graph_optimization
        if level not in GRAPH_OPTIMIZATION:
            raise ValueError(f"graph_optimization {level!r}: one of {', '.join(GRAPH_OPTIMIZATION)}")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, GRAPH_OPTIMIZATION[level])
        options.intra_op_num_threads = settings.threads or available_cores()
        # ONNX Runtime's workers spin after a run by default, and on a small box they take the cores from the
        # nearest-row search that follows: stop them when the run returns (spinning within a run stays).
        options.add_session_config_entry("session.force_spinning_stop", "1")
        # An explicit model file (the benchmark's NAME@FILE variants) wins over the precision's.
        self.model_file = settings.model_file or artifact.model_file(settings.precision)
        path = artifact.file(self.model_file)
        if not path.is_file():
            raise ArtifactError(f"{path}: no such model file in the artifact")
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.providers = self.session.get_providers()
        wanted = providers[0] if isinstance(providers[0], str) else providers[0][0]
        if self.providers[0] != wanted:
            # onnxruntime falls back to the CPU, with only a logged error, when a GPU library fails to load.
            raise GpuUnavailable(f"onnxruntime could not start {wanted} (the session runs on {self.providers}); its "
                               "log above names the CUDA, cuDNN or TensorRT library it could not load")
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
