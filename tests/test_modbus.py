"""The Modbus TCP output against a real pymodbus client acting as the PLC, on a free loopback port; a fake camera
in the test answers triggers from its own thread, as the daemon's camera does. One end-to-end test runs the daemon.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusTcpClient

from patchline.runtime.config import ConfigError, LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.modbus import registers as r
from patchline.runtime.sinks.modbus.config import ModbusConfig
from patchline.runtime.sinks.modbus.server import ModbusOutput, ModbusSink
from patchline.runtime.tools.broker import free_port
from patchline.runtime.tools.sample_verdict import sample_verdict
from patchline.runtime.triggers import Trigger
from tests.conftest import needs_gstreamer
from tests.test_daemon import LIVE, run_config, running, subscriber  # noqa: F401 (a fixture)

README = Path(__file__).resolve().parents[1] / "README.md"
TIMEOUT = 20.0  # generous: a loaded 2-core machine


def line(*cameras: str) -> LineConfig:
    return LineConfig.model_validate({"line": "l1", "cameras": [
        {"camera": name, "artifact": "/nonexistent", "source": {"kind": "folder", "path": "/tmp"}, "mode": "trigger"}
        for name in cameras]})


def wait_until(predicate: Callable[[], object], timeout: float = TIMEOUT, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


class FakeCamera:
    """Answers each trigger from its own thread, as the camera's loop does: a verdict (seq counting up), or the
    error ``error`` when set; ``hold`` keeps the answers back until released."""

    def __init__(self) -> None:
        self.sink: ModbusSink | None = None
        self.triggers: list[Trigger] = []
        self.verdicts: list[dict] = []
        self.error: str | None = None
        self.hold = threading.Event()
        self.hold.set()
        self._threads: list[threading.Thread] = []

    def on_trigger(self, trigger: Trigger) -> None:
        self.triggers.append(trigger)
        thread = threading.Thread(target=self._answer, args=(trigger,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _answer(self, trigger: Trigger) -> None:
        self.hold.wait(TIMEOUT)
        if self.error:
            self.sink.publish_error({"error": self.error, "detail": "test", "part_id": trigger.part_id}, trigger)
            return
        verdict = sample_verdict(len(self.verdicts) + 1, part_id=trigger.part_id)
        self.verdicts.append(verdict)
        self.sink.publish_verdict(verdict, trigger)


@pytest.fixture()
def served() -> Iterator[tuple[ModbusOutput, dict[str, FakeCamera], int]]:
    """An output for a line of two cameras (unit ids 1 and 2), started, each sink with its fake camera."""
    port = free_port()
    output = ModbusOutput(ModbusConfig(port=port, heartbeat_s=0.1), line("cam1", "cam2"))
    cameras = {}
    for name in ("cam1", "cam2"):
        camera = FakeCamera()
        camera.sink = output.sink(name, camera.on_trigger, lambda name, payload: None, DiskWrites())
        cameras[name] = camera
    output.start()
    for camera in cameras.values():
        camera.sink.start()
        camera.sink.publish_model({"model_id": "test-model", "artifact_checksum": "ab" * 32})
    yield output, cameras, port
    for camera in cameras.values():
        camera.hold.set()
        camera.sink.stop(5.0, "stopped")
    output.close("stopped")


@pytest.fixture()
def plc(served) -> Iterator[ModbusTcpClient]:
    client = ModbusTcpClient("127.0.0.1", port=served[2], timeout=5)
    assert client.connect()
    yield client
    client.close()


def read(client: ModbusTcpClient, address: int, count: int = 1, unit: int = 1) -> list[int]:
    response = client.read_holding_registers(address, count=count, device_id=unit)
    assert not response.isError(), response
    return response.registers


def result(client: ModbusTcpClient, base: int, unit: int = 1) -> dict:
    words = read(client, base, r.RESULT_REGISTERS, unit)
    return {"error": words[r.R_ERROR], "ok": words[r.R_OK], "ng": words[r.R_NG],
            "seq": r.decode_u32(words[r.R_SEQ:r.R_SEQ + 2]), "part_id": r.decode_u32(words[r.R_PART_ID:r.R_PART_ID + 2]),
            "score": r.decode_i32(words[r.R_SCORE:r.R_SCORE + 2]),
            "normalised": r.decode_i32(words[r.R_NORMALISED:r.R_NORMALISED + 2]),
            "threshold": r.decode_i32(words[r.R_THRESHOLD:r.R_THRESHOLD + 2]), "x": words[r.R_X], "y": words[r.R_Y],
            "model_hash": r.decode_u32(words[r.R_MODEL_HASH:r.R_MODEL_HASH + 2])}


def trigger(client: ModbusTcpClient, part_id: int, unit: int = 1) -> None:
    """Part id and trigger in one request, as a PLC writes its output block."""
    response = client.write_registers(r.TRIGGER, [1, *r.u32(part_id)], device_id=unit)
    assert not response.isError(), response


def flag(client: ModbusTcpClient, address: int, unit: int = 1) -> int:
    return read(client, address, 1, unit)[0]


def expected(verdict: dict) -> dict:
    return {"error": 0, "ok": int(verdict["verdict"] == "OK"), "ng": int(verdict["verdict"] == "NG"),
            "seq": verdict["seq"], "part_id": int(verdict["part_id"] or 0), "score": round(verdict["score"] * 1000),
            "normalised": r.NONE if verdict["normalised_score"] is None else round(verdict["normalised_score"] * 1000),
            "threshold": round(verdict["threshold"] * 1000), "x": verdict["location"]["x"], "y": verdict["location"]["y"],
            "model_hash": int(verdict["artifact_checksum"][:8], 16)}


def held_trigger(plc: ModbusTcpClient, camera: FakeCamera, part_id: int) -> None:
    """A trigger the camera has, and holds its answer to until ``camera.hold`` is set."""
    camera.hold.clear()
    trigger(plc, part_id)
    wait_until(lambda: camera.triggers, what="the trigger at the camera")


def test_full_handshake_part_id_in_results_before_done_then_clear(served, plc):
    cameras = served[1]
    camera = cameras["cam1"]
    held_trigger(plc, camera, 4000123)
    assert camera.triggers[0].part_id == "4000123"
    assert (flag(plc, r.BUSY), flag(plc, r.DONE)) == (1, 0)
    camera.hold.set()
    wait_until(lambda: flag(plc, r.DONE), what="done")
    assert flag(plc, r.BUSY) == 0
    verdict = camera.verdicts[0]
    assert result(plc, r.TRIGGER_RESULT) == expected(verdict) == result(plc, r.LATEST_RESULT)
    assert verdict["verdict"] == "NG" and plc.read_coils(16 * (r.TRIGGER_RESULT + r.R_NG), count=1).bits[0]
    assert plc.write_register(r.TRIGGER, 0).isError() is False
    assert flag(plc, r.DONE) == 0
    assert result(plc, r.TRIGGER_RESULT)["seq"] == verdict["seq"]  # the result stays until the next trigger
    # a second handshake, the trigger by coil this time; the other camera's unit saw none of it
    plc.write_register(r.PART_ID + 1, 7)
    assert not plc.write_coil(16 * r.TRIGGER, True).isError()
    wait_until(lambda: flag(plc, r.DONE), what="the second done")
    assert result(plc, r.TRIGGER_RESULT) == expected(camera.verdicts[1])
    assert camera.verdicts[1]["part_id"] == str((4000123 >> 16 << 16) | 7)
    assert cameras["cam2"].triggers == [] and result(plc, r.LATEST_RESULT, unit=2)["seq"] == 0
    assert r.decode_ascii(read(plc, r.MODEL_ID, r.MODEL_ID_REGISTERS)) == "test-model"
    assert r.decode_u32(read(plc, r.MODEL_HASH, 2)) == 0xABABABAB and flag(plc, r.CAMERA_STATE) == r.STATE_ONLINE


def test_a_trigger_while_an_answer_is_owed_is_refused_with_done(served, plc):
    camera = served[1]["cam1"]
    held_trigger(plc, camera, 11)
    rewrite = plc.write_registers(r.TRIGGER, [1, *r.u32(11)])  # a PLC writing its output image every cycle
    assert not rewrite.isError() and flag(plc, r.DONE) == 0 and len(camera.triggers) == 1
    plc.write_register(r.TRIGGER, 0)  # cleared early, then set again: the first answer is still owed
    trigger(plc, 12)
    assert flag(plc, r.DONE) == 1 and flag(plc, r.BUSY) == 1
    refused = result(plc, r.TRIGGER_RESULT)
    assert (refused["error"], refused["part_id"], refused["ok"], refused["ng"]) == (r.ERRORS["concurrent_trigger"],
                                                                                  12, 0, 0)
    assert len(camera.triggers) == 1
    camera.hold.set()
    wait_until(lambda: flag(plc, r.BUSY) == 0, what="the first answer")
    assert result(plc, r.LATEST_RESULT)["seq"] == camera.verdicts[0]["seq"]
    assert result(plc, r.TRIGGER_RESULT) == refused  # what the PLC is acknowledging stays as it was
    plc.write_register(r.TRIGGER, 0)
    trigger(plc, 13)
    wait_until(lambda: flag(plc, r.DONE), what="done after the refusal")
    assert result(plc, r.TRIGGER_RESULT) == expected(camera.verdicts[1])
    assert metrics(camera.sink)["patchline_modbus_triggers_refused_total"] == 1


def test_the_cameras_error_for_its_trigger_ends_the_handshake_with_its_code(served, plc):
    camera = served[1]["cam1"]
    camera.error = "no_frame"
    trigger(plc, 99)
    wait_until(lambda: flag(plc, r.DONE), what="done")
    answer = result(plc, r.TRIGGER_RESULT)
    assert (answer["error"], answer["ok"], answer["ng"], answer["part_id"]) == (r.ERRORS["no_frame"], 0, 0, 99)
    assert answer["score"] == r.NONE
    # an error for someone else's trigger (another protocol's) leaves the registers alone
    plc.write_register(r.TRIGGER, 0)
    camera.sink.publish_error({"error": "model_busy", "detail": "x", "part_id": "5"}, Trigger("5", time.time()))
    camera.sink.stop(5.0, "stopped")
    assert result(plc, r.TRIGGER_RESULT) == answer and flag(plc, r.CAMERA_STATE) == r.STATE_STOPPED
    trigger(plc, 100)  # the camera has stopped: answered at once
    assert flag(plc, r.DONE) == 1 and result(plc, r.TRIGGER_RESULT)["error"] == r.ERRORS["stopping"]


def test_out_of_range_writes_are_refused_and_the_server_goes_on(served, plc):
    camera = served[1]["cam1"]
    refusals = [
        (plc.write_register(r.TRIGGER, 7), 3, "out_of_range"),  # ILLEGAL_DATA_VALUE
        (plc.write_register(r.TRIGGER_RESULT + r.R_OK, 1), 2, "read_only"),  # ILLEGAL_DATA_ADDRESS
        (plc.write_registers(r.PART_ID, [0, 5, 1]), 2, "read_only"),  # runs past the part id
        (plc.write_registers(r.TRIGGER, [1, 0, 0]), 3, "invalid_part_id"),
        (plc.write_coil(16 * r.DONE, False), 2, "read_only"),
    ]
    for response, exception, code in refusals:
        assert response.isError() and response.exception_code == exception, (code, response)
    assert flag(plc, r.WRITE_ERROR) == r.ERRORS["read_only"] and flag(plc, r.WRITES_REFUSED) == len(refusals)
    assert read(plc, r.TRIGGER, 3) == [0, 0, 0] and camera.triggers == []
    assert plc.read_holding_registers(r.REGISTERS, count=1).isError()  # beyond the map
    unknown = plc.read_holding_registers(r.BUSY, count=1, device_id=9)
    assert unknown.isError() and unknown.exception_code == 0x0B  # gateway target failed to respond
    with socket.create_connection(("127.0.0.1", served[2])) as raw:  # not Modbus at all: no answer, no harm
        raw.sendall(b"GET / HTTP/1.1\r\nHost: plc\r\n\r\n")
    with socket.create_connection(("127.0.0.1", served[2]), timeout=TIMEOUT) as raw:  # a function it lacks
        raw.sendall(bytes([0, 9, 0, 0, 0, 2, 1, 0x41]))
        answer = raw.recv(100)
        assert answer[:2] == bytes([0, 9]) and answer[7] & 0x80 and answer[8] == 1  # exception 01, illegal function
    trigger(plc, 5)  # and the server, and the camera, go on
    wait_until(lambda: flag(plc, r.DONE), what="done after the refusals")
    assert result(plc, r.TRIGGER_RESULT)["seq"] == camera.verdicts[0]["seq"]
    assert metrics(camera.sink)["patchline_modbus_writes_refused_total"] == len(refusals)


def test_a_client_that_vanishes_mid_handshake_reconnects_and_finds_its_result(served):
    output, cameras, port = served
    camera = cameras["cam2"]
    camera.hold.clear()
    raw = socket.create_connection(("127.0.0.1", port))
    # Modbus TCP by hand, as a PLC that drops off the network right after its request: write multiple registers
    # (0x10) at 0, 3 registers: trigger 1, part id 77; then the socket is gone without a goodbye.
    raw.sendall(bytes([0, 1, 0, 0, 0, 13, 2, 0x10, 0, 0, 0, 3, 6, 0, 1, 0, 0, 0, 77]))
    wait_until(lambda: camera.triggers, what="the trigger")
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    raw.close()
    camera.hold.set()
    wait_until(lambda: output.clients == 0, what="the server to notice the lost client")
    client = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
    assert client.connect()
    try:
        wait_until(lambda: flag(client, r.DONE, unit=2), what="done, seen by the new connection")
        assert result(client, r.TRIGGER_RESULT, unit=2) == expected(camera.verdicts[0])
        assert output.clients == 1
    finally:
        client.close()


def test_the_heartbeat_counts_while_the_camera_runs(served, plc):
    camera = served[1]["cam1"]
    first = flag(plc, r.HEARTBEAT)
    wait_until(lambda: flag(plc, r.HEARTBEAT) >= first + 3, what="three heartbeats")
    camera.sink.stop(5.0, "offline")
    stopped = flag(plc, r.HEARTBEAT)
    time.sleep(0.5)  # five heartbeat periods
    assert flag(plc, r.HEARTBEAT) == stopped and flag(plc, r.CAMERA_STATE) == r.STATE_OFFLINE


def test_continuous_verdicts_update_the_latest_result_not_the_handshake(served, plc):
    camera = served[1]["cam1"]
    for seq in range(1, 6):
        camera.sink.publish_verdict(sample_verdict(seq))
        wait_until(lambda: result(plc, r.LATEST_RESULT)["seq"] == seq, what=f"seq {seq}")
        assert result(plc, r.LATEST_RESULT) == expected(sample_verdict(seq))
    assert result(plc, r.TRIGGER_RESULT)["seq"] == 0 and flag(plc, r.DONE) == 0


def test_a_taken_port_refuses_the_start_with_a_clear_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        output = ModbusOutput(ModbusConfig(port=port), line("cam1"))
        output.sink("cam1", lambda trigger: None, lambda name, payload: None, DiskWrites())
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}.*in use"):
            output.start()


def test_unit_ids_name_every_camera_once():
    with pytest.raises(ConfigError, match="missing cam2"):
        ModbusOutput(ModbusConfig(unit_ids={"cam1": 3}), line("cam1", "cam2"))
    with pytest.raises(ValueError, match="own unit id"):
        ModbusConfig(unit_ids={"cam1": 3, "cam2": 3})
    with pytest.raises(ValueError, match="1..247"):
        ModbusConfig(unit_ids={"cam1": 0})
    assert ModbusOutput(ModbusConfig(), line("a", "b", "c")).units == {"a": 1, "b": 2, "c": 3}


def test_encodings():
    assert r.u32(0x12345678) == [0x1234, 0x5678] and r.decode_i32(r.i32(-1234)) == -1234
    assert r.scaled(1.2345) == 1234 and r.scaled(1.2355) == 1236 and r.scaled(1e12) == r.INT32_MAX
    assert r.scaled(-1e12) == -r.INT32_MAX and r.scaled(None) == r.NONE
    assert r.part_id_number("123") == 123 and r.part_id_number("A-1") == 0 and r.part_id_number(str(2**32)) == 0
    assert r.decode_ascii(r.ascii_registers("abc", 4)) == "abc" and len(r.ascii_registers("x" * 99, 4)) == 4


def test_the_readme_shows_the_register_map():
    assert r.markdown_table() in README.read_text()
    codes = re.findall(r"^\| (\d+) \| `(\w+)` \|", README.read_text(), re.MULTILINE)
    assert {name: int(code) for code, name in codes} == r.ERRORS


def test_the_readme_example_runs_a_handshake(served):
    port = served[2]
    code = re.search(r"Example, a PLC in Python.*?```python\n(.*?)```", README.read_text(), re.DOTALL).group(1)
    namespace: dict = {}
    exec(code.replace('"10.0.0.5", port=502', f'"127.0.0.1", port={port}'), namespace)
    namespace["plc"].close()
    verdict = served[1]["cam1"].verdicts[0]
    assert (namespace["seq"], namespace["score"], namespace["ng"]) == (verdict["seq"], round(verdict["score"] * 1000) / 1000,
                                                                       int(verdict["verdict"] == "NG"))
    assert verdict["part_id"] == "4711"


def metrics(sink: ModbusSink) -> dict[str, float]:
    """The sink's samples by name, each labelled with its camera."""
    samples = [s for family in sink.collect(sink.camera) for s in family.samples]
    assert all(s.labels == {"camera": sink.camera} for s in samples)
    return {s.name: s.value for s in samples}


