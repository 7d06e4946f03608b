"""Modbus TCP latency on loopback: verdict published → seen by a PLC polling the server from another process.

    python bench/modbus_latency.py [--count 1000] [--rate 50]

Starts the ``modbus`` output alone (no model, no camera) on a free loopback port, and a pymodbus client in a
separate process (like a PLC) that reads the latest result (20 holding registers, one request) as fast as it can;
its poll period is measured and reported, since a PLC sees a value at its next poll at the earliest. Publishes are
paced at ``--rate`` per second, far slower than the polls, so that the numbers are latency, not queueing:

- ``latency``: ``ModbusSink.publish_verdict`` → the poller reads the new seq (hand-over to the server's loop, the
  register update, then on average half a poll period, plus the poll's own round trip);
- ``publish_verdict_call``: how long the call blocks the camera's frame loop;
- ``poll``: the poller's period, one read request and its answer.

Both processes read CLOCK_MONOTONIC, which Linux shares between processes. Writes
bench/results/modbus-latency-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pymodbus
from pymodbus.client import ModbusTcpClient

from patchline.runtime.config import LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.modbus import registers as r
from patchline.runtime.sinks.modbus.config import ModbusConfig
from patchline.runtime.sinks.modbus.server import ModbusOutput
from patchline.runtime.tools.bench import CLIENT_TIMEOUT_S, first_receipts, latency_ms, load_avg, paced, report
from patchline.runtime.tools.broker import free_port
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict

ROOT = Path(__file__).resolve().parents[1]


def poll(port: int, count: int, period_s: float) -> None:
    """Poller process: print ``ready``, then one JSON object when seq ``count`` was seen: the first time each
    seq was read, and every poll's duration. A poll starts every ``period_s`` (0: each right after the last, as
    fast as the server answers)."""
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
    assert client.connect(), "poller could not connect"
    print("ready", flush=True)
    seen: dict[int, float] = {}
    polls: list[float] = []
    deadline = time.monotonic() + CLIENT_TIMEOUT_S
    while count not in seen and time.monotonic() < deadline:
        if period_s and polls:
            time.sleep(max(0.0, t0 + period_s - time.monotonic()))
        t0 = time.monotonic()
        words = client.read_holding_registers(r.LATEST_RESULT, count=r.RESULT_REGISTERS, device_id=1).registers
        t1 = time.monotonic()
        polls.append(t1 - t0)
        seen.setdefault(r.decode_u32(words[r.R_SEQ:r.R_SEQ + 2]), t1)
    client.close()
    print(json.dumps({"seen": seen, "polls_s": polls}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="publishes per second")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--poll-period", type=float, default=0.0,
                        help="ms from one poll's start to the next (a PLC's cycle); 0: as fast as the server answers")
    parser.add_argument("--poll", nargs=2, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll:
        poll(int(args.poll[0]), int(args.poll[1]), args.poll_period / 1000.0)
        return

    load_before = os.getloadavg()[0]
    payloads = [sample_verdict(seq) for seq in range(1, args.count + 1)]
    line = LineConfig.model_validate({"line": "bench", "cameras": [
        {"camera": CAMERA, "artifact": "unused", "source": {"kind": "folder", "path": "unused"}}]})
    port = free_port()
    output = ModbusOutput(ModbusConfig(port=port), line)
    sink = output.sink(CAMERA, lambda trigger: None, lambda name, payload: None, DiskWrites())
    output.start()
    sink.start()
    poller = subprocess.Popen([sys.executable, __file__, "--poll", str(port), str(args.count), "--poll-period",
                               str(args.poll_period)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert poller.stdout.readline().strip() == "ready", "poller did not start"
        time.sleep(0.5)  # the poller is polling before the first publish
        sent, calls = paced(args.count, args.rate, lambda seq: sink.publish_verdict(payloads[seq - 1]))
        out, _ = poller.communicate(timeout=300)
    finally:
        if poller.poll() is None:
            poller.kill()
        sink.stop(5.0, "stopped")
        output.close("stopped")
    poller_report = json.loads(out.strip().splitlines()[-1])
    seen = first_receipts(poller_report["seen"].items())
    latency = [seen[s] - sent[s] for s in sent if s in seen]
    result = {
        "benchmark": "modbus latency, loopback: publish_verdict -> a polling client reads the new seq",
        "load_avg_1m": load_avg(load_before),
        "pymodbus": pymodbus.__version__,
        "count": args.count,
        "rate_per_s": args.rate,
        # a seq the poller never read: a poll stalled past the next publish, which overwrote it (the PLC sees a gap)
        "latency": {**latency_ms(latency), "overwritten_before_read": args.count - len(latency)},
        "publish_verdict_call": latency_ms(calls),
        "poll": latency_ms(poller_report["polls_s"]),
    }
    report("modbus-latency", result, args.out)


if __name__ == "__main__":
    main()
