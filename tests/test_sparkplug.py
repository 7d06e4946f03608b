"""The Sparkplug B edge node against a real mosquitto and a host application written here (paho, decoding with the
same generated module). Run as ``python -m tests.test_sparkplug PORT STATE_DIR``, it is a node in a process of its
own, for the kill -9 test: it prints ``ready`` once born and waits to be killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from patchline.runtime.config import LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.sparkplug import payloads as sp
from patchline.runtime.sinks.sparkplug import sparkplug_b_pb2 as pb
from patchline.runtime.sinks.sparkplug.config import SparkplugConfig
from patchline.runtime.sinks.sparkplug.node import SparkplugOutput
from patchline.runtime.tools.broker import Listener
from patchline.runtime.tools.sample_verdict import sample_verdict
from patchline.runtime.triggers import Trigger
from patchline.runtime.verdict import epoch_seconds
from tests.test_daemon import Subscriber, calibrated_artifact, defective, finish, good_part, run_config, start_daemon

__all__ = ["calibrated_artifact"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "runtime" / "sinks" / "sparkplug"
GROUP = "plant"
NODE = "line1"


def line(state: Path, port: int, cameras: tuple[str, ...] = ("cam1",)) -> LineConfig:
    source = {"kind": "folder", "path": str(state)}
    return LineConfig.model_validate({"line": NODE, "mqtt": {"port": port}, "state_dir": str(state),
                                      "cameras": [{"camera": c, "artifact": "unused", "source": source}
                                                  for c in cameras]})


class Host:
    """A Sparkplug host application: every message of the group, decoded, in arrival order."""

    def __init__(self, port: int) -> None:
        self.listener = Listener(port, [f"spBv1.0/{GROUP}/#"])
        self.client = self.listener.client

    def messages(self) -> list[tuple[str, str | None, pb.Payload]]:
        """(message type, device or None, payload) of each message from the node (not the host's commands)."""
        found = []
        for message in list(self.listener.messages):
            parts = message.topic.split("/")
            if parts[2].endswith("CMD"):
                continue
            payload = pb.Payload()
            payload.ParseFromString(message.payload)
            found.append((parts[2], parts[4] if len(parts) > 4 else None, payload))
        return found

    def of(self, kind: str, device: str | None = None) -> list[pb.Payload]:
        return [p for k, d, p in self.messages() if k == kind and (device is None or d == device)]

    def wait(self, predicate, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.02)
        raise AssertionError(f"host: condition not met within {timeout} s; got "
                             f"{[(k, d, p.seq) for k, d, p in self.messages()]}")

    def command(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.listener.close()


def metrics(payload: pb.Payload) -> dict[str, object]:
    return {m.name: None if m.is_null else getattr(m, m.WhichOneof("value")) for m in payload.metrics}


def command(name: str, kind: int, value: object) -> bytes:
    return sp.encode(sp.milliseconds(time.time()), [(name, kind, value)], seq=0)


@pytest.fixture()
def host(mosquitto):
    host = Host(mosquitto.port)
    yield host
    host.close()


def make_node(tmp_path: Path, port: int, cameras=("cam1",), triggers: list | None = None,
              **config) -> tuple[SparkplugOutput, dict]:
    node = SparkplugOutput(SparkplugConfig(group_id=GROUP, **config), line(tmp_path / "state", port, cameras))
    (tmp_path / "state").mkdir(exist_ok=True)
    sinks = {c: node.sink(c, (triggers if triggers is not None else []).append, lambda *a: None, DiskWrites())
             for c in cameras}
    return node, sinks


def test_generated_module_matches_a_fresh_generation_from_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools (dev extra) regenerates the module")
    assert protoc.main(["protoc", f"-I{PACKAGE}", f"--python_out={tmp_path}", str(PACKAGE / "sparkplug_b.proto")]) == 0
    assert (tmp_path / "sparkplug_b_pb2.py").read_text() == (PACKAGE / "sparkplug_b_pb2.py").read_text(), \
        "the committed sparkplug_b_pb2.py is stale: run `make proto`"


def test_births_data_in_order_seq_wraps_ddeath_and_ndeath(tmp_path, mosquitto, host):
    node, sinks = make_node(tmp_path, mosquitto.port, cameras=("cam1", "cam2"))
    node.start()
    sinks["cam1"].start()
    host.wait(lambda: host.of("DBIRTH", "cam1"))
    sinks["cam2"].publish_verdict(sample_verdict(1, camera="cam2"))  # before cam2's DBIRTH: it waits for it
    sinks["cam2"].publish_model({"model_id": "m2", "artifact_checksum": "cd" * 32, "threshold": 1.0})
    sinks["cam2"].start()
    verdicts = [sample_verdict(seq, part_id=f"P{seq}") for seq in range(1, 301)]
    for verdict in verdicts:
        sinks["cam1"].publish_verdict(verdict)
    host.wait(lambda: len(host.of("DDATA", "cam1")) == 300 and host.of("DDATA", "cam2"))
    sinks["cam1"].stop(5.0, "stopped")
    host.wait(lambda: host.of("DDEATH", "cam1"))
    node.close("stopped")
    host.wait(lambda: host.of("NDEATH"))

    messages = host.messages()
    kinds = [(k, d) for k, d, _ in messages]
    assert kinds[:2] == [("NBIRTH", None), ("DBIRTH", "cam1")]
    assert kinds.index(("DBIRTH", "cam2")) < kinds.index(("DDATA", "cam2"))
    assert kinds[-2:] == [("DDEATH", "cam1"), ("NDEATH", None)]
    seqs = [p.seq for k, _, p in messages if k != "NDEATH"]
    assert seqs == [i % 256 for i in range(len(seqs))] and len(seqs) > 256  # NBIRTH 0, +1 each, wrapping
    birth = metrics(host.of("NBIRTH")[0])
    assert birth[sp.BDSEQ] == metrics(host.of("NDEATH")[0])[sp.BDSEQ] == 0  # the first connection's
    assert birth[sp.REBIRTH] is False and birth[sp.LINE] == NODE
    dbirth = {m.name: m for m in host.of("DBIRTH", "cam2")[0].metrics}
    assert dbirth["Inspection/Score"].datatype == sp.DOUBLE and dbirth["Inspection/Score"].is_null
    assert dbirth["Inspection/Seq"].datatype == sp.UINT64 and dbirth[sp.TRIGGER].datatype == sp.STRING
    assert dbirth["Model/ID"].string_value == "m2"
    data = host.of("DDATA", "cam1")
    for verdict, payload in zip(verdicts, data):
        values = metrics(payload)
        assert values["Inspection/Seq"] == verdict["seq"] and values["Inspection/Verdict"] == verdict["verdict"]
        assert values["Inspection/Score"] == verdict["score"] and values["Inspection/Part ID"] == verdict["part_id"]
        assert values["Inspection/NG"] == (verdict["verdict"] == "NG")
        assert payload.timestamp == sp.milliseconds(epoch_seconds(verdict["timestamp"]))
    assert metrics(host.of("DDATA", "cam2")[0])["Inspection/Seq"] == 1


def test_rebirth_on_command_and_malformed_commands_change_nothing(tmp_path, mosquitto, host):
    triggers: list[Trigger] = []
    node, sinks = make_node(tmp_path, mosquitto.port, triggers=triggers)
    ncmd, dcmd = f"spBv1.0/{GROUP}/NCMD/{NODE}", f"spBv1.0/{GROUP}/DCMD/{NODE}/cam1"
    host.command(dcmd, command(sp.TRIGGER, sp.STRING, "OLD-1"), retain=True)  # replayed at the node's subscription
    node.start()
    sinks["cam1"].start()
    host.wait(lambda: host.of("NDATA"))
    assert "retained" in metrics(host.of("NDATA")[0])[sp.LAST_COMMAND_ERROR]
    host.command(dcmd, b"", retain=True)  # clears it
    malformed = [
        (ncmd, b"\xff\x00 not protobuf", "not a Sparkplug B payload"),
        (ncmd, command("Node Control/Reboot", sp.BOOLEAN, True), "unknown metric"),
        (ncmd, command(sp.REBIRTH, sp.STRING, "true"), "must be Boolean"),
        (dcmd, command(sp.TRIGGER, sp.BOOLEAN, True), "must be String"),
        (dcmd, command(sp.TRIGGER, sp.STRING, "   "), "part_id"),
        (f"spBv1.0/{GROUP}/DCMD/{NODE}/cam9", command(sp.TRIGGER, sp.STRING, "A-1"), "no camera 'cam9'"),
    ]
    for count, (topic, payload, why) in enumerate(malformed, start=2):
        host.command(topic, payload)
        host.wait(lambda: len(host.of("NDATA")) == count)
        told = metrics(host.of("NDATA")[-1])
        assert told[sp.COMMAND_ERRORS] == count and why in told[sp.LAST_COMMAND_ERROR], told
    assert node.malformed == 4 and sinks["cam1"].malformed == 3  # the NCMDs and cam9's; cam1's DCMDs

    host.command(dcmd, command(sp.TRIGGER, sp.STRING, "A-17"))
    host.wait(lambda: triggers)
    assert [t.part_id for t in triggers] == ["A-17"]
    host.command(ncmd, command(sp.REBIRTH, sp.BOOLEAN, True))
    host.wait(lambda: len(host.of("NBIRTH")) == 2 and len(host.of("DBIRTH")) == 2)
    births = host.of("NBIRTH")
    assert births[1].seq == 0 and metrics(births[1])[sp.BDSEQ] == metrics(births[0])[sp.BDSEQ]
    sinks["cam1"].publish_verdict(sample_verdict(7))
    host.wait(lambda: host.of("DDATA"))  # the node kept working through every refusal
    assert [k for k, _, _ in host.messages()][-3:] == ["NBIRTH", "DBIRTH", "DDATA"]
    node.close("stopped")


def test_primary_host_gates_births_and_its_offline_makes_the_node_reconnect(tmp_path, mosquitto, host):
    node, sinks = make_node(tmp_path, mosquitto.port, primary_host_id="scada", queue_max_count=3)
    node.start()
    sinks["cam1"].start()
    for seq in range(1, 6):
        sinks["cam1"].publish_verdict(sample_verdict(seq))
    state = "spBv1.0/STATE/scada"
    deadline = time.monotonic() + 20
    while not node.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)
    assert node.connected and host.messages() == []  # connected, but no birth without the host
    host.command(state, b"not json")
    host.command(state, json.dumps({"online": True, "timestamp": 1000}).encode(), retain=True)
    host.wait(lambda: host.of("DDATA"))
    assert [metrics(p)["Inspection/Seq"] for p in host.of("DDATA")] == [3, 4, 5]  # the queue kept the newest 3
    assert sinks["cam1"].dropped == 2 and node.malformed == 1
    host.command(state, json.dumps({"online": False, "timestamp": 500}).encode())  # older: ignored
    host.command(state, json.dumps({"online": False, "timestamp": 2000}).encode(), retain=True)
    host.wait(lambda: host.of("NDEATH"))
    assert metrics(host.of("NDEATH")[0])[sp.BDSEQ] == metrics(host.of("NBIRTH")[0])[sp.BDSEQ] == 0
    host.command(state, json.dumps({"online": True, "timestamp": 3000}).encode(), retain=True)
    host.wait(lambda: len(host.of("DBIRTH")) == 2)
    assert metrics(host.of("NBIRTH")[1])[sp.BDSEQ] == 1  # a new connection: the next bdSeq
    host.command(state, b"", retain=True)
    node.close("stopped")


def test_bdseq_pairs_the_will_with_its_birth_across_a_kill_9_and_a_restart(tmp_path, mosquitto, host):
    state = tmp_path / "state"

    def run_child() -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-m", "tests.test_sparkplug", str(mosquitto.port), str(state)],
                                 cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        return child

    child = run_child()
    try:
        host.wait(lambda: host.of("NBIRTH"))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        host.wait(lambda: host.of("NDEATH"))  # the broker's: the will
        child = run_child()
        host.wait(lambda: len(host.of("NBIRTH")) == 2)
    finally:
        child.kill()
        child.wait(10)
    first, death, second = host.of("NBIRTH")[0], host.of("NDEATH")[0], host.of("NBIRTH")[1]
    assert metrics(death)[sp.BDSEQ] == metrics(first)[sp.BDSEQ]
    assert metrics(second)[sp.BDSEQ] == (metrics(first)[sp.BDSEQ] + 1) % 256


def test_the_daemon_publishes_the_same_verdicts_as_ddata_as_on_mqtt(tmp_path, mosquitto, host, calibrated_artifact):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = run_config(tmp_path, calibrated_artifact, mosquitto.port,
                        {"kind": "folder", "path": str(inbox), "poll_interval_s": 0.1},
                        sparkplug={"group_id": GROUP, "edge_node_id": NODE})
    subscriber = Subscriber(mosquitto.port)

    def verdict_data() -> list[tuple]:
        return [(values["Inspection/Seq"], values["Inspection/Verdict"], values["Inspection/Score"])
                for values in map(metrics, host.of("DDATA", "cam1")) if "Inspection/Seq" in values]

    daemon = start_daemon(config)
    try:
        for count, image in enumerate([good_part(200), defective(good_part(201)), good_part(202)], start=1):
            cv2.imwrite(str(tmp_path / "part.png"), image[..., ::-1])
            (tmp_path / "part.png").replace(inbox / f"{count}.png")
            subscriber.wait_for(lambda: len(subscriber.verdicts()) == count, timeout=90)
        host.wait(lambda: len(verdict_data()) == 3, timeout=30)
    finally:
        daemon.send_signal(signal.SIGTERM)
        subscriber.close()
    code, output = finish(daemon)
    assert code == 0, output
    mqtt = [(v["seq"], v["verdict"], v["score"]) for v in subscriber.verdicts()]
    assert verdict_data() == mqtt and [v for _, v, _ in mqtt] == ["OK", "NG", "OK"], output
    kinds = [k for k, _, _ in host.messages()]
    assert kinds[:2] == ["NBIRTH", "DBIRTH"] and kinds[-2:] == ["DDEATH", "NDEATH"], kinds


def child_main() -> None:
    port, state = int(sys.argv[1]), Path(sys.argv[2])
    state.mkdir(parents=True, exist_ok=True)
    node = SparkplugOutput(SparkplugConfig(group_id=GROUP), line(state, port))
    node.sink("cam1", lambda t: None, lambda *a: None, DiskWrites()).start()
    node.start()
    deadline = time.monotonic() + 20
    while not node.devices["cam1"].born and time.monotonic() < deadline:
        time.sleep(0.02)
    print("ready", flush=True)
    time.sleep(120)


if __name__ == "__main__":
    child_main()
