"""Turn an anomalib-trained PatchCore model into a patchline artifact, reading it with torch alone.

anomalib is not a dependency. Its files are read with ``torch.load`` through a restricted unpickler:
tensors are rebuilt, every class the file names (anomalib's, Lightning's, timm's, torchvision's)
becomes an inert stand-in that only records the state it is given, and no code from the file runs.

The layout relied on, from anomalib 2.x's source (``src/anomalib/models/image/patchcore/``,
``models/components/feature_extractors/timm.py``, ``post_processing/post_processor.py``,
``models/components/base/anomalib_module.py`` and ``export_mixin.py``):

Lightning checkpoint (``*.ckpt``, ``engine.trainer.save_checkpoint``), a dict:
  ``state_dict``
    ``model.feature_extractor.feature_extractor.<key>``  the backbone: TimmFeatureExtractor's
        ``timm.create_model(backbone, features_only=True, exportable=True, out_indices=<layers' indices>)``
    ``model.memory_bank``                        (rows, D) float32, the coreset
    ``post_processor._image_threshold``, ``post_processor._pixel_threshold``
                                                 raw F1-adaptive thresholds (NaN until validated)
    ``post_processor.image_min`` / ``image_max`` / ``pixel_min`` / ``pixel_max``
                                                 min-max normalisation statistics (NaN until validated)
  ``hyper_parameters`` (Lightning's ``save_hyperparameters`` of ``Patchcore.__init__``)
    ``backbone`` (timm name), ``layers``, ``num_neighbors``, ``coreset_sampling_ratio``.
  The pre- and post-processor, in two layouts:
    anomalib 2.7 (``AnomalibModule.on_save_checkpoint``): ``anomalib_components_enabled`` (which of
      them exist), ``anomalib_pre_processor_config = {"transform": spec}`` with the transform as plain
      data, ``{"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [256, 256], ...}}``
      (``Compose`` nesting its ``transforms``; ``None`` when anomalib could not serialise it), and
      ``anomalib_post_processor_config`` (``image_sensitivity``, ``enable_normalization``, ...).
    earlier 2.x releases: ``hyper_parameters["pre_processor"]`` / ``["post_processor"]``, either the
      pickled objects passed to ``Patchcore`` or ``True`` for "the default of the anomalib release that
      wrote the file". That default changed between releases (first Resize + a CenterCrop of 224/256 of
      the size, later Resize alone), so ``True`` says nothing patchline can rely on: such a file is refused.
Exported torch model (``engine.export(model, ExportType.TORCH)``): ``{"model": <Patchcore>}``, the whole
  LightningModule pickled; the same tensors sit in its module tree under the same dotted names, the
  backbone, layers and num_neighbors are attributes of ``model.model`` (PatchcoreModel), and the
  pre-/post-processors are the submodules ``pre_processor`` / ``post_processor``. The pre-processor's
  ``transform`` is the one the memory bank was fitted with (its ``export_transform``, which anomalib
  applies only when the exported module is called directly, drops the antialiasing: not the fitted pixels).

anomalib's scoring (PatchcoreModel.forward): each layer 3×3 average-pooled, resized to the first
layer's grid, concatenated — patchline's ``PatchEmbedding`` — then the nearest bank row and the
k-neighbour reweighting, as ``patchline.runtime.score``. TimmFeatureExtractor zips the layer names with
timm's outputs, which come in network order, so the concatenation is always in network order.
The post-processor's normalisation ``clip((score − threshold) / (max − min) + 0.5, 0, 1)`` is
``patchline.runtime.decision.normalise``; its label, normalised score > 1 − sensitivity, is the raw score
above threshold + (0.5 − sensitivity)·(max − min), which becomes the artifact's threshold.
"""

from __future__ import annotations

import logging
import math
import pickle
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchline.export.backbone import BackboneError, create_backbone, feature_layers, load_state
from patchline.export.embedding import PatchEmbedding
from patchline.export.fit import write_artifact
from patchline.export.onnx_export import INPUT_NAME
from patchline.runtime.artifact import BackboneInfo, Manifest, PreprocessInfo, TrainingInfo, sha256_file
from patchline.export.config import ExportConfig
from patchline.runtime.decision import Calibration

log = logging.getLogger("patchline.export")

BACKBONE_PREFIX = "model.feature_extractor.feature_extractor."
BANK_KEY = "model.memory_bank"
POST = "post_processor."
# anomalib 2.7's checkpoint keys for its components (AnomalibModule.on_save_checkpoint).
ENABLED, PRE_CONFIG, POST_CONFIG = "anomalib_components_enabled", "anomalib_pre_processor_config", "anomalib_post_processor_config"
CROPS = {"CenterCrop", "ExportableCenterCrop"}  # anomalib's export variant crops at the same offsets
# Steps that only turn an image into a float tensor in [0, 1]: what patchline's preprocessing does anyway.
CONVERSIONS = {"ToImage", "ToDtype", "ToTensor", "ConvertImageDtype", "ToPureTensor"}


