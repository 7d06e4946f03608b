"""The ``tensorrt`` engine: the artifact's backbone as a TensorRT engine built on this box.

Device buffers and pinned host buffers are allocated once, for the largest batch of the
engine's profile. A call copies in only the frames it has and copies out only their
embeddings, on one CUDA stream with ``execute_async_v3``. TensorRT and pycuda are imported
when an engine is made, so importing this module needs neither. One thread at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from patchline.runtime.artifact import Artifact, ArtifactError
from patchline.runtime.engines import ENGINES, EngineSettings
from patchline.runtime.engines.engine_cache import EngineError


def load_engine(path: Path):  # noqa: ANN201 - (trt.ICudaEngine, trt.Runtime)
    """Deserialise an engine file; TensorRT's own refusal (version, device) becomes an EngineError."""
    from patchline.runtime.engines.trt_build import construct, tensorrt_module

    trt = tensorrt_module()
    runtime = construct(trt, trt.Runtime)
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise EngineError(f"{path}: TensorRT {trt.__version__} could not deserialise this engine (its log above "
                          "says why); delete it and its .json to have it rebuilt")
    return engine, runtime  # the runtime must outlive the engine


def _refuse_onnxruntime_models(artifact: Artifact, settings: EngineSettings) -> None:
    """TensorRT builds its engine from the artifact's fp32 ONNX model, at ``tensorrt.precision``; the other ONNX
    files of an artifact (its ONNX Runtime INT8 model, a benchmark's) run on the onnxruntime engine only."""
    if settings.precision != "fp32":
        raise ValueError(f"precision {settings.precision} runs the artifact's quantised ONNX model on the onnxruntime "
                         f"engine, not on 'tensorrt'; for TensorRT keep precision fp32 and set tensorrt.precision: "
                         f"{settings.precision}")
    if settings.model_file not in (None, artifact.manifest.model.file):
        raise ValueError(f"model file {settings.model_file} runs on the onnxruntime engine; engine 'tensorrt' runs "
                         f"{artifact.manifest.model.file}")


@ENGINES.register("tensorrt")
class TensorRtEngine:
    name = "tensorrt"

    def __init__(self, artifact: Artifact, settings: EngineSettings = EngineSettings()) -> None:
        _refuse_onnxruntime_models(artifact, settings)  # a config error: found before any GPU is touched
        from patchline.runtime.engines.trt_build import prepare_engine, tensorrt_module
        from patchline.runtime.search.cuda_device import CudaDevice

        self.model_file = artifact.manifest.model.file
        self.gpu = CudaDevice("cuda" if settings.device == "auto" else settings.device)
        trt = tensorrt_module()
        import pycuda.driver as cuda  # importable now that CudaDevice found the driver

        self.engine_file, self.built = prepare_engine(artifact, settings.tensorrt, self.gpu)
        manifest = artifact.manifest
        self.input_name, self.output_name = manifest.preprocess.input_name, manifest.model.output_name
        with self.gpu.active():
            self._engine, self._runtime = load_engine(self.engine_file)
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            if inputs != [self.input_name] or outputs != [self.output_name]:
                raise EngineError(f"{self.engine_file}: engine has inputs {inputs} and outputs {outputs}, the "
                                  f"manifest names {self.input_name!r} → {self.output_name!r}")
            low, _, high = (tuple(shape) for shape in self._engine.get_tensor_profile_shape(self.input_name, 0))
            self.min_batch, self.max_batch, self.input_shape = low[0], high[0], high[1:]
            self.context = self._engine.create_execution_context()
            self._set_input_shape(high)
            out_shape = tuple(self.context.get_tensor_shape(self.output_name))
            self._host_in = cuda.pagelocked_empty(high, trt.nptype(self._engine.get_tensor_dtype(self.input_name)))
            self._host_out = cuda.pagelocked_empty(out_shape, trt.nptype(self._engine.get_tensor_dtype(self.output_name)))
            self._device_in = cuda.mem_alloc(self._host_in.nbytes)
            self._device_out = cuda.mem_alloc(self._host_out.nbytes)
            self.context.set_tensor_address(self.input_name, int(self._device_in))
            self.context.set_tensor_address(self.output_name, int(self._device_out))
            self.stream = cuda.Stream()
        expected = (*manifest.model.patch_grid, manifest.model.embedding_dim)
        if out_shape[1:] != expected:
            raise ArtifactError(f"{self.engine_file}: output shape {out_shape} disagrees with the manifest's {expected}")
        if settings.warm_up:
            # The first run of each shape loads kernels and plans memory: not on the first frame.
            for batch in sorted({self.min_batch, self.max_batch}):
                self(np.zeros((batch, *self.input_shape), np.float32))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        if batch.ndim != 4 or batch.shape[1:] != self.input_shape or batch.shape[0] == 0:
            raise ValueError(f"batch of shape {batch.shape}: this engine takes (1.., "
                             f"{', '.join(map(str, self.input_shape))}); batches beyond {self.max_batch} are split")
        step = self.max_batch
        return np.concatenate([self._run(batch[i : i + step]) for i in range(0, batch.shape[0], step)])

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import pycuda.driver as cuda

        n = batch.shape[0]
        # Fewer frames than the profile's min batch (a small call, or the last piece of a split one) run
        # as a min batch with zero frames after them; only the frames given are copied back.
        run = max(n, self.min_batch)
        host_in = self._host_in[:run]
        with self.gpu.active():
            np.copyto(host_in[:n], batch, casting="same_kind")
            host_in[n:] = 0
            cuda.memcpy_htod_async(self._device_in, host_in, self.stream)
            self._set_input_shape((run, *self.input_shape))
            if not self.context.execute_async_v3(self.stream.handle):
                raise EngineError(f"{self.engine_file}: TensorRT failed to run a batch of {run} (its log above says why)")
            cuda.memcpy_dtoh_async(self._host_out[:n], self._device_out, self.stream)
            self.stream.synchronize()
        return self._host_out[:n].astype(np.float32)  # a copy: the pinned buffer is reused by the next call

    def close(self) -> None:
        """Free the engine, its context, buffers and stream now, in the device's context (see GpuNearest.close)."""
        if self.stream is None:
            return
        with self.gpu.active():
            self._device_in.free()
            self._device_out.free()
            # TensorRT objects go context first, then engine, then runtime, all with the context current.
            del self.context
            del self._engine
            del self._runtime
            self._host_in = self._host_out = self._device_in = self._device_out = self.stream = None

    def _set_input_shape(self, shape: tuple[int, ...]) -> None:
        # TensorRT answers False, with only a logged error, for a shape outside the profile.
        if not self.context.set_input_shape(self.input_name, tuple(shape)):
            raise EngineError(f"{self.engine_file}: TensorRT refused input shape {tuple(shape)} for "
                              f"{self.input_name!r}; the engine's profile 0 takes ({self.min_batch}..{self.max_batch}, "
                              f"{', '.join(map(str, self.input_shape))})")
