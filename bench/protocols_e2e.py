"""Every protocol at once, end to end: one daemon with MQTT, OPC UA, Sparkplug B and Modbus TCP on, a live camera,
and a client of each protocol in a process of its own, on loopback.

    python bench/protocols_e2e.py --artifact demo/artifact [--count 200] [--threads 1]

The camera is a live GStreamer test source (10 fps), in continuous mode (the model judges the newest frame whenever
it is free, so the next inference runs while a verdict goes out) or, with ``--trigger-every S``, in trigger mode
with a PLC's trigger every S seconds (the model idle meanwhile). For each verdict and protocol, from the moment
the client has the value:

- ``added``: verdict made (the frame's capture time + ``frame_age_ms``, both in the verdict) → value visible to
  the client: what the protocols add beyond the model (the issue's target: p99 ≤ 10 ms);
- ``frame_to_visible``: frame ready (its capture time) → value visible: the model's time included.

The clients are the per-protocol benchmarks' own (``mqtt_latency.py --subscribe``, ``opcua_latency.py --client``,
``sparkplug_latency.py --host``, ``modbus_latency.py --poll``: a PLC polling the latest result as fast as it can).
They report CLOCK_MONOTONIC receipt times, turned into wall-clock times with this process's offset between the
two clocks; the verdict's times are wall clock in milliseconds, so each figure carries up to 1 ms of rounding.
Writes bench/results/protocols-e2e-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

import opcua_latency
import sparkplug_latency
from patchline.runtime.sinks.opcua.certificates import self_signed
from patchline.runtime.tools.bench import first_receipts, latency_ms, load_avg, report
from patchline.runtime.tools.broker import Listener, Mosquitto, free_port
from patchline.runtime.tools.sample_verdict import CAMERA
from patchline.runtime.verdict import epoch_seconds

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
LIVE = "videotestsrc is-live=true pattern=ball ! video/x-raw,width=320,height=240,framerate=10/1"
PASSWORD = "bench-password"
START_TIMEOUT_S = 300.0  # loading and warming the model
OPTIONAL = ("opcua", "sparkplug", "modbus")  # MQTT is always on
MARGIN = 10  # verdicts that may come while the clients connect (OPC UA's secure channel takes a second or two)


def run_config(work: Path, artifact: Path, threads: int, mode: str, protocols: list[str], mqtt_port: int,
               opcua_port: int, modbus_port: int) -> Path:
    group, node = sparkplug_latency.TOPIC.split("/")[1], sparkplug_latency.TOPIC.split("/")[3]
    config = {
        "camera": CAMERA, "artifact": str(artifact), "threads": threads, "mode": mode, "state_dir": str(work / "state"),
        "source": {"kind": "gstreamer", "pipeline": LIVE}, "evidence": {"enabled": False},
        "mqtt": {"port": mqtt_port}, "metrics": {"enabled": False},
        "opcua": {"host": "127.0.0.1", "port": opcua_port, "certificate": str(work / "server.der"),
                  "private_key": str(work / "server.pem"), "username": opcua_latency.USER,
                  "password_credential": opcua_latency.CREDENTIAL,
                  "security_policies": ["Basic256Sha256_SignAndEncrypt"]},
        "sparkplug": {"group_id": group, "edge_node_id": node},
        "modbus": {"port": modbus_port},
    }
    for name in OPTIONAL:
        if name not in protocols:
            del config[name]
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def latest_seq(verdicts: Listener) -> int:
    return max(json.loads(m.payload)["seq"] for m in list(verdicts.messages))


def trigger(verdicts: Listener, every_s: float, done: threading.Event) -> None:
    """A PLC's trigger every ``every_s`` (on the camera's MQTT trigger topic) until ``done``."""
    part = 0
    while not done.wait(every_s):
        part += 1
        verdicts.client.publish(f"patchline/{CAMERA}/trigger", f"P{part}", qos=1)


def client(script: str, *args: str) -> subprocess.Popen:
    """A protocol's client process; it prints ``ready`` once it listens."""
    process = subprocess.Popen([sys.executable, str(BENCH / script), *args], stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline().strip()
    if line != "ready":
        process.kill()
        raise RuntimeError(f"{script} {' '.join(args)}: no 'ready' (got {line!r})")
    return process


def receipts(process: subprocess.Popen, timeout: float) -> dict[int, float]:
    """The first receipt time (monotonic) of each seq a client reports."""
    out, _ = process.communicate(timeout=timeout)
    received = json.loads(out.strip().splitlines()[-1])
    return first_receipts(received["seen"].items() if isinstance(received, dict) else received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifact", type=Path, default=ROOT / "demo" / "artifact")
    parser.add_argument("--count", type=int, default=200, help="verdicts to measure (about)")
    parser.add_argument("--threads", type=int, default=1, help="the model's CPU threads (the rest serve the I/O)")
    parser.add_argument("--protocols", nargs="*", choices=OPTIONAL, default=list(OPTIONAL),
                        help="the protocols on beside MQTT")
    parser.add_argument("--trigger-every", type=float, default=0.0,
                        help="s between triggers: trigger mode, the model idle when each verdict goes out; "
                             "0: continuous mode, the next frame's inference running meanwhile")
    # 0 would have no keep-alives: asyncua's client then takes a quiet second for a stale subscription and recreates
    # it, losing the events meanwhile (seen as missed verdicts in trigger mode).
    parser.add_argument("--opcua-interval-ms", type=float, default=10.0, help="the OPC UA client's publishing interval")
    # A PLC polls once per cycle; a client polling back to back would take a core of this 2-core box from the rest.
    parser.add_argument("--modbus-poll-ms", type=float, default=5.0, help="the Modbus client's poll period")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if not (args.artifact / "manifest.json").exists():
        parser.error(f"{args.artifact} is not an artifact (make demo-artifact makes demo/artifact)")

    load_before = os.getloadavg()[0]
    os.environ[opcua_latency.CREDENTIAL] = PASSWORD
    wall_minus_monotonic = time.time() - time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        self_signed(work, "server", "urn:patchline:server", server=True)
        self_signed(work, "client", opcua_latency.CLIENT_URI, server=False)
        broker = Mosquitto(work)
        broker.start()
        opcua_port, modbus_port = free_port(), free_port()
        mode = "trigger" if args.trigger_every else "continuous"
        config = run_config(work, args.artifact.resolve(), args.threads, mode, args.protocols, broker.port,
                            opcua_port, modbus_port)
        verdicts = Listener(broker.port, [f"patchline/{CAMERA}/verdict"])
        daemon_log = work / "daemon.log"  # a file, not a pipe nobody reads while it runs
        with daemon_log.open("w") as log_file:
            daemon = subprocess.Popen([sys.executable, "-m", "patchline.runtime.cli", "run", "--config", str(config)],
                                      stdout=log_file, stderr=subprocess.STDOUT)
        clients = {}
        done = threading.Event()
        if args.trigger_every:
            threading.Thread(target=trigger, args=(verdicts, args.trigger_every, done), daemon=True).start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while not verdicts.messages:  # every output listens once the first verdict is out
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not start:\n{daemon_log.read_text()[-3000:]}")
                time.sleep(0.1)
            # The clients stop after a number of verdicts (Modbus: at a seq): enough that all of them have every
            # verdict from the first one made after the last client listened to ``stop``.
            base = latest_seq(verdicts)
            stop = base + args.count + MARGIN
            commands = {
                "mqtt": ("mqtt_latency.py", "--subscribe", str(broker.port), f"patchline/{CAMERA}/verdict",
                         str(stop - base)),
                "opcua": ("opcua_latency.py", "--client", str(opcua_port), tmp, "--count", str(stop - base),
                          "--interval", str(args.opcua_interval_ms)),
                "sparkplug": ("sparkplug_latency.py", "--host", str(broker.port), str(stop - base)),
                "modbus": ("modbus_latency.py", "--poll", str(modbus_port), str(stop), "--poll-period",
                           str(args.modbus_poll_ms)),
            }
            clients = {name: client(*command) for name, command in commands.items()
                       if name == "mqtt" or name in args.protocols}
            first = latest_seq(verdicts) + 1
            seen = {name: receipts(process, timeout=args.count * 5 + 300) for name, process in clients.items()}
        finally:
            done.set()
            for process in clients.values():
                process.kill()
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(60)
            if os.environ.get("PATCHLINE_BENCH_LOG"):
                print(daemon_log.read_text())
            verdicts.close()
            broker.stop()
    # A client that counts messages stops one verdict early when an event of a verdict made before it listened
    # still reached it: the window ends at the last seq every client got to.
    last = min(max(first_seen) for first_seen in seen.values())
    made, captured = {}, {}
    for message in verdicts.messages:
        v = json.loads(message.payload)
        if first <= v["seq"] <= last:
            captured[v["seq"]] = epoch_seconds(v["timestamp"])
            made[v["seq"]] = captured[v["seq"]] + v["frame_age_ms"] / 1000.0
    result = {
        "benchmark": "protocols in one daemon, live camera: verdict made / frame ready -> value visible to each "
                     "protocol's client (separate processes, loopback)",
        "load_avg_1m": load_avg(load_before),
        "artifact": str(args.artifact), "threads": args.threads, "verdicts": len(made),
        "protocols": ["mqtt", *args.protocols],
        "mode": f"trigger every {args.trigger_every:g} s" if args.trigger_every else "continuous",
        "modbus_poll_ms": args.modbus_poll_ms, "opcua_publishing_interval_ms": args.opcua_interval_ms,
        "model_ms": latency_ms([made[s] - captured[s] for s in made]),
    }
    for name, first_seen in seen.items():
        visible = {s: at + wall_minus_monotonic for s, at in first_seen.items() if s in made}
        result[name] = {
            "added": latency_ms([visible[s] - made[s] for s in visible]),
            "frame_to_visible": latency_ms([visible[s] - captured[s] for s in visible]),
            "missed": sorted(set(made) - set(visible)),
        }
    report("protocols-e2e", result, args.out)


if __name__ == "__main__":
    main()
