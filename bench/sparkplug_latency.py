"""Sparkplug B latency on loopback: ``publish_verdict`` → the DDATA decoded by a host application in another process.

    python bench/sparkplug_latency.py [--count 2000] [--rate 200]

Starts its own mosquitto on a free loopback port and a paho host application in a separate process, then paces
``SparkplugSink.publish_verdict`` at ``--rate`` per second (latency, not queueing) and measures the time from the
call to the host's receipt and decoding of the DDATA (the node's thread, protobuf, paho, broker, host), and how
long the call itself blocks the camera's loop. Both processes read CLOCK_MONOTONIC. Writes
bench/results/sparkplug-latency-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paho.mqtt.client as paho

from patchline.runtime.config import LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.sparkplug import sparkplug_b_pb2 as pb
from patchline.runtime.sinks.sparkplug.config import SparkplugConfig
from patchline.runtime.sinks.sparkplug.node import SparkplugOutput
from patchline.runtime.tools.bench import CLIENT_TIMEOUT_S, first_receipts, latency_ms, load_avg, paced, report
from patchline.runtime.tools.broker import Listener, Mosquitto
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict

ROOT = Path(__file__).resolve().parents[1]
TOPIC = f"spBv1.0/bench/DDATA/line/{CAMERA}"


class Host(Listener):
    """A host application that decodes each DDATA as it arrives: [verdict seq, receipt time]."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.received: list[tuple[int, float]] = []  # before the subscription: messages may come at once
        super().__init__(port, topics)

    def _record(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        metrics = {m.name: m for m in pb.Payload.FromString(message.payload).metrics}
        self.received.append((metrics["Inspection/Seq"].long_value, time.monotonic()))
        super()._record(client, userdata, message)


def host(port: int, count: int) -> None:
    """Host process: print ``ready`` once subscribed, then one JSON list of [seq, receipt time] when all arrived."""
    listener = Host(port, [TOPIC])
    print("ready", flush=True)
    listener.wait(lambda messages: len(messages) >= count, timeout=CLIENT_TIMEOUT_S)
    listener.close()
    print(json.dumps(listener.received), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=200.0, help="verdicts per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--host", nargs=2, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.host:
        host(int(args.host[0]), int(args.host[1]))
        return

    load_before = os.getloadavg()[0]
    verdicts = [sample_verdict(seq) for seq in range(1, args.count + 1)]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        broker = Mosquitto(work)
        broker.start()
        try:
            line = LineConfig.model_validate({"line": "line", "mqtt": {"port": broker.port}, "state_dir": tmp,
                                              "cameras": [{"camera": CAMERA, "artifact": "unused",
                                                           "source": {"kind": "folder", "path": tmp}}]})
            node = SparkplugOutput(SparkplugConfig(group_id="bench"), line)
            sink = node.sink(CAMERA, lambda trigger: None, lambda name, command: None, DiskWrites())
            node.start()
            sink.start()
            deadline = time.monotonic() + 10
            while not sink.born and time.monotonic() < deadline:
                time.sleep(0.01)
            assert sink.born, "the node did not birth"
            sub = subprocess.Popen([sys.executable, __file__, "--host", str(broker.port), str(args.count)],
                                   stdout=subprocess.PIPE, text=True)
            assert sub.stdout.readline().strip() == "ready", "host application did not start"
            sent, calls = paced(args.count, args.rate, lambda seq: sink.publish_verdict(verdicts[seq - 1]))
            out, _ = sub.communicate(timeout=180)
            sink.stop(5.0, "stopped")
            node.close("stopped")
        finally:
            broker.stop()

    first = first_receipts(json.loads(out.strip().splitlines()[-1]))
    latency = [first[s] - sent[s] for s in sent if s in first]
    result = {
        "benchmark": "sparkplug B DDATA latency, loopback, QoS 0, publish_verdict -> host application decoded it",
        "load_avg_1m": load_avg(load_before),
        "count": args.count,
        "rate_per_s": args.rate,
        "latency": {**latency_ms(latency), "lost": args.count - len(latency)},
        "publish_verdict_call": latency_ms(calls),
    }
    report("sparkplug-latency", result, args.out)


if __name__ == "__main__":
    main()
