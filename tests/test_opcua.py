"""The OPC UA output against a real asyncua client: security and users, the ResultReady event, the result
variables, the Trigger method and its malformed arguments, a client that vanishes, node ids across restarts."""

from __future__ import annotations

import asyncio
import datetime
import json
import signal
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

asyncua = pytest.importorskip("asyncua")
from asyncua import Client, ua  # noqa: E402
from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256  # noqa: E402
from asyncua.ua.uaerrors import UaError, UaStatusCodeError  # noqa: E402

from patchline.runtime.config import ConfigError, LineConfig  # noqa: E402
from patchline.runtime.sinks.opcua.certificates import self_signed  # noqa: E402
from patchline.runtime.sinks.opcua.config import OpcUaConfig  # noqa: E402
from patchline.runtime.sinks.opcua.server import OpcUaOutput  # noqa: E402
from patchline.runtime.tools.broker import free_port  # noqa: E402
from patchline.runtime.tools.sample_verdict import sample_verdict  # noqa: E402
from patchline.runtime.triggers import Trigger  # noqa: E402
from tests.conftest import needs_gstreamer  # noqa: E402
from tests.test_daemon import CAMERA, LIVE, Subscriber, finish, run_config, start_daemon  # noqa: E402

USER, PASSWORD, CREDENTIAL = "plc", "correct horse", "PATCHLINE_TEST_OPCUA_PASSWORD"
NAMESPACE = "urn:patchline:opcua"
CLIENT_URI = "urn:patchline:test-client"
TIMEOUT = 30.0


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("certs")
    server = self_signed(folder, "server", "urn:patchline:server", server=True)
    client = self_signed(folder, "client", CLIENT_URI, server=False)
    return SimpleNamespace(server_cert=server[0], server_key=server[1], client_cert=client[0], client_key=client[1])


class Line:
    """An OpcUaOutput with a sink per camera, its triggers recorded, as the daemon drives it."""

    def __init__(self, config: OpcUaConfig, cameras: tuple[str, ...]) -> None:
        self.output = OpcUaOutput(config, LineConfig.model_construct(line="line1"))
        self.triggers: dict[str, list[Trigger]] = {camera: [] for camera in cameras}
        self.sinks = {camera: self.output.sink(camera, self.triggers[camera].append, lambda *a: None, None)
                      for camera in cameras}

    def start(self) -> Line:
        self.output.start()
        for sink in self.sinks.values():
            sink.start()
        return self

    def close(self) -> None:
        for sink in self.sinks.values():
            sink.stop(5.0, "stopped")
        self.output.close("stopped")


@pytest.fixture()
def line(certs, monkeypatch) -> Iterator[Callable[..., Line]]:
    monkeypatch.setenv(CREDENTIAL, PASSWORD)
    made: list[Line] = []

    def make(cameras: tuple[str, ...] = ("cam1", "cam2"), port: int | None = None, **fields) -> Line:
        settings = {"host": "127.0.0.1", "port": port or free_port(), "certificate": str(certs.server_cert),
                    "private_key": str(certs.server_key), "username": USER, "password_credential": CREDENTIAL,
                    **fields}
        made.append(Line(OpcUaConfig(**settings), cameras))
        return made[-1].start()

    yield make
    for each in made:
        each.close()


async def connect(port: int, certs: SimpleNamespace, user: str | None = USER, password: str = PASSWORD,
                  mode: ua.MessageSecurityMode = ua.MessageSecurityMode.SignAndEncrypt) -> Client:
    client = Client(f"opc.tcp://127.0.0.1:{port}", timeout=TIMEOUT)
    client.application_uri = CLIENT_URI
    if mode != ua.MessageSecurityMode.None_:
        await client.set_security(SecurityPolicyBasic256Sha256, str(certs.client_cert), str(certs.client_key),
                                  server_certificate=str(certs.server_cert), mode=mode)
    if user is not None:
        client.set_user(user)
        client.set_password(password)
    await client.connect()
    return client


async def node(client: Client, path: str):
    ns = await client.get_namespace_index(NAMESPACE)
    return client.get_node(ua.NodeId(path, ns))