@needs_gstreamer
def test_the_daemon_answers_a_plc_handshake_with_what_mqtt_published(tmp_path, mosquitto, subscriber, small_artifact):
    port = free_port()
    config = run_config(tmp_path, small_artifact, mosquitto.port, {"kind": "gstreamer", "pipeline": LIVE},
                        threshold=1.0, mode="trigger", evidence={"enabled": False}, modbus={"port": port})
    answers = []
    with running(config):
        subscriber.wait_for(lambda: subscriber.on("available") and subscriber.on("model"), timeout=90)
        plc = ModbusTcpClient("127.0.0.1", port=port, timeout=5)
        assert plc.connect()
        try:
            wait_until(lambda: flag(plc, r.CAMERA_STATE) == r.STATE_ONLINE, what="the camera online")
            model = json.loads(subscriber.on("model")[-1].payload)
            assert r.decode_ascii(read(plc, r.MODEL_ID, r.MODEL_ID_REGISTERS)) == model["model_id"][:32]
            for part_id in (501, 502):
                trigger(plc, part_id)
                wait_until(lambda: flag(plc, r.DONE), timeout=60, what=f"done for part {part_id}")
                answers.append(result(plc, r.TRIGGER_RESULT))
                plc.write_register(r.TRIGGER, 0)
                wait_until(lambda: flag(plc, r.DONE) == 0, what="done cleared")
            subscriber.wait_for(lambda: len(subscriber.verdicts()) == 2)
            assert result(plc, r.LATEST_RESULT) == answers[-1]
        finally:
            plc.close()
    published = subscriber.verdicts()
    assert [v["part_id"] for v in published] == ["501", "502"]
    assert answers == [expected(v) for v in published]