class AnomalibImportError(ValueError):
    """A file that is not an anomalib PatchCore model patchline can reproduce; the message says why."""


class Inert:
    """Stand-in for a class named in the file: keeps what unpickling hands it, runs nothing."""

    path = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _items={}, _list=[])
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state, slots = state
            self.__dict__.update(slots)
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items[key] = value

    def append(self, item: Any) -> None:
        self._list.append(item)

    def extend(self, items: list[Any]) -> None:
        self._list.extend(items)


def field(obj: Any, key: str, default: Any = None) -> Any:
    """``obj[key]`` of a dict, or a stand-in's attribute or item (Lightning's AttributeDict); else ``default``."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    if isinstance(obj, Inert):
        return obj.__dict__.get(key, obj.__dict__["_items"].get(key, default))
    return default


_REAL = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
}


class _Unpickler(pickle.Unpickler):
    _stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = "builtins" if module == "__builtin__" else module  # protocol 2 writes Python 2's name
        if (module, name) in _REAL:
            return _REAL[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        key = (module, name)
        if key not in self._stand_ins:
            self._stand_ins[key] = type(name, (Inert,), {"path": f"{module}.{name}"})
        return self._stand_ins[key]


_RESTRICTED = types.ModuleType("patchline_restricted_pickle")
_RESTRICTED.Unpickler = _Unpickler
_RESTRICTED.load = lambda file, **kwargs: _Unpickler(file, **kwargs).load()


def read_file(path: Path) -> Any:
    """The file's pickle with tensors rebuilt and every other class an Inert stand-in."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        # weights_only=False only because the unpickler is ours: it builds nothing but tensors and stand-ins.
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise AnomalibImportError(f"{path}: not a torch checkpoint ({type(exc).__name__}: {exc})") from None


def _flatten(module: Inert, prefix: str = "") -> dict[str, torch.Tensor]:
    """A pickled nn.Module's persistent tensors under their state-dict names."""
    state: dict[str, torch.Tensor] = {}
    skip = field(module, "_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, tensor in (field(module, kind) or {}).items():
            if tensor is not None and name not in skip:
                state[prefix + name] = tensor
    for name, child in (field(module, "_modules") or {}).items():
        if isinstance(child, Inert):
            state.update(_flatten(child, f"{prefix}{name}."))
    return state


@dataclass
class AnomalibPatchcore:
    """What patchline needs from an anomalib PatchCore model."""

    backbone: str
    layers: list[str]  # in network order: the order anomalib concatenates them
    num_neighbors: int
    coreset_ratio: float
    backbone_state: dict[str, torch.Tensor]
    memory_bank: np.ndarray
    preprocess: dict[str, Any]  # PreprocessInfo fields
    calibration: Calibration | None


def _value(tensor: torch.Tensor | None) -> float:
    return float("nan") if tensor is None else float(tensor)


def _calibration(state: dict[str, torch.Tensor], post: Any) -> Calibration | None:
    """anomalib's post-processor statistics as patchline's calibration; None when there is nothing to import."""
    if post is False:
        log.warning("the anomalib model has no post-processor: run `patchline calibrate` on the artifact")
        return None
    image, pixel = _value(state.get(POST + "_image_threshold")), _value(state.get(POST + "_pixel_threshold"))
    low, high = _value(state.get(POST + "image_min")), _value(state.get(POST + "image_max"))
    if field(post, "enable_threshold_matching", True):  # anomalib uses one threshold for both when the other is unset
        image, pixel = (pixel if math.isnan(image) else image), (image if math.isnan(pixel) else pixel)
    if math.isnan(low) or math.isnan(high) or not field(post, "enable_normalization", True):
        log.warning("the anomalib model has no normalisation statistics: run `patchline calibrate` on the artifact")
        return None
    method = "anomalib F1-adaptive threshold (imported)"
    if math.isnan(image):  # anomalib's own fallback when only min and max are known
        image, method = (low + high) / 2, "anomalib min-max midpoint (imported; no threshold in the model)"
    sensitivity = field(post, "image_sensitivity", 0.5)
    # Outside (0, 1] the clipped normalised score never exceeds 1 − sensitivity, or always does.
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, float)) or not 0 < sensitivity <= 1:
        raise AnomalibImportError(f"post-processor image_sensitivity {sensitivity!r}: patchline reproduces anomalib's "
                                  "labels for a number in (0, 1]")
    sensitivity = float(sensitivity)
    # anomalib labels NG above normalised 1 − sensitivity; patchline above the raw threshold (normalised 0.5).
    verdict_threshold = image + (0.5 - sensitivity) * (high - low)
    if sensitivity != 0.5:
        log.warning("anomalib image_sensitivity %.3g: threshold %.6g becomes %.6g, where anomalib's label turns NG; "
                    "normalised scores are anomalib's shifted by %.3g", sensitivity, image, verdict_threshold, sensitivity - 0.5)
    return Calibration(
        image_threshold=verdict_threshold,
        pixel_threshold=None if math.isnan(pixel) else pixel,
        score_min=low,
        score_max=high,
        method=method,
        details={
            "source": "anomalib post_processor",
            **{key: value for key in ("pixel_min", "pixel_max") if not math.isnan(value := _value(state.get(POST + key)))},
            "anomalib_image_threshold": image,
            "image_sensitivity": sensitivity,
        },
    )


