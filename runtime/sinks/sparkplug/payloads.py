"""Sparkplug B topics and payloads: what the node publishes (births, data, deaths) and what it accepts (commands).

The metric names are the interface a host application (Ignition, a historian) binds tags to: stable across
restarts and versions. No aliases: every message names its metrics, so a host never needs a birth to read one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from google.protobuf.message import DecodeError

from patchline.runtime.sinks.sparkplug import sparkplug_b_pb2 as pb
from patchline.runtime.verdict import epoch_seconds

NAMESPACE = "spBv1.0"

# Sparkplug B datatypes (sparkplug_b.proto's comment lists them all); the ones these metrics use.
INT64, UINT64, DOUBLE, BOOLEAN, STRING = 4, 8, 10, 11, 12
TYPE_NAMES = {INT64: "Int64", UINT64: "UInt64", DOUBLE: "Double", BOOLEAN: "Boolean", STRING: "String"}
VALUE_FIELDS = {INT64: "long_value", UINT64: "long_value", DOUBLE: "double_value", BOOLEAN: "boolean_value",
                STRING: "string_value"}

BDSEQ = "bdSeq"
REBIRTH = "Node Control/Rebirth"
LINE = "Node Info/Line"
COMMAND_ERRORS = "Node Info/Command Errors"
LAST_COMMAND_ERROR = "Node Info/Last Command Error"
TRIGGER = "Device Control/Trigger"
ERROR = "Inspection/Error"

Metric = tuple[str, int, Any]  # name, datatype, value (None: null)

# A camera's metrics from one verdict, in DBIRTH and each DDATA.
VERDICT_METRICS: tuple[tuple[str, int, Callable[[dict], Any]], ...] = (
    ("Inspection/Verdict", STRING, itemgetter("verdict")),
    ("Inspection/NG", BOOLEAN, lambda v: v["verdict"] == "NG"),
    ("Inspection/Score", DOUBLE, itemgetter("score")),
    ("Inspection/Normalized Score", DOUBLE, itemgetter("normalised_score")),
    ("Inspection/Threshold", DOUBLE, itemgetter("threshold")),
    ("Inspection/Seq", UINT64, itemgetter("seq")),
    ("Inspection/Part ID", STRING, itemgetter("part_id")),
    ("Inspection/Model ID", STRING, itemgetter("model_id")),
    ("Inspection/Latency ms", DOUBLE, lambda v: v["latency_ms"].get("total")),
)
MODEL_METRICS: tuple[tuple[str, int, str], ...] = (
    ("Model/ID", STRING, "model_id"),
    ("Model/Checksum", STRING, "artifact_checksum"),
    ("Model/Threshold", DOUBLE, "threshold"),
)


@dataclass(frozen=True)
class Topics:
    """``spBv1.0/<group>/<type>/<node>[/<device>]``, and a host's ``spBv1.0/STATE/<host>``."""

    group: str
    node: str

    def node_topic(self, kind: str) -> str:
        return f"{NAMESPACE}/{self.group}/{kind}/{self.node}"

    def device_topic(self, kind: str, device: str) -> str:
        return f"{NAMESPACE}/{self.group}/{kind}/{self.node}/{device}"

    @staticmethod
    def state(host_id: str) -> str:
        return f"{NAMESPACE}/STATE/{host_id}"


def milliseconds(seconds: float) -> int:
    return int(round(seconds * 1000.0))


def verdict_values(verdict: dict) -> tuple[int, list[Metric]]:
    """The verdict's capture time (ms since the epoch) and its metrics. Raises KeyError/ValueError on a verdict
    that is not ``make_verdict``'s, in the caller's thread."""
    timestamp = milliseconds(epoch_seconds(verdict["timestamp"]))
    return timestamp, [(name, kind, value(verdict)) for name, kind, value in VERDICT_METRICS]


def model_values(state: dict | None) -> list[Metric]:
    return [(name, kind, None if state is None else state.get(key)) for name, kind, key in MODEL_METRICS]


def device_birth_values(last: list[Metric] | None, model: dict | None, error: str | None) -> list[Metric]:
    """Every metric a camera's DDATA will ever carry (Sparkplug: all of them in its DBIRTH), at their last values."""
    verdict = last if last is not None else [(name, kind, None) for name, kind, _ in VERDICT_METRICS]
    return [*verdict, (ERROR, STRING, error), *model_values(model), (TRIGGER, STRING, None)]


def encode(timestamp_ms: int, metrics: Iterable[Metric], seq: int | None) -> bytes:
    """A Sparkplug B payload: ``seq`` None for NDEATH, which has none."""
    payload = pb.Payload(timestamp=timestamp_ms)
    if seq is not None:
        payload.seq = seq
    for name, kind, value in metrics:
        metric = payload.metrics.add(name=name, datatype=kind, timestamp=timestamp_ms)
        if value is None:
            metric.is_null = True
        elif kind == INT64:
            metric.long_value = int(value) & 0xFFFFFFFFFFFFFFFF  # the specification's two's complement in a uint64
        else:
            setattr(metric, VALUE_FIELDS[kind], value)
    return payload.SerializeToString()


def decode_command(data: bytes, accepted: dict[str, int]) -> list[tuple[str, Any]]:
    """The (name, value) of each metric of an NCMD/DCMD payload, every one among ``accepted`` (name → datatype).

    Raises ValueError saying what is wrong, for the node's log and its ``Node Info/Last Command Error``.
    """
    payload = pb.Payload()
    try:
        payload.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a Sparkplug B payload ({len(data)} bytes that do not decode: {exc})") from None
    if not payload.metrics:
        raise ValueError("the payload has no metrics")
    commands = []
    for metric in payload.metrics:
        if not metric.HasField("name"):
            raise ValueError("a metric without a name (this node publishes no aliases: name each metric)")
        kind = accepted.get(metric.name)
        if kind is None:
            raise ValueError(f"unknown metric {metric.name!r}: this takes {', '.join(sorted(accepted))}")
        wanted = f"{TYPE_NAMES[kind]} (datatype {kind})"
        if metric.HasField("datatype") and metric.datatype != kind:
            raise ValueError(f"{metric.name!r} must be {wanted}, got datatype {metric.datatype}")
        if metric.WhichOneof("value") != VALUE_FIELDS[kind]:
            raise ValueError(f"{metric.name!r} must carry a {wanted} value, got {metric.WhichOneof('value')}")
        commands.append((metric.name, getattr(metric, VALUE_FIELDS[kind])))
    return commands


def decode_state(data: bytes) -> tuple[bool, int]:
    """A Sparkplug 3.0 host STATE payload ``{"online": bool, "timestamp": int}``. Raises ValueError."""
    try:
        state = json.loads(data)
    except ValueError:
        raise ValueError("STATE payload is not JSON") from None
    if (not isinstance(state, dict) or not isinstance(state.get("online"), bool)
            or not isinstance(state.get("timestamp"), int) or isinstance(state.get("timestamp"), bool)):
        raise ValueError('STATE payload must be {"online": true|false, "timestamp": <ms>}')
    return state["online"], state["timestamp"]
