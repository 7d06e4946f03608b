"""The MQTT topics of one camera, all under ``<topic_prefix>/<camera>/``:

    verdict            verdict JSON (runtime/verdict.schema.json), QoS 1, not retained
    verdict/part_id    scalar mirrors of each verdict for PLCs without a JSON parser, QoS 1, not
    verdict/seq        retained, published right after the JSON in this order — ``verdict/state``
    verdict/score      comes last, so a PLC that sees it has already received that verdict's
    verdict/state      part_id/seq/score ("" part_id in continuous mode; score as in the JSON)
    available          retained, QoS 1: "online" (every connect); "stopped" (stopped on request, or a file source
                       ended); "offline" (the will, or the daemon ended on an error or a crash)
    trigger            subscribed: {"part_id": "..."} or a plain string; MQTT v5 ResponseTopic and
                       CorrelationData are kept, and the verdict answering it is also published to the
                       ResponseTopic with the CorrelationData; a retained trigger (the broker replays it
                       at every subscription) is answered on ``error`` and never passed on
    error              JSON {"error", "detail", ...} for malformed and retained triggers and ``publish_error``, QoS 1
"""

from __future__ import annotations

from dataclasses import dataclass

from patchline.runtime.sinks.mqtt.client import MqttError


@dataclass(frozen=True)
class Topics:
    base: str

    @classmethod
    def for_camera(cls, prefix: str, camera: str) -> Topics:
        if not camera or any(c in camera for c in "/+#"):
            raise MqttError(f"camera name {camera!r} cannot be used in an MQTT topic (empty, or contains / + #)")
        if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
            raise MqttError(f"mqtt.topic_prefix {prefix!r} is not a valid topic prefix (no + #, no leading/trailing /)")
        return cls(f"{prefix}/{camera}")

    @property
    def verdict(self) -> str:
        return f"{self.base}/verdict"

    @property
    def available(self) -> str:
        return f"{self.base}/available"

    @property
    def model(self) -> str:
        return f"{self.base}/model"

    @property
    def model_set(self) -> str:
        return f"{self.base}/model/set"

    @property
    def trigger(self) -> str:
        return f"{self.base}/trigger"

    @property
    def error(self) -> str:
        return f"{self.base}/error"

    def mirror(self, name: str) -> str:
        return f"{self.base}/verdict/{name}"
