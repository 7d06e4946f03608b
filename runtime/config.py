"""YAML configuration, validated by pydantic.

Every section forbids unknown keys so that a typo in a line's config refuses to
start instead of silently falling back to a default.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from patchline.runtime.artifact import PRECISIONS
from patchline.runtime.config_section import Section
from patchline.runtime.search import DISTANCES
from patchline.runtime.sinks.modbus.config import ModbusConfig
from patchline.runtime.sinks.mqtt.config import MqttConfig
from patchline.runtime.sinks.opcua.config import OpcUaConfig
from patchline.runtime.sinks.sparkplug.config import SparkplugConfig
from patchline.runtime.sources import SourceConfig



ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override that cannot be used."""


class TensorRtConfig(Section):
    """The TensorRT engine built on the box from the artifact's ONNX (runtime/engines/trt_build.py)."""

    precision: Literal["fp16", "fp32", "int8"] = "fp16"
    batch_profile: tuple[int, int, int] = (1, 1, 8)  # min, opt, max batch the engine accepts
    workspace_mb: int = Field(1024, ge=16)
    cache_dir: str | None = None  # default: systemd's CacheDirectory, else ~/.cache/patchline (run configs: below)
    build: bool = True  # build a missing or stale engine; false: refuse to start instead
    timing_cache: bool = True  # keep TensorRT's kernel timings next to the engines: rebuilds are faster
    calibration_cache: str | None = None  # INT8 only: the calibration cache from patchline.calibration

    @field_validator("batch_profile")
    @classmethod
    def _ordered(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if not 1 <= value[0] <= value[1] <= value[2]:
            raise ValueError("must be [min, opt, max] with 1 <= min <= opt <= max")
        return value


class ToolConfig(BaseModel):
    """Any config as the runtime's commands read it (`patchline engine/score/eval --config` an export config):
    its ``tensorrt`` section, checked; the export's own sections are the export's (export/config.py)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    tensorrt: TensorRtConfig = TensorRtConfig()


def _format_errors(source: str, error: ValidationError, model: type[BaseModel]) -> str:
    """All problems on one line (one journal entry), each led by its key as written in the YAML."""
    problems = []
    for item in error.errors():
        path, known = _walk(model, item["loc"])
        key = ".".join(path) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(path[-1], known, n=1)
            message = "unknown key" + (f", did you mean {close[0]}?" if close else
                                       f" (known here: {', '.join(known)})" if known else "")
        problems.append(f"{key}: {message}")
    return f"{source}: invalid configuration: {'; '.join(problems)}"


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], list[str]]:
    """``loc`` without pydantic's tagged-union member names (``source.folder.path`` is ``source.path`` in the
    YAML), and the keys of the section holding its last part ([] where that cannot be told)."""
    path: list[str] = []
    node: Any = model
    parts = [str(part) for part in loc]
    while parts:
        part = parts.pop(0)
        path.append(part)
        fields = node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else {}
        if not parts:
            return path, list(fields)
        field = fields.get(part)
        members = _models(field.annotation) if field is not None else []
        if len(members) > 1 and parts:
            tag = parts.pop(0)
            members = [m for m in members if tag in typing.get_args(m.model_fields["kind"].annotation)]
        node = members[0] if len(members) == 1 else None
    return path, []


def _models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in _models(arg)]


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, e.g. model.backbone=resnet18")
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


# Paths in a config file that are read relative to the file's folder, not the working directory (which is /
# for a systemd service). Values given with --set stay relative to the working directory of the shell.
FILE_RELATIVE_PATHS = (("tensorrt", "calibration_cache"), ("tensorrt", "cache_dir"))


def _relative_to_file(data: dict[str, Any], folder: Path) -> None:
    cameras = data.get("cameras")
    for node in [data, *(cameras if isinstance(cameras, list) else [])]:
        for section, key in FILE_RELATIVE_PATHS:
            values = node.get(section) if isinstance(node, dict) else None
            if isinstance(values, dict) and isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
                values[key] = str(folder / values[key])


def _read_yaml(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    _relative_to_file(data, Path(path).resolve().parent)
    return data


def load_config(path: str | Path | None, overrides: list[str] = (), model: type[ModelT] = ToolConfig) -> ModelT:
    """Read a YAML config (or the built-in defaults when ``path`` is None), apply overrides, validate as ``model``."""
    return _validate(str(path) if path else "<defaults>", _read_yaml(path), overrides, model)


def load_any_config(path: str | Path | None, overrides: list[str] = (), camera: str | None = None
                    ) -> ToolConfig | CameraConfig:
    """A camera of a run config (``patchline run``'s: one ``camera``, or a line's ``cameras`` of which ``camera``
    names one), or any other config's ``tensorrt`` section: `patchline engine`, `score` and `eval` build and use the
    engine a camera uses."""
    data = _read_yaml(path)
    source = str(path) if path else "<defaults>"
    if "cameras" in data:
        line = _validate(source, data, overrides, LineConfig)
        names = [c.camera for c in line.cameras]
        if camera is None and len(names) == 1:
            camera = names[0]
        if camera not in names:
            raise ConfigError(f"{source}: a line of cameras {', '.join(names)}: name one with --camera")
        return line.cameras[names.index(camera)]
    return _validate(source, data, overrides, RunConfig if "camera" in data else ToolConfig)


def _validate(source: str, data: dict[str, Any], overrides: list[str], model: type[ModelT]) -> ModelT:
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc, model)) from None


class MetricsConfig(Section):
    enabled: bool = True
    host: str = "127.0.0.1"  # 0.0.0.0 to let a Prometheus on another host scrape
    port: int = Field(9108, ge=0, le=65535)  # 0: any free port (tests)
    # /healthz is 200 only while the last frame is younger than this.
    health_max_frame_age_s: float = Field(10.0, gt=0)


class EvidenceConfig(Section):
    enabled: bool = True
    dir: str | None = None  # default: <state_dir>/evidence
    quota_mb: float = Field(500.0, gt=0)
    # Evidence never takes the disk below this much free space (older evidence is deleted first, else none is
    # written): the seq counter, the MQTT spool and the system share it.
    min_free_mb: float = Field(100.0, ge=0)
    format: Literal["png", "jpg"] = "png"  # of the frame; png keeps the exact pixels for retraining


class TriggerConfig(Section):
    # A trigger not inspected within this time is answered on the error topic: no_frame when no frame was
    # captured at or after it, model_busy when its frame was but the model was busy with earlier triggers.
    timeout_s: float = Field(5.0, gt=0)
    max_pending: int = Field(32, ge=1)


def systemd_directory(variable: str) -> str | None:
    """The first directory systemd passes in ``variable`` (StateDirectory= sets $STATE_DIRECTORY, CacheDirectory=
    $CACHE_DIRECTORY; colon-separated when the unit names several), or None outside such a unit."""
    value = os.environ.get(variable)
    return value.split(":")[0] if value else None


def _state_directory() -> str:
    return systemd_directory("STATE_DIRECTORY") or "/var/lib/patchline"


# The unit's CacheDirectory=patchline: one cache for all cameras of the box, so that N cameras starting together
# build each engine once (the engine cache's lock), and `patchline engine --config` fills it from a shell.
SERVICE_CACHE_DIR = "/var/cache/patchline"


def service_cache_directory() -> str:
    return systemd_directory("CACHE_DIRECTORY") or SERVICE_CACHE_DIR


class RunTensorRtConfig(TensorRtConfig):
    """A run config's ``tensorrt`` section: its engines live in the service's cache wherever the config is read."""

    cache_dir: str | None = Field(None, validate_default=True)

    @field_validator("cache_dir")
    @classmethod
    def _service_cache(cls, value: str | None) -> str:
        return value or service_cache_directory()


class CameraConfig(Section):
    """One camera: where its frames come from, the model that judges them, how it decides."""

    camera: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # used in MQTT topics and file names
    artifact: str
    engine: str = "onnxruntime"  # runtime/engines
    device: str = "auto"  # the onnxruntime engine's provider (engines/onnxruntime.py); the tensorrt engine: GPU 0
    threads: int | None = Field(None, ge=1)
    precision: str = "fp32"  # int8: the artifact's model.int8.onnx (patchline quantize)
    distance: str = "cpu"  # runtime/search
    # Raw-score threshold; overrides the artifact's calibration. Needed when the artifact is not calibrated.
    threshold: float | None = Field(None, gt=0, allow_inf_nan=False)
    mode: Literal["continuous", "trigger"] = "continuous"
    source: SourceConfig
    trigger: TriggerConfig = TriggerConfig()
    evidence: EvidenceConfig = EvidenceConfig()
    # engine: tensorrt (build, cache); `patchline engine --config` this file builds the engine the service loads
    tensorrt: RunTensorRtConfig = Field(default_factory=RunTensorRtConfig)

    @field_validator("engine", "device", "precision", "distance")
    @classmethod
    def _known_name(cls, value: str, info: ValidationInfo) -> str:
        # Imported here, not above: the engines import this module (their TensorRtConfig).
        from patchline.runtime.engines import ENGINES
        from patchline.runtime.engines.onnxruntime import DEVICES

        names = {"engine": ENGINES.names, "device": DEVICES, "precision": PRECISIONS,
                 "distance": DISTANCES.names}[info.field_name]
        if value not in names:
            raise PydanticCustomError("unknown_name", "Input should be one of {names}", {"names": ", ".join(names)})
        return value

    def model_key(self) -> tuple:
        """Cameras with equal keys share one loaded model (engine and bank) and their frames are batched together."""
        return (str(Path(self.artifact).resolve()), self.engine, self.device, self.threads, self.precision,
                self.distance, self.tensorrt)


class BatchingConfig(Section):
    """How frames of cameras that share a model are gathered into one inference."""

    max_batch: int = Field(8, ge=1)  # also capped by a TensorRT engine's profile
    # The longest the first frame of a batch waits for others; a trigger never waits longer than this for a batch.
    max_wait_ms: float = Field(5.0, ge=0)


class ModelUpdatesConfig(Section):
    """New models without a restart (runtime/model_updates.py): SIGHUP, or the artifact path changing."""

    watch: bool = True  # look for a changed artifact path (a replaced manifest, a swapped symlink)
    watch_interval_s: float = Field(2.0, gt=0)
    # A candidate's self-test scores may differ this much (relative) from those stored at export: engines differ
    # (TensorRT FP16 ~1e-3, INT8 more); a model that computes something else differs by far more.
    self_test_tolerance: float = Field(0.02, gt=0)
    # The name of a secret (a file in $CREDENTIALS_DIRECTORY, or an environment variable) that signs the commands
    # on …/<camera>/model/set; unset, those commands are refused.
    command_key_credential: str | None = None


class LineSettings(Section):
    """What a line's cameras share, in a line's config and beside a single camera's settings: the outputs (one
    field per entry of ``runtime.sinks.OUTPUTS``, named as its key; None: that output is off), metrics, state."""

    model_updates: ModelUpdatesConfig = ModelUpdatesConfig()
    mqtt: MqttConfig = MqttConfig()
    opcua: OpcUaConfig | None = None  # an OPC UA server (README: OPC UA server)
    sparkplug: SparkplugConfig | None = None  # the line as a Sparkplug B edge node (README: Sparkplug B)
    modbus: ModbusConfig | None = None  # a Modbus TCP server for the PLCs (README: Modbus TCP)
    metrics: MetricsConfig = MetricsConfig()
    # seq counters, MQTT spools and the folder sources' memories, one file each per camera; evidence/<camera>/
    state_dir: str = Field(default_factory=_state_directory)


class LineConfig(LineSettings):
    """``patchline run`` for a line: several cameras in one process, one broker, one metrics port."""

    line: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # the process's name, e.g. the systemd instance
    cameras: list[CameraConfig] = Field(min_length=1)
    batching: BatchingConfig = BatchingConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_names(cls, cameras: list[CameraConfig]) -> list[CameraConfig]:
        names = [c.camera for c in cameras]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"camera names must be unique (their topics, seq counters and spools would mix): "
                             f"{', '.join(repeated)}")
        return cameras

    @model_validator(mode="after")
    def _one_client_id_per_connection(self) -> LineConfig:
        if self.mqtt.client_id is not None and len(self.cameras) > 1:
            raise ValueError("mqtt.client_id names one connection, and each camera has its own (its will, its "
                             "topics): leave it out, each camera connects as patchline-<camera>")
        return self


class RunConfig(CameraConfig, LineSettings):
    """``patchline run`` for one camera: the camera's settings and the line's beside them."""

    def as_line(self) -> LineConfig:
        camera = CameraConfig(**{name: getattr(self, name) for name in CameraConfig.model_fields})
        shared = {name: getattr(self, name) for name in LineSettings.model_fields}
        return LineConfig(line=self.camera, cameras=[camera], **shared)


def load_line_config(path: str | Path, overrides: list[str] = ()) -> LineConfig:
    """A run config: a line (``cameras:``) or one camera (``camera:``, made a line of one)."""
    data = _read_yaml(path)
    if "cameras" in data:
        return _validate(str(path), data, overrides, LineConfig)
    return _validate(str(path), data, overrides, RunConfig).as_line()