class Events:
    """A subscription handler: the ResultReady events as they come."""

    def __init__(self) -> None:
        self.events: list = []

    def event_notification(self, event) -> None:
        self.events.append(event)

    async def wait(self, count: int) -> list:
        deadline = time.monotonic() + TIMEOUT
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.events) >= count, f"{len(self.events)} of {count} events arrived"
        return self.events


async def subscribe(client: Client, camera: str) -> Events:
    handler = Events()
    subscription = await client.create_subscription(50, handler)
    await subscription.subscribe_events(await node(client, camera), await node(client, "ResultReadyEventType"))
    return handler


async def wait_value(client: Client, path: str, expected: object) -> None:
    variable = await node(client, path)
    deadline = time.monotonic() + TIMEOUT
    value = None
    while time.monotonic() < deadline:
        value = await variable.read_value()
        if value == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} is {value!r}, not {expected!r}")


def test_sign_and_encrypt_login_events_in_seq_order_and_result_variables(line, certs):
    plc = line()

    async def scenario() -> None:
        client = await connect(plc.output.config.port, certs)
        try:
            handler = await subscribe(client, "cam1")
            verdicts = [sample_verdict(seq, part_id=f"P{seq}") for seq in range(1, 6)]
            for verdict in verdicts:
                plc.sinks["cam1"].publish_verdict(verdict)
            events = await handler.wait(5)
            assert [e.Seq for e in events] == [1, 2, 3, 4, 5]
            for event, verdict in zip(events, verdicts):
                assert (event.Camera, event.ResultId, event.PartId, event.ProductId) == (
                    "cam1", f"cam1-{verdict['seq']}", verdict["part_id"], "test-model")
                assert (event.Verdict, event.Pass, event.ResultState) == (verdict["verdict"],
                                                                          verdict["verdict"] == "OK", 1)
                assert event.Score == pytest.approx(verdict["score"])
                assert event.NormalisedScore == pytest.approx(verdict["normalised_score"])
                assert (event.LocationX, event.LocationY) == (verdict["location"]["x"], verdict["location"]["y"])
                assert event.ProcessingDuration == pytest.approx(9.0)
                assert json.loads(event.Json) == verdict
            last = verdicts[-1]
            await wait_value(client, "cam1/Result/Seq", 5)
            assert await (await node(client, "cam1/Result/PartId")).read_value() == "P5"
            assert await (await node(client, "cam1/Result/Verdict")).read_value() == last["verdict"]
            created = await (await node(client, "cam1/Result/CreationTime")).read_value()
            expected = datetime.datetime.fromisoformat(last["timestamp"].replace("Z", "+00:00"))
            assert abs(created.replace(tzinfo=datetime.timezone.utc) - expected) < datetime.timedelta(milliseconds=1)
            assert await (await node(client, "cam1/Counters/NgCount")).read_value() == 3
            assert await (await node(client, "cam1/Counters/OkCount")).read_value() == 2
            assert await (await node(client, "cam2/Counters/NgCount")).read_value() == 0  # cameras do not mix
            assert await (await node(client, "cam1/State")).read_value() == "Ready"
            plc.sinks["cam1"].publish_model({"model_id": "m2", "artifact": "/a", "artifact_checksum": "cd" * 32,
                                             "threshold": 1.5, "since": "2026-01-02T03:04:05.678Z"})
            await wait_value(client, "cam1/Model/ModelId", "m2")
            assert await (await node(client, "cam1/Model/Threshold")).read_value() == 1.5
        finally:
            await client.disconnect()

    asyncio.run(scenario())


def test_wrong_password_anonymous_and_unencrypted_clients_are_refused(line, certs):
    plc = line(security_policies=("Basic256Sha256_SignAndEncrypt",))
    port = plc.output.config.port

    async def refused(code: int | None, **kwargs) -> None:
        with pytest.raises(UaError) as error:
            client = await connect(port, certs, **kwargs)
            await client.disconnect()
        if code is not None:
            assert isinstance(error.value, UaStatusCodeError) and error.value.code == code, error.value
        else:  # the server offers no such endpoint: the client finds none to connect to
            assert "No matching endpoints" in str(error.value)

    async def scenario() -> None:
        await refused(ua.StatusCodes.BadUserAccessDenied, password="wrong")
        await refused(ua.StatusCodes.BadIdentityTokenRejected, user=None)
        await refused(None, mode=ua.MessageSecurityMode.None_)
        client = await connect(port, certs)  # and the server still serves
        assert await (await node(client, "cam1/State")).read_value() == "Ready"
        await client.disconnect()

    asyncio.run(scenario())
    assert plc.output.refused_logins == 1