def _steps(transform: Any) -> list[tuple[str, str, Any]]:
    """A torchvision transform (or Compose of them), pickled or as anomalib's plain-data spec, as a flat
    list of (class name, class path, fields) in the order they run."""
    if isinstance(transform, dict) and set(transform) == {"class_path", "init_args"}:
        path, fields = str(transform["class_path"]), transform["init_args"]
    elif isinstance(transform, Inert):
        path, fields = transform.path, transform
    else:
        raise AnomalibImportError(f"pre-processor transform {transform!r} is not a torchvision transform")
    kind = path.rsplit(".", 1)[-1]
    if kind == "Compose":
        return [step for inner in field(fields, "transforms") or [] for step in _steps(inner)]
    return [(kind, path, fields)]


def _pair(size: Any, what: str) -> tuple[int, int]:
    size = list(size) if isinstance(size, (list, tuple)) else [size]
    if len(size) != 2:
        raise AnomalibImportError(f"{what} size {size} keeps the aspect ratio; patchline needs [height, width]")
    return int(size[0]), int(size[1])


def _preprocess(pre_processor: Any) -> dict[str, Any]:
    """anomalib's pre-processor (a pickled PreProcessor, or 2.7's ``{"transform": spec}``) as PreprocessInfo fields."""
    if pre_processor is False or pre_processor is None:
        raise AnomalibImportError("the model has no pre-processor: anomalib fed it raw images of unknown size")
    if pre_processor is True:
        raise AnomalibImportError(
            "the checkpoint does not record its pre-processing (hyper_parameters pre_processor=True, from an "
            "anomalib 2.x release before 2.7): that default differs between releases (with or without a centre "
            "crop). Import the model saved with engine.export(model, ExportType.TORCH) instead: it carries its transform"
        )
    transform = field(pre_processor, "transform") or field(field(pre_processor, "_modules"), "transform")
    if transform is None:
        raise AnomalibImportError(
            "the pre-processor's transform is not recorded (none was set, or anomalib could not serialise it into "
            "the checkpoint): patchline needs the Resize and Normalize the model was fitted with"
        )
    fields: dict[str, Any] = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), center_crop=None)
    seen: set[str] = set()
    for kind, path, step in _steps(transform):
        kind = "CenterCrop" if kind in CROPS else kind
        if kind in seen and kind not in CONVERSIONS:
            raise AnomalibImportError(f"pre-processing has more than one {kind}: patchline applies one of each")
        seen.add(kind)
        if kind == "Resize":
            if "CenterCrop" in seen:
                raise AnomalibImportError("pre-processing crops before it resizes: patchline resizes, then crops")
            mode = field(step, "interpolation")
            mode = mode if isinstance(mode, str) else (field(mode, "_args") or ("?",))[0]
            if str(mode).lower() not in ("bilinear", "interpolationmode.bilinear"):
                raise AnomalibImportError(f"Resize with {mode} interpolation has no patchline equivalent (bilinear only)")
            # Without antialiasing, OpenCV's bilinear on 8-bit pixels is near (not equal to) torch's on floats.
            antialias = field(step, "antialias", True)
            fields.update(image_size=_pair(field(step, "size"), "Resize"), resize="antialias" if antialias else "bilinear")
        elif kind == "CenterCrop":
            fields["center_crop"] = _pair(field(step, "size"), "CenterCrop")
        elif kind == "Normalize":
            fields.update(mean=tuple(float(v) for v in field(step, "mean")), std=tuple(float(v) for v in field(step, "std")))
        elif kind not in CONVERSIONS:
            raise AnomalibImportError(f"pre-processing step {path} has no patchline equivalent")
    if "image_size" not in fields:
        raise AnomalibImportError("the pre-processor does not resize: patchline needs a fixed input size")
    return fields


