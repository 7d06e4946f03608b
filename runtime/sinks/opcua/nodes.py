"""The address space: what a PLC programmer browses, with string node ids derived from names (stable across
restarts and across the order of the line's cameras).

    Objects/Patchline/<line>/<camera>        ns=<ns>;s=<camera>            emits ResultReady events
        State, LastError                     ns=<ns>;s=<camera>/State …
        Trigger(PartId: String)              ns=<ns>;s=<camera>/Trigger
        Result/ResultId, PartId, …           ns=<ns>;s=<camera>/Result/ResultId …
        Model/ModelId, …                     ns=<ns>;s=<camera>/Model/ModelId …
        Counters/OkCount, …                  ns=<ns>;s=<camera>/Counters/OkCount …
    Types/…/BaseEventType/ResultReadyEventType   ns=<ns>;s=ResultReadyEventType

The browse names of the result follow OPC 40100-1 (Machine Vision) where it has one (ResultId, PartId, ProductId,
ResultState, CreationTime, ProcessingTimes' ProcessingDuration); its types are patchline's own (the Machine Vision
nodeset is not loaded). ResultState is 40100-1's Int32: 1 "Completed" for every published verdict; OK/NG, which
40100-1 leaves to the application, is ``Verdict`` ("OK"/"NG") and ``Pass`` (True for OK).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from asyncua import Node, Server, ua

RESULT_COMPLETED = 1  # OPC 40100-1 ResultStateDataType "Completed"
EVENT_TYPE = "ResultReadyEventType"
V = ua.VariantType


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else float(value)


# browse name → (type, value from a verdict): the Result variables and the ResultReady event's fields alike.
RESULT_FIELDS: dict[str, tuple[ua.VariantType, Callable[[dict], Any]]] = {
    "ResultId": (V.String, lambda v: f"{v['camera']}-{v['seq']}"),
    "Seq": (V.UInt64, lambda v: v["seq"]),
    "PartId": (V.String, lambda v: v.get("part_id") or ""),
    "ProductId": (V.String, lambda v: v["model_id"]),
    "ResultState": (V.Int32, lambda v: RESULT_COMPLETED),
    "Verdict": (V.String, lambda v: v["verdict"]),
    "Pass": (V.Boolean, lambda v: v["verdict"] == "OK"),
    "Score": (V.Double, lambda v: float(v["score"])),
    "NormalisedScore": (V.Double, lambda v: _nan_if_none(v["normalised_score"])),  # NaN: artifact not calibrated
    "Threshold": (V.Double, lambda v: float(v["threshold"])),
    "LocationX": (V.Int32, lambda v: v["location"]["x"]),
    "LocationY": (V.Int32, lambda v: v["location"]["y"]),
    "ProcessingDuration": (V.Double, lambda v: float(v["latency_ms"].get("total", math.nan))),  # ms
    "FrameAge": (V.Double, lambda v: float(v["frame_age_ms"])),  # ms, capture → scoring
    "CreationTime": (V.DateTime, lambda v: _time(v["timestamp"])),  # the frame's capture time
    "Evidence": (V.String, lambda v: v.get("evidence") or ""),
    "Json": (V.String, lambda v: json.dumps(v, separators=(",", ":"))),  # the MQTT verdict message, verbatim
}
MODEL_FIELDS: dict[str, tuple[ua.VariantType, Callable[[dict], Any]]] = {
    "ModelId": (V.String, lambda m: m["model_id"]),
    "ArtifactChecksum": (V.String, lambda m: m["artifact_checksum"]),
    "Threshold": (V.Double, lambda m: float(m["threshold"])),
    "Since": (V.DateTime, lambda m: _time(m["since"])),
}
COUNTERS = {"OK": "OkCount", "NG": "NgCount", "errors": "ErrorCount"}
STATES = ("NotReady", "Ready", "Stopped", "Offline")


def _empty(vtype: ua.VariantType) -> Any:
    return datetime(1601, 1, 1, tzinfo=timezone.utc) if vtype == V.DateTime else ua.get_default_value(vtype)


class Ids:
    """Node ids in patchline's namespace, made from paths of names."""

    def __init__(self, ns: int) -> None:
        self.ns = ns

    def __call__(self, *path: str) -> ua.NodeId:
        return ua.NodeId("/".join(path), self.ns)

    def name(self, name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, self.ns)


async def event_type(server: Server, ids: Ids) -> Node:
    """ResultReadyEventType (BaseEventType's subtype), a property per field of RESULT_FIELDS plus Camera."""
    base = server.get_node(ua.ObjectIds.BaseEventType)
    etype = await base.add_object_type(ids(EVENT_TYPE), ids.name(EVENT_TYPE))
    for name, (vtype, _) in {"Camera": (V.String, None), **RESULT_FIELDS}.items():
        prop = await etype.add_property(ids(EVENT_TYPE, name), ids.name(name), _empty(vtype), varianttype=vtype)
        await prop.set_modelling_rule(True)
    return etype


@dataclass
class CameraNodes:
    """One camera's object and the node ids of what a verdict, an error or a model changes."""

    node: Node
    ids: Ids
    camera: str

    def id(self, *path: str) -> ua.NodeId:
        return self.ids(self.camera, *path)


async def camera_nodes(parent: Node, ids: Ids, camera: str, trigger: Callable[..., Any]) -> CameraNodes:
    """``camera``'s object under ``parent``, with its variables at their initial values and its Trigger method."""
    obj = await parent.add_object(ids(camera), ids.name(camera))
    nodes = CameraNodes(obj, ids, camera)

    async def variable(owner: Node, path: tuple[str, ...], vtype: ua.VariantType, value: Any = None) -> None:
        await owner.add_variable(nodes.id(*path), ids.name(path[-1]), _empty(vtype) if value is None else value,
                                 varianttype=vtype)

    await variable(obj, ("State",), V.String, "NotReady")
    await variable(obj, ("LastError",), V.String, "")
    for folder, fields in (("Result", RESULT_FIELDS), ("Model", MODEL_FIELDS)):
        owner = await obj.add_object(nodes.id(folder), ids.name(folder))
        for name, (vtype, _) in fields.items():
            await variable(owner, (folder, name), vtype)
    counters = await obj.add_object(nodes.id("Counters"), ids.name("Counters"))
    for name in COUNTERS.values():
        await variable(counters, ("Counters", name), V.UInt64, 0)
    part_id = ua.Argument(Name="PartId", DataType=ua.NodeId(ua.ObjectIds.String), ValueRank=-1,
                          Description=ua.LocalizedText("the part in front of the camera: 1..128 printable characters"))
    await obj.add_method(nodes.id("Trigger"), ids.name("Trigger"), trigger, [part_id], [])
    return nodes