def test_anonymous_over_none_only_when_insecure_is_allowed(line, certs):
    with pytest.raises(ValueError, match="allow_insecure"):
        OpcUaConfig(security_policies=("None",))
    with pytest.raises(ValueError, match="anonymous"):
        OpcUaConfig(certificate="c", private_key="k")
    plc = line(security_policies=("None",), allow_insecure=True, username=None, password_credential=None,
               certificate=None, private_key=None)

    async def scenario() -> None:
        client = await connect(plc.output.config.port, certs, user=None, mode=ua.MessageSecurityMode.None_)
        assert await (await node(client, "cam2/State")).read_value() == "Ready"
        await client.disconnect()

    asyncio.run(scenario())


def test_trigger_hands_the_part_to_the_camera_and_bad_arguments_are_refused(line, certs):
    plc = line()

    async def scenario() -> None:
        client = await connect(plc.output.config.port, certs)
        try:
            camera = await node(client, "cam1")
            trigger = await node(client, "cam1/Trigger")
            handler = await subscribe(client, "cam1")
            assert await camera.call_method(trigger, "part-42") is None
            assert [t.part_id for t in plc.triggers["cam1"]] == ["part-42"]
            bad = [ua.Variant("", ua.VariantType.String), ua.Variant("x" * 129, ua.VariantType.String),
                   ua.Variant("a\nb", ua.VariantType.String), ua.Variant(1.5, ua.VariantType.Double),
                   ua.Variant(True, ua.VariantType.Boolean), ua.Variant(["a"], ua.VariantType.String)]
            for argument in bad:
                with pytest.raises(UaStatusCodeError) as refused:
                    await camera.call_method(trigger, argument)
                assert refused.value.code == ua.StatusCodes.BadInvalidArgument, argument
            request = ua.CallMethodRequest(ObjectId=camera.nodeid, MethodId=trigger.nodeid,
                                           InputArguments=[ua.Variant(3.0, ua.VariantType.Double)])
            result = (await client.uaclient.call([request]))[0]
            assert "part_id must be a string" in result.InputArgumentDiagnosticInfos[0].AdditionalInfo
            with pytest.raises(UaStatusCodeError) as missing:
                await camera.call_method(trigger)
            assert missing.value.code == ua.StatusCodes.BadArgumentsMissing
            assert [t.part_id for t in plc.triggers["cam1"]] == ["part-42"]
            assert plc.sinks["cam1"].rejected == len(bad) + 2
            # The camera answers later: a verdict for this trigger, or an error in LastError.
            answered = plc.triggers["cam1"][0]
            plc.sinks["cam1"].publish_verdict(sample_verdict(7, part_id="part-42"), answered)
            event = (await handler.wait(1))[0]
            assert (event.PartId, event.Seq) == ("part-42", 7)
            assert "answering Trigger('part-42')" in event.Message.Text
            await camera.call_method(trigger, "part-43")
            plc.sinks["cam1"].publish_error({"error": "no_frame", "detail": "none came", "part_id": "part-43"},
                                            plc.triggers["cam1"][1])
            await wait_value(client, "cam1/Counters/ErrorCount", 1)
            error = json.loads(await (await node(client, "cam1/LastError")).read_value())
            assert (error["error"], error["part_id"], error["opcua_trigger"]) == ("no_frame", "part-43", True)
        finally:
            await client.disconnect()

    asyncio.run(scenario())


def test_a_client_that_vanishes_does_not_disturb_the_others(line, certs):
    plc = line()
    port = plc.output.config.port

    async def scenario() -> None:
        steady = await connect(port, certs)
        handler = await subscribe(steady, "cam2")
        doomed = await connect(port, certs)
        await subscribe(doomed, "cam2")
        doomed.uaclient.protocol.transport.abort()  # the socket closed under it: no CloseSession, no goodbye
        for seq in range(1, 4):
            plc.sinks["cam2"].publish_verdict(sample_verdict(seq, camera="cam2"))
        assert [e.Seq for e in await handler.wait(3)] == [1, 2, 3]
        again = await connect(port, certs)  # new clients still get in
        assert await (await node(again, "cam2/Result/Seq")).read_value() == 3
        await again.disconnect()
        await steady.disconnect()

    asyncio.run(scenario())


