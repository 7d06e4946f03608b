"""The export's configuration (`patchline export --config`, configs/default.yaml): backbone, preprocessing,
coreset, scoring, the ONNX export, and the TensorRT engine `--engine trt` builds. The runtime reads only the
``tensorrt`` section of such a file (runtime/config.py's ToolConfig)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from patchline.runtime.config import TensorRtConfig, load_config
from patchline.runtime.config_section import Section

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# PatchCore's mean-mapping dimensions when a config leaves them out: its run_patchcore.py defaults for one
# backbone, its published ensemble (IM224_Ensemble_..._D1024-384) for several.
DEFAULT_PRETRAIN_DIM = 1024
DEFAULT_TARGET_DIM = {"single": 1024, "ensemble": 384}


class ModelConfig(Section):
    # A timm model name, a name from PatchCore's catalogue (`patchline backbones`), or a list of
    # them: an ensemble, whose layers carry the backbone's index ("0.layer2", "1.features.denseblock2").
    backbone: str | list[str] = Field("wide_resnet50_2", min_length=1)
    layers: list[str] = Field(default_factory=lambda: ["layer2", "layer3"], min_length=1)
    # "pretrained" (timm download), "random" (seeded init, for tests and the offline demo),
    # or a path to a .safetensors / .pth state dict; a list gives one per backbone of an ensemble.
    weights: str | list[str] = "pretrained"
    seed: int = 0
    # Set either (or use an ensemble) for the original PatchCore's embedding: each layer's 3x3 patches
    # adaptive-averaged to pretrain_embed_dimension, each backbone's layers to target_embed_dimension.
    # Unset with one backbone: anomalib's embedding (3x3 average pool, layers concatenated).
    pretrain_embed_dimension: int | None = Field(None, ge=1)
    target_embed_dimension: int | None = Field(None, ge=1)

    @field_validator("weights")
    @classmethod
    def _weights_kind(cls, value: str | list[str]) -> str | list[str]:
        for item in [value] if isinstance(value, str) else value:
            if not (item in ("pretrained", "random") or item.endswith((".safetensors", ".pth", ".pt"))):
                raise ValueError("must be 'pretrained', 'random' or a path ending in .safetensors, .pth or .pt")
        return value

    @model_validator(mode="after")
    def _one_entry_per_backbone(self) -> ModelConfig:
        self.layers_by_backbone()
        self.weights_by_backbone()
        return self

    @property
    def backbones(self) -> list[str]:
        return [self.backbone] if isinstance(self.backbone, str) else list(self.backbone)

    def layers_by_backbone(self) -> list[list[str]]:
        """Each backbone's layers: all of ``layers`` for one backbone; by their ``INDEX.`` prefix for an ensemble."""
        count = len(self.backbones)
        if count == 1:
            return [list(self.layers)]
        groups: list[list[str]] = [[] for _ in range(count)]
        for layer in self.layers:
            index, _, name = layer.partition(".")
            if not (index.isdigit() and int(index) < count and name):
                raise ValueError(
                    f"layer {layer!r}: an ensemble's layers start with the backbone's index 0..{count - 1}, "
                    "e.g. 0.layer2 or 1.features.denseblock2"
                )
            groups[int(index)].append(name)
        empty = [self.backbones[i] for i, group in enumerate(groups) if not group]
        if empty:
            raise ValueError(f"no layers for backbone(s) {empty}")
        return groups

    def weights_by_backbone(self) -> list[str]:
        if isinstance(self.weights, str):
            return [self.weights] * len(self.backbones)
        if len(self.weights) != len(self.backbones):
            raise ValueError(f"{len(self.weights)} weights for {len(self.backbones)} backbones")
        return list(self.weights)

    def embed_dimensions(self) -> tuple[int, int] | None:
        """(pretrain, target) dimensions of PatchCore's mean-mapping, or None for anomalib's embedding."""
        ensemble = len(self.backbones) > 1
        if not ensemble and self.pretrain_embed_dimension is None and self.target_embed_dimension is None:
            return None
        return (
            self.pretrain_embed_dimension or DEFAULT_PRETRAIN_DIM,
            self.target_embed_dimension or DEFAULT_TARGET_DIM["ensemble" if ensemble else "single"],
        )


class PreprocessConfig(Section):
    image_size: tuple[int, int] = (256, 256)
    resize: Literal["area", "bilinear", "antialias"] = "area"  # antialias: torchvision's Resize (anomalib's)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @field_validator("image_size", mode="before")
    @classmethod
    def _square(cls, value: Any) -> Any:
        return (value, value) if isinstance(value, int) else value

    @field_validator("image_size")
    @classmethod
    def _positive(cls, value: tuple[int, int]) -> tuple[int, int]:
        if min(value) < 32:
            raise ValueError("each side must be at least 32 pixels")
        return value


class CoresetConfig(Section):
    ratio: float = Field(0.1, gt=0.0, le=1.0)
    projection_dim: int = Field(128, ge=0, description="0 disables the random projection")
    seed: int = 0


class ScoringConfig(Section):
    num_neighbors: int = Field(9, ge=1)


class ExportConfig(Section):
    batch_size: int = Field(8, ge=1)
    opset: int = Field(17, ge=17)
    # Largest ONNX-vs-torch difference accepted, relative to the embedding's largest magnitude.
    tolerance: float = Field(1e-4, gt=0.0)


class Config(Section):
    model: ModelConfig = ModelConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    coreset: CoresetConfig = CoresetConfig()
    scoring: ScoringConfig = ScoringConfig()
    export: ExportConfig = ExportConfig()
    tensorrt: TensorRtConfig = TensorRtConfig()


def load_export_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The export config in ``path`` (the built-in defaults when None), with ``section.key=value`` overrides."""
    return load_config(path, overrides, Config)
