"""MQTT publish latency on loopback: verdict published → received by a subscriber in another process.

    python bench/mqtt_latency.py [--count 2000] [--rate 200]

Starts its own mosquitto on a free loopback port (patchline.runtime.tools.broker) and a paho subscriber in a
separate process (like a PLC), then measures, pacing publishes at ``--rate`` per second so that the
numbers are latency, not queueing:

- ``sink``: ``MqttSink.publish_verdict`` → receipt of the verdict JSON (queue, spool file, paho,
  broker, subscriber), plus how long the ``publish_verdict`` call itself blocks the frame loop;
- ``paho``: a bare paho QoS 1 publish of the same payloads, the floor the sink adds to;
- ``seq_counter_next``: ``SeqCounter.next()`` (one rename per call, an fsync per RESERVE calls) on the
  file system of the temporary folder.

Both processes read CLOCK_MONOTONIC, which Linux shares between processes. Writes
bench/results/mqtt-latency-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt import __version__ as paho_version
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from patchline.runtime.config import MqttConfig
from patchline.runtime.sinks.mqtt.sink import MqttSink
from patchline.runtime.sinks.mqtt.topics import Topics
from patchline.runtime.tools.bench import CLIENT_TIMEOUT_S, first_receipts, latency_ms, load_avg, paced, report
from patchline.runtime.tools.broker import Mosquitto
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict
from patchline.runtime.verdict import SeqCounter

ROOT = Path(__file__).resolve().parents[1]


def subscribe(port: int, topic: str, count: int) -> None:
    """Subscriber process: print ``ready``, then one JSON list of [seq, receipt time] when all arrived."""
    received: list[tuple[int, float]] = []
    done = threading.Event()
    ready = threading.Event()

    def on_message(client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        received.append((json.loads(message.payload)["seq"], time.monotonic()))
        if len(received) >= count:
            done.set()

    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *args: ready.set()
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.wait(10)
    print("ready", flush=True)
    done.wait(CLIENT_TIMEOUT_S)
    client.disconnect()
    client.loop_stop()
    print(json.dumps(received), flush=True)


def measure(port: int, topic: str, count: int, rate: float, publish: Callable[[int], object]) -> tuple[dict, dict]:
    """Run one paced stream through ``publish(seq)``; latency and call-time statistics."""
    sub = subprocess.Popen([sys.executable, __file__, "--subscribe", str(port), topic, str(count)],
                           stdout=subprocess.PIPE, text=True)
    assert sub.stdout.readline().strip() == "ready", "subscriber did not start"
    sent, calls = paced(count, rate, publish)
    out, _ = sub.communicate(timeout=180)
    first = first_receipts(json.loads(out.strip().splitlines()[-1]))
    latency = [first[s] - sent[s] for s in sent if s in first]
    result = latency_ms(latency)
    result["lost"] = count - len(latency)
    return result, latency_ms(calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="publishes per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--subscribe", nargs=3, metavar=("PORT", "TOPIC", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.subscribe:
        port, topic, count = args.subscribe
        subscribe(int(port), topic, int(count))
        return

    load_before = os.getloadavg()[0]
    payloads = [sample_verdict(seq) for seq in range(1, args.count + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work)
        broker.start()
        try:
            topic = Topics.for_camera("patchline", CAMERA).verdict
            sink = MqttSink(MqttConfig(port=broker.port), CAMERA, work / "state")
            sink.start()
            assert sink.wait_connected(10), "sink did not connect"
            sink_latency, sink_call = measure(broker.port, topic, args.count, args.rate,
                                              lambda seq: sink.publish_verdict(payloads[seq - 1]))
            sink.stop()

            raw = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
            raw.max_inflight_messages_set(1000)
            raw.connect("127.0.0.1", broker.port)
            raw.loop_start()
            encoded = [json.dumps(p, separators=(",", ":")) for p in payloads]
            paho_latency, paho_call = measure(broker.port, "bench/raw", args.count, args.rate,
                                              lambda seq: raw.publish("bench/raw", encoded[seq - 1], qos=1))
            raw.disconnect()
            raw.loop_stop()

            counter = SeqCounter(work / "state" / "bench.seq")
            seq_times = []
            for _ in range(3000):  # crosses reservations, which fsync
                t0 = time.monotonic()
                counter.next()
                seq_times.append(time.monotonic() - t0)
        finally:
            broker.stop()

    version = subprocess.run([broker.binary, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    result = {
        "benchmark": "mqtt publish latency, loopback, QoS 1, publish -> subscriber receipt",
        "load_avg_1m": load_avg(load_before),
        "paho_mqtt": paho_version,
        "broker": version,
        "count": args.count,
        "rate_per_s": args.rate,
        "payload_bytes": len(json.dumps(payloads[0], separators=(",", ":"))),
        "sink": {"latency": sink_latency, "publish_verdict_call": sink_call},
        "paho": {"latency": paho_latency, "publish_call": paho_call},
        "seq_counter_next": latency_ms(seq_times),
        "state_dir_filesystem": subprocess.run(["stat", "-f", "-c", "%T", tempfile.gettempdir()], capture_output=True,
                                               text=True).stdout.strip(),
    }
    report("mqtt-latency", result, args.out)


if __name__ == "__main__":
    main()
