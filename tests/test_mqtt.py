"""MQTT side of the daemon against a real mosquitto with real paho subscribers."""

from __future__ import annotations

import errno
import json
import logging
import math
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from patchline.runtime.sinks.mqtt.config import MqttConfig, TlsConfig
from patchline.runtime.decision import Decision
from patchline.runtime.config import ConfigError
from patchline.runtime.credentials import read_credential
from patchline.runtime.sinks.mqtt.client import MqttError
from patchline.runtime.sinks.mqtt.sink import MqttSink
from patchline.runtime.sinks.mqtt.topics import Topics
from patchline.runtime.triggers import Trigger, parse_trigger
from patchline.runtime import verdict as verdict_module
from patchline.runtime.tools import broker
from patchline.runtime.tools.broker import Mosquitto, free_port
from patchline.runtime.tools.sample_verdict import CAMERA, sample_verdict
from patchline.runtime.verdict import SCHEMA_PATH, SeqCounter, epoch_seconds, iso_utc, make_verdict
from tests.conftest import fill

ROOT = Path(__file__).resolve().parents[1]
TOPICS = Topics.for_camera("patchline", CAMERA)
VALIDATOR = jsonschema.Draft202012Validator(json.loads(SCHEMA_PATH.read_text()),
                                            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


class Listener(broker.Listener):
    """The tool's subscriber, reading this module's camera's verdicts."""

    def verdict_seqs(self) -> list[int]:
        return [json.loads(p)["seq"] for p in self.on(TOPICS.verdict)]


@pytest.fixture()
def open_sinks():
    """Sinks made by a test are stopped at its end, whatever happened."""
    sinks: list[MqttSink] = []
    yield sinks
    for sink in sinks:
        sink.stop(flush_timeout=0.2)


def start_sink(sinks: list[MqttSink], port: int, state: Path, on_trigger=None, **config) -> MqttSink:
    sink = MqttSink(MqttConfig(port=port, **config), CAMERA, state, on_trigger=on_trigger)
    sinks.append(sink)
    sink.start()
    return sink


def first_seen_in_order(seqs: list[int], expected: list[int]) -> None:
    """Every expected seq arrived, first arrivals in order; any extra message repeats an earlier seq."""
    first = list(dict.fromkeys(seqs))
    assert first == expected, f"order/loss: got {first[:10]}... ({len(first)} distinct) expected {len(expected)}"


# -- message formats ---------------------------------------------------------------------------


def test_verdict_payload_matches_schema_and_rejects_bad_values() -> None:
    v = sample_verdict(3, part_id="P-3")
    VALIDATOR.validate(v)
    assert v["verdict"] == "NG" and v["location"] == {"x": 3, "y": 17} and v["timestamp"].endswith("Z")
    uncalibrated = make_verdict(**dict(_args(), timestamp=0.0, decision=Decision(0.5, None, 1.0, "OK"), latency_ms={}))
    VALIDATOR.validate(uncalibrated)
    assert uncalibrated["timestamp"] == "1970-01-01T00:00:00.000Z" and uncalibrated["normalised_score"] is None
    assert epoch_seconds(uncalibrated["timestamp"]) == 0.0 and epoch_seconds(iso_utc(1714564800.123)) == 1714564800.123
    bad = dict(v, verdict="MAYBE")
    assert not VALIDATOR.is_valid(bad)
    with pytest.raises(ValueError, match="score"):
        make_verdict(**dict(_args(), decision=Decision(math.nan, None, 1.0, "OK")))
    with pytest.raises(ValueError, match="verdict field normalised_score must be a finite number"):
        make_verdict(**dict(_args(), decision=Decision(1.0, math.inf, 1.0, "OK")))
    with pytest.raises(ValueError, match="frame_age_s"):
        make_verdict(**dict(_args(), frame_age_s=-0.5))
    with pytest.raises(ValueError, match="seq"):
        make_verdict(**dict(_args(), seq=0))


def _args() -> dict:
    return dict(camera="c", seq=1, timestamp=1.0, frame_age_s=0.0, decision=Decision(0.5, 0.2, 1.0, "OK"),
                location=(1, 2), latency_ms={"total": 1.0}, model_id="m", artifact_checksum="0" * 64)


def test_seq_counter_continues_after_restart_and_never_repeats_after_reboot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verdict_module, "RESERVE", 3)
    path = tmp_path / "state" / "cam1.seq"
    counter = SeqCounter(path)
    assert [counter.next() for _ in range(5)] == [1, 2, 3, 4, 5]
    assert SeqCounter(path).next() == 6  # a daemon restart in the same boot: no gap
    last, reserved, boot = path.read_text().split()
    assert (int(last), int(reserved)) == (6, 6) and not [p for p in path.parent.iterdir() if p != path]
    path.write_text(f"5 6 {'0' * len(boot)}\n")  # after a reboot the unsynced "6" may be lost: skip the reservation
    assert SeqCounter(path).next() == 7
    path.write_text("41\n")  # an operator's repair
    assert SeqCounter(path).next() == 42
    for damaged in ("garbage", "9 3 boot", ""):
        path.write_text(damaged)
        with pytest.raises(ValueError, match="cam1.seq"):
            SeqCounter(path)


