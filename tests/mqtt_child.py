"""A sink in its own process, for tests that kill it: ``python -m tests.mqtt_child PORT STATE_DIR COUNT``.

It connects (COUNT == 0) or queues COUNT verdicts (spooled, the broker may be down), prints
``ready`` and waits to be killed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from patchline.runtime.config import MqttConfig
from patchline.runtime.sinks.mqtt.sink import MqttSink
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict


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