def test_node_ids_are_the_same_after_a_restart_and_a_busy_port_is_a_config_error(line, certs):
    port = free_port()

    async def browse(port: int) -> list[str]:
        client = await connect(port, certs)
        try:
            found = []
            stack = [await node(client, "Patchline")]
            while stack:
                current = stack.pop()
                found.append(current.nodeid.to_string())
                stack.extend(await current.get_children())
            return sorted(found)
        finally:
            await client.disconnect()

    first = line(cameras=("cam2", "cam1"), port=port)
    before = asyncio.run(browse(port))
    with pytest.raises(ConfigError, match="in use"):
        Line(first.output.config, ("cam1",)).start()
    first.close()
    after = asyncio.run(browse(line(cameras=("cam1", "cam2"), port=port).output.config.port))
    assert before == after
    assert "ns=2;s=cam1/Result/ResultState" in after and "ns=2;s=cam2/Trigger" in after


def test_an_unloadable_certificate_is_a_config_error(line, certs, tmp_path):
    broken = tmp_path / "broken.der"
    broken.write_bytes(b"not a certificate")
    with pytest.raises(ConfigError, match="certificate .*broken.der does not load"):
        line(certificate=str(broken))


@needs_gstreamer
def test_the_daemon_answers_an_opcua_trigger_with_the_verdict_mqtt_publishes(tmp_path, mosquitto, small_artifact,
                                                                            certs):
    port = free_port()
    opcua = {"host": "127.0.0.1", "port": port, "certificate": str(certs.server_cert),
             "private_key": str(certs.server_key), "username": USER, "password_credential": CREDENTIAL}
    config = run_config(tmp_path, small_artifact, mosquitto.port, {"kind": "gstreamer", "pipeline": LIVE},
                        threshold=1.0, mode="trigger", evidence={"enabled": False}, opcua=opcua)
    subscriber = Subscriber(mosquitto.port)
    process = start_daemon(config, env={CREDENTIAL: PASSWORD})

    async def until(predicate: Callable[[], object], what: str) -> None:
        deadline = time.monotonic() + 60
        while not predicate():
            assert time.monotonic() < deadline and process.poll() is None, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def scenario() -> list:
        await until(lambda: subscriber.on("available"), "the daemon")  # the OPC UA server listens before MQTT
        client = await connect(port, certs)
        try:
            handler = await subscribe(client, CAMERA)
            camera, trigger = await node(client, CAMERA), await node(client, f"{CAMERA}/Trigger")
            await camera.call_method(trigger, "P-OPC-1")
            await until(lambda: len(subscriber.verdicts()) == 1, "the first verdict")
            with pytest.raises(UaStatusCodeError) as refused:
                await camera.call_method(trigger, "")
            assert refused.value.code == ua.StatusCodes.BadInvalidArgument
            subscriber.client.publish(f"patchline/{CAMERA}/trigger", "P-MQTT-2", qos=1).wait_for_publish(5)
            await until(lambda: len(subscriber.verdicts()) == 2, "the second verdict")
            return await handler.wait(2)
        finally:
            await client.disconnect()

    try:
        events = asyncio.run(scenario())
    finally:
        process.send_signal(signal.SIGTERM)
        code, output = finish(process, 60)
        subscriber.close()
        print(output)  # shown when the test fails
    assert code == 0, output
    mqtt = subscriber.verdicts()
    assert [(e.Seq, e.PartId, e.Verdict, e.Score) for e in events] == [
        (v["seq"], v["part_id"], v["verdict"], pytest.approx(v["score"])) for v in mqtt]
    assert [v["part_id"] for v in mqtt] == ["P-OPC-1", "P-MQTT-2"]
    assert "answering Trigger('P-OPC-1')" in events[0].Message.Text and "answering" not in events[1].Message.Text
    assert [json.loads(e.Json) for e in events] == mqtt