@pytest.mark.parametrize(("payload", "part_id"), [
    (b'{"part_id": "A-17"}', "A-17"), (b"A-18\n", "A-18"), (b'"A-19"', "A-19"), (b"4711", "4711"),
    (b'{"part_id": 42, "line": 3}', "42"),
])
def test_parse_trigger_accepts(payload: bytes, part_id: str) -> None:
    assert parse_trigger(payload) == part_id


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "empty"), (b'{"part_id": ', "does not parse"), (b'{"serial": 1}', "no part_id"), (b"\xff\xfe", "UTF-8"),
    (b"[1, 2]", "string or an integer"), (b'{"part_id": ""}', "printable"), (b"x" * 200, "printable"),
])
def test_parse_trigger_rejects(payload: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_trigger(payload)


def test_password_from_credentials_directory_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("PL_TEST_PW", "from-env")
    assert read_credential("PL_TEST_PW", "mqtt.password_credential") == "from-env"
    (tmp_path / "PL_TEST_PW").write_text("from-file\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_credential("PL_TEST_PW", "mqtt.password_credential") == "from-file"
    with pytest.raises(ConfigError, match="mqtt.password_credential 'PL_MISSING'.*environment variable PL_MISSING"):
        read_credential("PL_MISSING", "mqtt.password_credential")
    with pytest.raises(ConfigError, match="plain name"):
        read_credential("../etc/passwd", "mqtt.password_credential")


# -- publishing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_verdicts_and_mirrors_arrive_in_order_with_availability(mosquitto: Mosquitto, tmp_path: Path, open_sinks,
                                                                protocol: str) -> None:
    listener = Listener(mosquitto.port, [f"{TOPICS.base}/#"], protocol)
    sink = start_sink(open_sinks, mosquitto.port, tmp_path / "state", protocol=protocol)
    assert sink.wait_connected(5)
    seq = SeqCounter(tmp_path / "state" / "cam1.seq")
    sent = [sample_verdict(seq.next(), part_id=f"P-{i}" if i % 3 else None) for i in range(20)]
    for v in sent:
        sink.publish_verdict(v)
    sink.stop(flush_timeout=5)
    assert listener.wait(lambda ms: any(m.payload == b"stopped" for m in ms))

    expected = []
    for v in sent:
        expected += [(TOPICS.verdict, v), (TOPICS.mirror("part_id"), v["part_id"] or ""),
                     (TOPICS.mirror("seq"), str(v["seq"])), (TOPICS.mirror("score"), repr(v["score"])),
                     (TOPICS.mirror("state"), v["verdict"])]
    received = []
    for m in listener.messages:
        if m.topic == TOPICS.verdict:
            payload = json.loads(m.payload)
            VALIDATOR.validate(payload)
            received.append((m.topic, payload))
        elif m.topic != TOPICS.available:
            received.append((m.topic, m.payload.decode()))
        assert m.qos == 1 and not m.retain
    assert received == expected
    assert listener.on(TOPICS.available) == [b"online", b"stopped"]
    assert sink.delivery.delivered == 20 and sink.delivery.dropped == 0 and sink.delivery.queue_depth == 0
    assert not list(sink.spool_dir.iterdir())
    listener.close()

    late = Listener(mosquitto.port, [TOPICS.available], protocol)  # a PLC connecting later sees the retained state
    assert late.wait(lambda ms: len(ms) == 1) and late.messages[0].retain and late.messages[0].payload == b"stopped"
    late.close()


def _child(port: int, state: Path, count: int, first_seq: int = 1) -> subprocess.Popen:
    args = [str(port), str(state), str(count), str(first_seq)]
    process = subprocess.Popen([sys.executable, "-m", "tests.mqtt_child", *args], cwd=ROOT, stdout=subprocess.PIPE,
                               text=True)
    line = process.stdout.readline()
    if line.strip() != "ready":
        process.kill()
        pytest.fail(f"child sink did not get ready (exit {process.wait()})")
    return process


def test_will_publishes_offline_when_the_process_is_killed(mosquitto: Mosquitto, tmp_path: Path) -> None:
    listener = Listener(mosquitto.port, [TOPICS.available])
    child = _child(mosquitto.port, tmp_path / "state", 0)
    assert listener.wait(lambda ms: [m.payload for m in ms] == [b"online"])
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert listener.wait(lambda ms: [m.payload for m in ms] == [b"online", b"offline"]), listener.on(TOPICS.available)
    assert listener.messages[-1].qos == 1
    listener.close()


def retained_availability(port: int) -> bytes | None:
    """What a PLC connecting now is told on `available` (None: nothing retained)."""
    late = Listener(port, [TOPICS.available])
    late.wait(lambda ms: bool(ms), timeout=1.0)
    late.close()
    return late.messages[0].payload if late.messages else None


def test_a_stop_while_the_broker_is_away_never_leaves_online_behind(tmp_path: Path, open_sinks, caplog) -> None:
    """A broker that keeps retained messages (Debian's default: persistence) is stopped, then the sink. Away for
    the whole stop, it is told nothing and shows the will ("offline") when back; back within the stop's flush
    window, the reconnection announces "stopped" and delivers what was queued, and no "online" is left behind."""
    broker = Mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    broker.start()
    try:
        sink = start_sink(open_sinks, broker.port, tmp_path / "state")
        assert sink.wait_connected(5)
        broker.stop()
        with caplog.at_level(logging.INFO, logger="patchline.runtime.sinks.mqtt"):
            sink.stop(flush_timeout=1.0)
        assert "availability 'stopped' not published" in caplog.text
        assert "0 reconnects, 0 verdicts dropped" in caplog.text  # the sink's own counts at the end of a run
        broker.start()
        assert retained_availability(broker.port) == b"offline"

        sink = start_sink(open_sinks, broker.port, tmp_path / "state")
        assert sink.wait_connected(5)
        listener = Listener(broker.port, [TOPICS.available, TOPICS.verdict], "3.1.1", client_id="away-test",
                            persistent=True)
        broker.stop()
        sink.publish_verdict(sample_verdict(1))  # queued while the broker is away
        stopping = threading.Thread(target=sink.stop, kwargs={"flush_timeout": 15.0})
        stopping.start()
        time.sleep(0.5)
        broker.start()  # back while the sink is stopping
        stopping.join(20)
        assert not stopping.is_alive()
        assert retained_availability(broker.port) == b"stopped"
        assert listener.wait(lambda ms: any(m.topic == TOPICS.verdict for m in ms))
        assert listener.verdict_seqs() == [1]
        assert b"online" not in listener.on(TOPICS.available)[1:]  # after the first connection: never again
        assert sink.delivery.delivered == 1 and not list(sink.spool_dir.iterdir())
        listener.close()
    finally:
        broker.stop()


def test_broker_restart_mid_stream_loses_nothing(tmp_path: Path, open_sinks) -> None:
    # Persistence keeps the test subscriber's session across the restart, so it cannot miss what the
    # sink publishes before the subscriber itself reconnects.
    broker = Mosquitto(tmp_path, extra_conf=f"persistence true\npersistence_location {tmp_path}/\n")
    broker.start()
    try:
        listener = Listener(broker.port, [TOPICS.verdict], "3.1.1", client_id="restart-test", persistent=True)
        sink = start_sink(open_sinks, broker.port, tmp_path / "state")
        assert sink.wait_connected(5)
        total = 200

        def stream() -> None:
            for seq in range(1, total + 1):
                sink.publish_verdict(sample_verdict(seq))
                time.sleep(0.01)

        producer = threading.Thread(target=stream)
        producer.start()
        time.sleep(0.6)
        broker.restart()
        producer.join()
        assert listener.wait(lambda ms: len({json.loads(m.payload)["seq"] for m in ms}) >= total, timeout=30), \
            f"{len(set(listener.verdict_seqs()))} of {total} arrived; sink queue {sink.delivery.queue_depth}"
        first_seen_in_order(listener.verdict_seqs(), list(range(1, total + 1)))
        assert sink.delivery.reconnects >= 1 and sink.delivery.dropped == 0
        deadline = time.monotonic() + 5
        while sink.delivery.queue_depth and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.delivery.queue_depth == 0 and not list(sink.spool_dir.glob("*.json"))
        listener.close()
    finally:
        broker.stop()


def test_spool_survives_sink_restarts_during_an_outage(mosquitto: Mosquitto, tmp_path: Path) -> None:
    state = tmp_path / "state"
    mosquitto.stop()
    # A clean stop during the outage keeps what it could not deliver ...
    first = MqttSink(MqttConfig(port=mosquitto.port), CAMERA, state)
    first.start()
    for seq in range(1, 6):
        first.publish_verdict(sample_verdict(seq))
    first.stop(flush_timeout=0.3)
    assert first.delivery.queue_depth == 5 and len(list(first.spool_dir.glob("*.json"))) == 5
    # ... and so does a process killed outright.
    _child(mosquitto.port, state, 5, first_seq=6).kill()
    assert len(list(first.spool_dir.glob("*.json"))) == 10

    mosquitto.start()
    listener = Listener(mosquitto.port, [TOPICS.verdict, TOPICS.mirror("seq")])
    third = MqttSink(MqttConfig(port=mosquitto.port), CAMERA, state)
    third.start()
    third.publish_verdict(sample_verdict(11))
    assert listener.wait(lambda ms: len(ms) >= 22), listener.verdict_seqs()
    third.stop()
    assert listener.verdict_seqs() == list(range(1, 12))
    assert [int(p) for p in listener.on(TOPICS.mirror("seq"))] == list(range(1, 12))
    for payload in listener.on(TOPICS.verdict):
        VALIDATOR.validate(json.loads(payload))
    assert third.delivery.delivered == 11 and not list(third.spool_dir.glob("*.json"))
    listener.close()


def test_unreadable_spool_files_are_counted_and_kept_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = MqttSink(MqttConfig(port=free_port()), CAMERA, tmp_path)  # no broker listens there
    sink.spool_dir.mkdir(parents=True)
    (sink.spool_dir / "000000000001.json").write_text('{"queued_at": 1')  # torn by a power cut
    (sink.spool_dir / "000000000002.json").write_text('{"queued_at": 1, "verdict": {}}')  # wrong layout
    (sink.spool_dir / "notes.json").write_text('{}')  # not ours: used to crash start with int('notes')
    with caplog.at_level(logging.ERROR):
        sink.start()
    sink.stop(flush_timeout=0)
    assert sink.delivery.drops["corrupt"] == 3 and sink.delivery.queue_depth == 0
    assert sorted(p.name for p in sink.spool_dir.iterdir()) == [
        "000000000001.json.corrupt", "000000000002.json.corrupt", "notes.json.corrupt"]
    assert f"spool file {sink.spool_dir / 'notes.json'} is unreadable (not a spool file name" in caplog.text


def test_queue_bounds_drop_the_oldest_and_count_them(mosquitto: Mosquitto, tmp_path: Path, open_sinks,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    mosquitto.stop()
    sink = start_sink(open_sinks, mosquitto.port, tmp_path / "full", queue_max_count=5)
    for seq in range(1, 13):
        sink.publish_verdict(sample_verdict(seq))
    aged = start_sink(open_sinks, mosquitto.port, tmp_path / "aged", queue_max_age_s=0.3)
    for seq in range(1, 4):
        aged.publish_verdict(sample_verdict(seq))
    deadline = time.monotonic() + 5
    while (sink.delivery.dropped < 7 or aged.delivery.dropped < 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.delivery.drops["overflow"] == 7 and sink.delivery.queue_depth == 5
    assert len(list(sink.spool_dir.glob("*.json"))) == 5
    assert aged.delivery.drops["expired"] == 3 and aged.delivery.queue_depth == 0
    assert any("dropped oldest" in r.getMessage() for r in caplog.records)

    mosquitto.start()
    listener = Listener(mosquitto.port, [TOPICS.verdict])
    newest_five = list(range(8, 13))
    assert listener.wait(lambda ms: {json.loads(m.payload)["seq"] for m in ms} >= set(newest_five), timeout=15)
    # QoS 1 is at least once: a connection lost before an ack redelivers that verdict (its seq tells the PLC so);
    # none is missing or out of order.
    seqs = listener.verdict_seqs()
    assert sorted(set(seqs)) == newest_five and seqs == sorted(seqs)
    listener.close()


# -- triggers ------------------------------------------------------------------------------------


def test_triggers_v5_response_and_malformed_payloads(mosquitto: Mosquitto, tmp_path: Path, open_sinks) -> None:
    triggers: queue.Queue[Trigger] = queue.Queue()

    def on_trigger(trigger: Trigger) -> None:
        if trigger.part_id == "boom":
            raise RuntimeError("a bug in the daemon's trigger handler")
        triggers.put(trigger)

    listener = Listener(mosquitto.port, ["plc/answers", TOPICS.error, TOPICS.mirror("part_id")])
    sink = start_sink(open_sinks, mosquitto.port, tmp_path / "state", on_trigger=on_trigger)
    assert sink.wait_connected(5)
    plc = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    plc.connect("127.0.0.1", mosquitto.port)
    plc.loop_start()

    def send(payload: bytes | str, response_topic: str | None = None, correlation: bytes | None = None) -> None:
        props = None
        if response_topic:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = correlation
        plc.publish(TOPICS.trigger, payload, qos=1, properties=props).wait_for_publish(5)

    send(json.dumps({"part_id": "P-1"}), "plc/answers", b"\x00\x01req-1")
    trigger = triggers.get(timeout=5)
    assert trigger == Trigger("P-1", trigger.received, "plc/answers", b"\x00\x01req-1")
    assert abs(trigger.received - time.time()) < 5
    sink.publish_verdict(sample_verdict(1, part_id=trigger.part_id), trigger)
    assert listener.wait(lambda ms: any(m.topic == "plc/answers" for m in ms))
    answer = next(m for m in listener.messages if m.topic == "plc/answers")
    assert answer.properties.CorrelationData == b"\x00\x01req-1"
    VALIDATOR.validate(json.loads(answer.payload))
    assert json.loads(answer.payload)["part_id"] == "P-1"

    for bad in (b'{"part_id": ', b'{"serial": 3}', b"\xff\xfe", b""):
        send(bad)
    send(b"boom")  # the handler raises: logged, the sink carries on
    send(b"[]", "plc/answers", b"req-2")  # malformed with a ResponseTopic: the error answers the request too
    send("P-2")
    assert triggers.get(timeout=5).part_id == "P-2" and triggers.empty()
    assert listener.wait(lambda ms: len([m for m in ms if m.topic == TOPICS.error]) == 5)
    errors = [json.loads(p) for p in listener.on(TOPICS.error)]
    assert [e["error"] for e in errors] == ["malformed_trigger"] * 5
    assert [e["detail"] for e in errors][:4] == [
        "payload looks like JSON but does not parse", "JSON object has no part_id", "payload is not UTF-8 text",
        'payload is empty; send {"part_id": "..."} or the part id as plain text']
    assert errors[0]["camera"] == CAMERA and errors[0]["payload"] == '{"part_id": '
    assert listener.wait(lambda ms: len([m for m in ms if m.topic == "plc/answers"]) == 2)
    error_answer = [m for m in listener.messages if m.topic == "plc/answers"][1]
    assert error_answer.properties.CorrelationData == b"req-2"
    assert json.loads(error_answer.payload)["error"] == "malformed_trigger"
    assert sink.delivery.connected and listener.on(TOPICS.mirror("part_id")) == [b"P-1"]

    # A trigger the daemon cannot answer (e.g. no frame in time) is answered with the error, also on v5.
    send(json.dumps({"part_id": "P-3"}), "plc/answers", b"req-3")
    late = triggers.get(timeout=5)
    sink.publish_error({"error": "no_frame", "detail": "no frame within 2 s", "part_id": late.part_id}, late)
    assert listener.wait(lambda ms: len([m for m in ms if m.topic == "plc/answers"]) == 3)
    no_frame = [m for m in listener.messages if m.topic == "plc/answers"][2]
    assert no_frame.properties.CorrelationData == b"req-3"
    assert json.loads(no_frame.payload)["error"] == "no_frame"
    assert listener.wait(lambda ms: len([m for m in ms if m.topic == TOPICS.error]) == 6)
    plc.disconnect()
    plc.loop_stop()
    listener.close()


# -- security ------------------------------------------------------------------------------------


def test_wrong_password_is_fatal_without_retrying(tmp_path: Path, open_sinks,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd not installed (Debian package mosquitto)")
    passwords = tmp_path / "passwords"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "line7", "s3cret"], check=True)
    broker = Mosquitto(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {passwords}\n")
    broker.start()
    try:
        monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
        monkeypatch.setenv("PL_MQTT_PASSWORD", "wrong")
        for protocol in ("5", "3.1.1"):
            sink = start_sink(open_sinks, broker.port, tmp_path / "state", username="line7",
                              password_credential="PL_MQTT_PASSWORD", protocol=protocol, client_id=f"bad-{protocol}")
            assert not sink.wait_connected(5)
            assert sink.fatal_error and "refused the connection" in sink.fatal_error
            assert "Not authorized" in sink.fatal_error or "Bad user name or password" in sink.fatal_error
        time.sleep(2.5)  # paho would have retried after 1 s
        assert broker.log.read_text().count("Sending CONNACK") == 2  # one attempt per sink

        credentials = tmp_path / "credentials"
        credentials.mkdir()
        (credentials / "PL_MQTT_PASSWORD").write_text("s3cret\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
        good = start_sink(open_sinks, broker.port, tmp_path / "state", username="line7",
                          password_credential="PL_MQTT_PASSWORD")
        assert good.wait_connected(5) and good.fatal_error is None

        missing = MqttSink(MqttConfig(port=broker.port, username="line7", password_credential="PL_NOT_THERE"),
                           CAMERA, tmp_path)
        with pytest.raises(ConfigError, match="PL_NOT_THERE"):
            missing.start()
    finally:
        broker.stop()


NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # EC: instant, unlike RSA


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _openssl("req", "-x509", *NEW_KEY, "-days", "2", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert))
    return key, cert


def _make_cert(folder: Path, name: str, ca: tuple[Path, Path], san: str | None = None) -> tuple[Path, Path]:
    key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
    _openssl("req", *NEW_KEY, "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))
    extra = []
    if san:
        (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        extra = ["-extfile", str(folder / f"{name}.ext")]
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[1]), "-CAkey", str(ca[0]), "-CAcreateserial",
             "-days", "2", "-out", str(cert), *extra)
    return key, cert


def test_tls_with_client_certificate(tmp_path: Path, open_sinks) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl not installed: cannot make test certificates")
    ca = _make_ca(tmp_path, "line-ca")
    server = _make_cert(tmp_path, "broker", ca, san="IP:127.0.0.1,DNS:localhost")
    client = _make_cert(tmp_path, "camera", ca)
    broker = Mosquitto(tmp_path, extra_conf=f"cafile {ca[1]}\ncertfile {server[1]}\nkeyfile {server[0]}\n"
                                            "require_certificate true\n")
    broker.start()
    try:
        tls = TlsConfig(ca_file=str(ca[1]), cert_file=str(client[1]), key_file=str(client[0]))
        sink = start_sink(open_sinks, broker.port, tmp_path / "state", tls=tls)
        assert sink.wait_connected(10), sink.fatal_error
        sink.publish_verdict(sample_verdict(1))
        deadline = time.monotonic() + 5
        while sink.delivery.delivered < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.delivery.delivered == 1  # PUBACK received over TLS

        other_ca = _make_ca(tmp_path, "other-ca")
        untrusting = start_sink(open_sinks, broker.port, tmp_path / "state2", client_id="untrusting",
                                tls=tls.model_copy(update={"ca_file": str(other_ca[1])}))
        assert not untrusting.wait_connected(10)
        assert "not trusted" in untrusting.fatal_error and "other-ca.crt" in untrusting.fatal_error

        with pytest.raises(MqttError, match="ca_file.*does not exist"):
            missing_ca = MqttConfig(port=broker.port, tls=TlsConfig(ca_file=str(tmp_path / "nope.crt")))
            MqttSink(missing_ca, CAMERA, tmp_path).start()
    finally:
        broker.stop()


def test_seq_counter_numbers_on_a_full_disk_and_hands_out_nothing_it_cannot_record(
        small_disk, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a real filesystem filled to 100 %: the record is rewritten in place (no new block), so numbering and
    the synced reservations go on; a counter whose file cannot even be created raises and hands out nothing."""
    monkeypatch.setattr(verdict_module, "RESERVE", 3)
    disk = small_disk(1)
    counter = SeqCounter(disk / "cam1.seq")
    assert [counter.next() for _ in range(2)] == [1, 2]
    hog = fill(disk)
    assert [counter.next() for _ in range(10)] == list(range(3, 13))  # three reservations raised and synced
    assert SeqCounter(disk / "cam1.seq").next() == 13  # a restart on the full disk: no repeat, no gap
    fresh = SeqCounter(disk / "cam2.seq")  # a camera whose counter was never written
    for _ in range(2):
        with pytest.raises(OSError) as err:
            fresh.next()
        assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in disk.iterdir()) == ["cam1.seq", hog.name]  # no temp file holds space
    hog.unlink()
    assert fresh.next() == 1  # space is back: numbering starts, nothing was skipped or repeated


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_a_retained_trigger_is_answered_on_error_at_every_start_and_never_inspected(
        mosquitto: Mosquitto, tmp_path: Path, open_sinks, protocol: str) -> None:
    """A PLC published its trigger with -r once: the broker replays it to every new subscription."""
    plc = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    plc.connect("127.0.0.1", mosquitto.port)
    plc.loop_start()
    plc.publish(TOPICS.trigger, json.dumps({"part_id": "OLD-1"}), qos=1, retain=True).wait_for_publish(5)
    listener = Listener(mosquitto.port, [TOPICS.error])
    for start in range(2):  # two starts of the daemon: each is told, neither inspects
        triggers: queue.Queue[Trigger] = queue.Queue()
        sink = start_sink(open_sinks, mosquitto.port, tmp_path / "state", on_trigger=triggers.put, protocol=protocol)
        assert sink.wait_connected(5)
        assert listener.wait(lambda ms, n=start + 1: len(ms) == n)
        plc.publish(TOPICS.trigger, "LIVE-1", qos=1).wait_for_publish(5)  # a live trigger still goes through
        assert triggers.get(timeout=5).part_id == "LIVE-1" and triggers.empty()
        sink.stop(flush_timeout=1)
    plc.loop_stop()
    plc.disconnect()
    listener.close()
    errors = [json.loads(payload) for payload in listener.on(TOPICS.error)]
    assert len(errors) == 2
    for error in errors:
        assert error["error"] == "retained_trigger" and error["part_id"] == "OLD-1"
        assert f"mosquitto_pub -r -n -t {TOPICS.trigger}" in error["detail"]


def test_announcing_the_model_while_verdicts_are_acknowledged_never_deadlocks(mosquitto: Mosquitto,
                                                                             tmp_path: Path) -> None:
    """paho's network thread holds its message lock while the sink's PUBACK callback waits for the sink's lock; a
    model announced under the sink's lock (paho then takes its message lock) deadlocked the two: a daemon hung at
    its start, between a camera's connection and its first frame."""
    sink = MqttSink(MqttConfig(port=mosquitto.port), CAMERA, tmp_path / "state")
    sink.start()
    assert sink.wait_connected(5)
    announced, published = threading.Event(), threading.Event()

    def announce() -> None:
        for n in range(2000):
            sink.publish_model({"model_id": f"m{n}"})
        announced.set()

    def verdicts() -> None:
        for seq in range(1, 501):
            sink.publish_verdict(sample_verdict(seq))
        published.set()

    for work in (announce, verdicts):
        threading.Thread(target=work, daemon=True).start()
    if not (announced.wait(60) and published.wait(10)):
        # A deadlocked sink cannot be stopped (stop takes the same lock): its threads are left, as daemon threads.
        pytest.fail("publish_model deadlocked with the PUBACK callback")
    deadline = time.monotonic() + 30
    while sink.delivery.delivered < 500 and time.monotonic() < deadline:
        time.sleep(0.05)
    sink.stop(flush_timeout=1)
    assert sink.delivery.delivered == 500
