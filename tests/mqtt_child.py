"""A sink in its own process, for tests that kill it: ``python -m tests.mqtt_child PORT STATE_DIR COUNT``.

It connects (COUNT == 0) or queues COUNT verdicts (spooled, the broker may be down), prints
``ready`` and waits to be killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from patchline.runtime.config import MqttConfig
from patchline.runtime.decision import Decision
from patchline.runtime.sinks.mqtt.sink import MqttSink
from patchline.runtime.verdict import make_verdict

CAMERA = "cam1"


def sample_verdict(seq: int, part_id: str | None = None, camera: str = CAMERA) -> dict:
    """A valid verdict whose score varies with ``seq`` (odd seqs are NG)."""
    ng = seq % 2 == 1
    decision = Decision(score=1.0 + (0.25 if ng else -0.25) + seq / 1000, normalised=0.75 if ng else 0.25,
                        threshold=1.0, verdict="NG" if ng else "OK")
    return make_verdict(camera=camera, seq=seq, timestamp=time.time(), frame_age_s=0.004, decision=decision,
                        location=(seq % 200, 17), latency_ms={"preprocess": 1.25, "backbone": 6.5, "total": 9.0},
                        model_id="test-model", artifact_checksum="ab" * 32, part_id=part_id,
                        evidence=f"/var/lib/patchline/evidence/{seq}.png" if ng else None)


def main() -> None:
    port, state, count, first_seq = int(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    sink = MqttSink(MqttConfig(port=port), CAMERA, state)
    spooled_before = len(list(sink.spool_dir.glob("*.json")))
    sink.start()
    for seq in range(first_seq, first_seq + count):
        sink.publish_verdict(sample_verdict(seq))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        spooled = len(list(sink.spool_dir.glob("*.json")))
        if (sink.delivery.connected if count == 0 else spooled == spooled_before + count):
            print("ready", flush=True)
            break
        time.sleep(0.02)
    time.sleep(60)


if __name__ == "__main__":
    main()
