"""Every protocol at once in one daemon: MQTT, OPC UA, Sparkplug B and Modbus TCP beside each other, a trigger
through each, and each protocol's client sees the same verdicts (same seq, part id, verdict, score)."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import pytest

pytest.importorskip("asyncua")
from pymodbus.client import ModbusTcpClient  # noqa: E402

from patchline.runtime.camera import EXIT_CONFIG  # noqa: E402
from patchline.runtime.config import ConfigError, LineConfig  # noqa: E402
from patchline.runtime.sinks import OUTPUTS, open_outputs  # noqa: E402
from patchline.runtime.sinks.modbus import registers as r  # noqa: E402
from patchline.runtime.sinks.sparkplug import payloads as sp  # noqa: E402
from patchline.runtime.tools.broker import free_port  # noqa: E402
from tests.conftest import needs_gstreamer  # noqa: E402
from tests.test_daemon import CAMERA, LIVE, Subscriber, finish, run_config, start_daemon  # noqa: E402
from tests.test_modbus import expected, flag, result, trigger  # noqa: E402
from tests.test_modbus import wait_until as modbus_wait  # noqa: E402
from tests.test_opcua import CREDENTIAL, PASSWORD, USER, certs, connect, node, subscribe  # noqa: E402, F401
from tests.test_sparkplug import GROUP, NODE, Host, command, metrics  # noqa: E402

TIMEOUT = 60.0


@needs_gstreamer
def test_one_daemon_speaks_every_protocol_and_each_sees_the_same_verdicts(tmp_path, mosquitto, small_artifact,
                                                                          certs):
    opcua_port, modbus_port = free_port(), free_port()
    config = run_config(
        tmp_path, small_artifact, mosquitto.port, {"kind": "gstreamer", "pipeline": LIVE}, threshold=1.0,
        mode="trigger", evidence={"enabled": False},
        opcua={"host": "127.0.0.1", "port": opcua_port, "certificate": str(certs.server_cert),
               "private_key": str(certs.server_key), "username": USER, "password_credential": CREDENTIAL},
        sparkplug={"group_id": GROUP, "edge_node_id": NODE},
        modbus={"port": modbus_port})
    subscriber = Subscriber(mosquitto.port)
    host = Host(mosquitto.port)
    process = start_daemon(config, env={CREDENTIAL: PASSWORD})

    def verdicts(count: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while len(subscriber.verdicts()) < count:
            assert time.monotonic() < deadline and process.poll() is None, f"timed out waiting for verdict {count}"
            time.sleep(0.05)

    def modbus_handshake(part_id: int) -> dict:
        plc = ModbusTcpClient("127.0.0.1", port=modbus_port, timeout=5)
        assert plc.connect()
        try:
            modbus_wait(lambda: flag(plc, r.CAMERA_STATE) == r.STATE_ONLINE, TIMEOUT, "the camera online on Modbus")
            trigger(plc, part_id)
            modbus_wait(lambda: flag(plc, r.DONE), TIMEOUT, "done")
            answer = result(plc, r.TRIGGER_RESULT)
            plc.write_register(r.TRIGGER, 0)
            return answer
        finally:
            plc.close()

    async def scenario() -> tuple[list, dict]:
        deadline = time.monotonic() + TIMEOUT
        while not subscriber.on("available"):  # every output is open once MQTT says online
            assert time.monotonic() < deadline and process.poll() is None, "the daemon did not come online"
            await asyncio.sleep(0.05)
        client = await connect(opcua_port, certs)
        try:
            events = await subscribe(client, CAMERA)
            camera = await node(client, CAMERA)
            await camera.call_method(await node(client, f"{CAMERA}/Trigger"), "P-OPC")
            await asyncio.to_thread(verdicts, 1)
            subscriber.client.publish(f"patchline/{CAMERA}/trigger", "P-MQTT", qos=1).wait_for_publish(5)
            await asyncio.to_thread(verdicts, 2)
            await asyncio.to_thread(host.wait, lambda: host.of("DBIRTH", CAMERA), TIMEOUT)
            host.command(f"spBv1.0/{GROUP}/DCMD/{NODE}/{CAMERA}", command(sp.TRIGGER, sp.STRING, "P-SPB"))
            await asyncio.to_thread(verdicts, 3)
            answer = await asyncio.to_thread(modbus_handshake, 504)
            await asyncio.to_thread(verdicts, 4)
            return await events.wait(4), answer
        finally:
            await client.disconnect()

    try:
        (events, modbus_answer) = asyncio.run(scenario())
        host.wait(lambda: len([m for m in map(metrics, host.of("DDATA", CAMERA)) if "Inspection/Seq" in m]) == 4,
                  TIMEOUT)
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 60)
        subscriber.close()
        host.close()
        print(output)  # shown when the test fails
    assert code == 0, output
    mqtt = subscriber.verdicts()
    assert [v["part_id"] for v in mqtt] == ["P-OPC", "P-MQTT", "P-SPB", "504"]
    assert [v["seq"] for v in mqtt] == [1, 2, 3, 4]
    seen = [(v["seq"], v["part_id"], v["verdict"], pytest.approx(v["score"])) for v in mqtt]
    assert [(e.Seq, e.PartId, e.Verdict, e.Score) for e in events] == seen
    assert [json.loads(e.Json) for e in events] == mqtt
    ddata = [m for m in map(metrics, host.of("DDATA", CAMERA)) if "Inspection/Seq" in m]
    assert [(m["Inspection/Seq"], m["Inspection/Part ID"], m["Inspection/Verdict"], m["Inspection/Score"])
            for m in ddata] == seen
    assert modbus_answer == expected(mqtt[3])


def test_an_output_that_cannot_open_refuses_the_start_and_the_others_close(tmp_path, mosquitto, small_artifact):
    """The Modbus port is taken: the line does not start (exit 78, the reason named), and the outputs that had
    started (OPC UA, Sparkplug B) close without waiting on cameras that never ran."""
    (tmp_path / "inbox").mkdir()
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = run_config(
            tmp_path, small_artifact, mosquitto.port, {"kind": "folder", "path": str(tmp_path / "inbox")},
            threshold=1.0,
            opcua={"host": "127.0.0.1", "port": free_port(), "allow_insecure": True,
                   "security_policies": ["None"]},
            sparkplug={"group_id": GROUP, "edge_node_id": NODE}, modbus={"port": port})
        started = time.monotonic()
        code, output = finish(start_daemon(config), 120)
    assert code == EXIT_CONFIG, output
    assert f"cannot start: modbus: cannot listen on 127.0.0.1:{port}" in output, output
    assert time.monotonic() - started < 60, output
    assert "Traceback" not in output and "did not apply" not in output, output


def test_a_protocol_whose_library_is_missing_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(OUTPUTS, "modbus", "patchline_no_such_module.server:ModbusOutput")
    line = LineConfig.model_validate({"line": "l1", "modbus": {}, "cameras": [
        {"camera": "c1", "artifact": "unused", "source": {"kind": "folder", "path": "unused"}}]})
    with pytest.raises(ConfigError, match=r"modbus: this output needs patchline_no_such_module, which is not "
                                          r"installed: pip install 'patchline\[modbus\]'"):
        open_outputs(line)