def read_anomalib(path: str | Path) -> AnomalibPatchcore:
    """Read an anomalib PatchCore Lightning checkpoint or exported torch model (layout in the module docstring)."""
    path = Path(path)
    top = read_file(path)
    if isinstance(top, dict) and "state_dict" in top:
        state = dict(top["state_dict"])
        hparams = top.get("hyper_parameters") or {}
        backbone, layers = field(hparams, "backbone"), field(hparams, "layers")
        num_neighbors, ratio = field(hparams, "num_neighbors", 9), field(hparams, "coreset_sampling_ratio", 0.1)
        enabled = top.get(ENABLED) or {}
        # anomalib 2.7 stores the processors' configuration; earlier 2.x pickled them into the hyper-parameters.
        pre, post = (
            (top[key] if key in top else field(hparams, name, True)) if enabled.get(name, True) else False
            for name, key in (("pre_processor", PRE_CONFIG), ("post_processor", POST_CONFIG))
        )
    elif isinstance(top, dict) and isinstance(top.get("model"), Inert):
        lightning = top["model"]
        state = _flatten(lightning)
        modules = field(lightning, "_modules") or {}
        core = modules.get("model")
        backbone, layers, num_neighbors = field(core, "backbone"), field(core, "layers"), field(core, "num_neighbors", 9)
        ratio = field(lightning, "coreset_sampling_ratio", 0.1)
        # An exported model carries its processors as submodules; a missing pre-processor was disabled.
        pre, post = modules.get("pre_processor") or False, modules.get("post_processor") or False
    else:
        raise AnomalibImportError(f"{path}: neither a Lightning checkpoint nor an anomalib torch export")
    if not isinstance(backbone, str) or not layers:
        raise AnomalibImportError(f"{path}: no PatchCore backbone name and layers (is this an anomalib Patchcore model?)")
    if BANK_KEY not in state or state[BANK_KEY].ndim != 2 or state[BANK_KEY].shape[0] == 0:
        raise AnomalibImportError(f"{path}: no fitted memory bank at {BANK_KEY} (was the model trained?)")
    network = feature_layers(backbone)
    unknown = [layer for layer in layers if layer not in network]
    if unknown:
        raise AnomalibImportError(f"{path}: timm's {backbone} has no features_only layer(s) {unknown}")
    try:
        preprocess, calibration = _preprocess(pre), _calibration(state, post)
    except AnomalibImportError as exc:
        raise AnomalibImportError(f"{path}: {exc}") from None
    return AnomalibPatchcore(
        backbone=backbone,
        layers=sorted(layers, key=network.index),
        num_neighbors=int(num_neighbors),
        coreset_ratio=float(ratio),
        backbone_state={k[len(BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)},
        memory_bank=state[BANK_KEY].float().numpy(),
        preprocess=preprocess,
        calibration=calibration,
    )


def import_anomalib(
    checkpoint: str | Path, out_dir: str | Path, opset: int = 17, tolerance: float = ExportConfig().tolerance
) -> Manifest:
    """Write a verified patchline artifact for an anomalib PatchCore model."""
    checkpoint, out = Path(checkpoint), Path(out_dir)
    model = read_anomalib(checkpoint)
    backbone, _ = create_backbone(model.backbone, model.layers, "random")
    digest = sha256_file(checkpoint)
    try:
        load_state(backbone, model.backbone_state, f"{checkpoint} ({BACKBONE_PREFIX}*)")
    except BackboneError as exc:
        raise AnomalibImportError(str(exc)) from None
    module = PatchEmbedding(backbone, model.layers).eval()
    dim = sum(backbone.feature_info.channels())
    bank = np.ascontiguousarray(model.memory_bank, dtype=np.float32)
    if bank.shape[1] != dim:
        raise AnomalibImportError(f"{checkpoint}: memory bank rows have {bank.shape[1]} dims, {model.layers} give {dim}")
    pre = PreprocessInfo(**model.preprocess, input_name=INPUT_NAME)
    with torch.no_grad():
        grid = tuple(module(torch.zeros(1, 3, *pre.input_size)).shape[1:3])

    manifest = write_artifact(
        out,
        module,
        bank,
        id_prefix=f"anomalib-{model.backbone}",
        backbone=BackboneInfo(
            name=model.backbone, layers=model.layers, weights=f"anomalib {checkpoint.name} sha256:{digest}"
        ),
        preprocess=pre,
        patch_grid=grid,
        coreset_ratio=model.coreset_ratio,
        source_rows=0,  # the rows before subsampling and the training images are not in anomalib's files: 0 = unknown
        num_neighbors=model.num_neighbors,
        training=TrainingInfo(images_used=0, images_skipped=0, skipped=[]),
        opset=opset,
        tolerance=tolerance,
        calibration=model.calibration,
    )
    log.info("imported %s: bank %s, ONNX Runtime vs torch max abs diff %.3g",
             checkpoint.name, bank.shape, manifest.model.onnx_max_abs_diff)
    return manifest
