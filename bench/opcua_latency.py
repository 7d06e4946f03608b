"""OPC UA result latency on loopback: verdict published → ResultReady event received by a client in another process.

    python bench/opcua_latency.py [--count 1000] [--rate 100] [--interval 0]

Starts the ``opcua`` output (asyncua server, Basic256Sha256 SignAndEncrypt, user and password, as on a line) in
this process with certificates made in a temporary folder, and an asyncua client in a separate process (like a
PLC or SCADA) subscribed to the camera's ResultReady events, then measures, pacing publishes at ``--rate`` per
second so that the numbers are latency, not queueing:

- ``event``: ``OpcUaSink.publish_verdict`` → receipt of the ResultReady event (hand-over to the server's loop,
  the Result variables, the event, the encrypted publish response, the client's decoding);
- ``publish_verdict_call``: how long the call itself blocks the camera's frame loop.

``--interval`` is the client subscription's publishing interval in ms: 0 (the default) asks the server to publish
at once, which measures what patchline and asyncua add; a PLC asking for 100 ms adds up to that much on top.
Both processes read CLOCK_MONOTONIC, which Linux shares between processes. Writes
bench/results/opcua-latency-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncua import Client, ua
from asyncua import __version__ as asyncua_version
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

from patchline.runtime.config import LineConfig
from patchline.runtime.sinks.opcua.certificates import self_signed
from patchline.runtime.sinks.opcua.config import OpcUaConfig
from patchline.runtime.sinks.opcua.server import OpcUaOutput
from patchline.runtime.tools.bench import CLIENT_TIMEOUT_S, first_receipts, latency_ms, load_avg, paced, report
from patchline.runtime.tools.broker import free_port
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict

ROOT = Path(__file__).resolve().parents[1]
USER, CREDENTIAL = "bench", "PATCHLINE_BENCH_OPCUA_PASSWORD"
CLIENT_URI = "urn:patchline:bench-client"


async def client_main(port: int, folder: Path, count: int, interval: float) -> None:
    """Client process: print ``ready`` once subscribed, then one JSON list of [seq, receipt time] when all came."""
    received: list[tuple[int, float]] = []

    class Handler:
        def event_notification(self, event) -> None:
            received.append((event.Seq, time.monotonic()))

    client = Client(f"opc.tcp://127.0.0.1:{port}", timeout=30)
    client.application_uri = CLIENT_URI
    await client.set_security(SecurityPolicyBasic256Sha256, str(folder / "client.der"), str(folder / "client.pem"),
                              server_certificate=str(folder / "server.der"))
    client.set_user(USER)
    client.set_password(os.environ[CREDENTIAL])
    async with client:
        ns = await client.get_namespace_index("urn:patchline:opcua")
        subscription = await client.create_subscription(interval, Handler())
        await subscription.subscribe_events(client.get_node(ua.NodeId(CAMERA, ns)),
                                            client.get_node(ua.NodeId("ResultReadyEventType", ns)))
        print("ready", flush=True)
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while len(received) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    print(json.dumps(received), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="verdicts per second")
    parser.add_argument("--interval", type=float, default=0.0, help="the client's publishing interval, ms")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--client", nargs=2, metavar=("PORT", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(int(args.client[0]), Path(args.client[1]), args.count, args.interval))
        return

    load_before = os.getloadavg()[0]
    payloads = [sample_verdict(seq) for seq in range(1, args.count + 1)]
    os.environ[CREDENTIAL] = "bench-password"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cert, key = self_signed(folder, "server", "urn:patchline:server", server=True)
        self_signed(folder, "client", CLIENT_URI, server=False)
        port = free_port()
        config = OpcUaConfig(host="127.0.0.1", port=port, certificate=str(cert), private_key=str(key), username=USER,
                             password_credential=CREDENTIAL, security_policies=("Basic256Sha256_SignAndEncrypt",))
        output = OpcUaOutput(config, LineConfig.model_construct(line="bench"))
        sink = output.sink(CAMERA, lambda trigger: None, lambda name, payload: None, None)
        output.start()
        sink.start()
        try:
            client = subprocess.Popen([sys.executable, __file__, "--client", str(port), tmp, "--count",
                                       str(args.count), "--interval", str(args.interval)],
                                      stdout=subprocess.PIPE, text=True)
            assert client.stdout.readline().strip() == "ready", "client did not subscribe"
            sent, calls = paced(args.count, args.rate, lambda seq: sink.publish_verdict(payloads[seq - 1]))
            out, _ = client.communicate(timeout=180)
        finally:
            sink.stop(5.0, "stopped")
            output.close("stopped")
    first = first_receipts(json.loads(out.strip().splitlines()[-1]))
    latency = [first[s] - sent[s] for s in sent if s in first]
    result = {
        "benchmark": "opcua ResultReady latency, loopback, Basic256Sha256 SignAndEncrypt, publish_verdict -> event",
        "load_avg_1m": load_avg(load_before),
        "asyncua": asyncua_version,
        "count": args.count,
        "rate_per_s": args.rate,
        "publishing_interval_ms": args.interval,
        "event": {**latency_ms(latency), "lost": args.count - len(latency)},
        "publish_verdict_call": latency_ms(calls),
    }
    report("opcua-latency", result, args.out)


if __name__ == "__main__":
    main()
