"""``OpcUaOutput``: the line's OPC UA server (asyncua), each camera's results, model and state in it, and a
Trigger method per camera (address space: nodes.py).

Thread model: asyncua runs on the output's own thread, in its own event loop. A camera's thread hands its
verdicts, errors and model to its sink, which only schedules them on that loop (``call_soon_threadsafe``); one
task per camera applies them in order: the Result variables, the counters, then the ResultReady event. Trigger
calls run in the loop too, and hand each Trigger to the camera (``on_trigger``), which answers later with a
verdict (a ResultReady event with that PartId) or an error (``LastError``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from patchline.runtime.config import ConfigError, LineConfig
from patchline.runtime.credentials import read_credential
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.metrics import per_camera
from patchline.runtime.sinks.opcua.config import OpcUaConfig
from patchline.runtime.sinks.opcua.nodes import (COUNTERS, MODEL_FIELDS, RESULT_FIELDS, CameraNodes, Ids, camera_nodes,
                                                 event_type)
from patchline.runtime.throttled_log import ThrottledLog
from patchline.runtime.triggers import Trigger, check_part_id
from patchline.runtime.verdict import iso_utc

log = logging.getLogger(__name__)
# asyncua logs every node it builds and every request at INFO: the daemon's log would be nothing else.
logging.getLogger("asyncua").setLevel(logging.WARNING)

START_TIMEOUT_S = 60.0  # building the address space and binding, on a loaded edge box
MAX_QUEUE = 10000  # a camera's updates not yet applied; beyond that the server's loop is stuck: drop, count
POLICIES = {
    "Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
    "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "None": ua.SecurityPolicyType.NoSecurity,
}
AVAILABILITY = {"stopped": "Stopped", "offline": "Offline"}


class _Users:
    """asyncua's user manager: the configured user, and anonymous clients only when allowed."""

    def __init__(self, username: str | None, password: str | None, refused: Callable[[str], None]) -> None:
        self.username, self.password, self.refused = username, password, refused

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is None:
            # Anonymous tokens are offered only when there is no user to log in as (allow_insecure).
            return User(role=UserRole.User) if self.username is None else None
        if (self.username is not None and hmac.compare_digest(username.encode(), self.username.encode())
                and hmac.compare_digest((password or "").encode(), (self.password or "").encode())):
            return User(role=UserRole.User, name=username)
        self.refused(username)
        return None


def _value(value: Any, vtype: ua.VariantType, now: datetime) -> ua.DataValue:
    return ua.DataValue(ua.Variant(value, vtype), SourceTimestamp=now, ServerTimestamp=now)


class OpcUaSink:
    """One camera in the server: its updates go to the output's loop; its Trigger calls come from there."""

    def __init__(self, output: OpcUaOutput, camera: str, on_trigger: Callable[[Trigger], None]) -> None:
        self.output = output
        self.camera = camera
        self.on_trigger = on_trigger
        self.nodes: CameraNodes | None = None  # made on the loop by the output's start
        self.queue: asyncio.Queue | None = None
        self.events: Any = None  # the camera's ResultReady event generator
        self.counts = {key: 0 for key in COUNTERS}
        self.triggers = 0  # Trigger calls handed to the camera
        self.rejected = 0  # Trigger calls refused for their arguments
        self.fired = 0  # ResultReady events
        self.dropped = 0  # updates the loop did not take (stuck or gone)
        self._ours: dict[int, Trigger] = {}  # Triggers made here and not answered yet, by identity
        self._closed = False
        self._rejected_log = ThrottledLog(log)

    # -- sink interface (camera thread) -----------------------------------------------------------

    def start(self) -> None:
        """The server is the output's; the camera is ready for triggers from now on."""
        self._submit("state", "Ready")

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        json.dumps(verdict, allow_nan=False)  # fail here, in the caller, like the MQTT sink, on a broken verdict
        self._submit("verdict", verdict, trigger)

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        self._submit("error", payload, trigger)

    def publish_model(self, state: dict) -> None:
        self._submit("model", state)

    def stop(self, flush_timeout: float, availability: str) -> None:
        """Apply what is pending, then show ``availability`` (Stopped/Offline) in State, within ``flush_timeout``."""
        if self._closed or self.queue is None:  # stopped already, or the server never started
            return
        done: concurrent.futures.Future = concurrent.futures.Future()
        submitted = self._submit("state", AVAILABILITY.get(availability, "Offline"), done)
        self._closed = True
        if not submitted:
            return
        try:
            done.result(flush_timeout)
        except concurrent.futures.TimeoutError:
            log.warning("OPC UA: camera %s: updates not applied within %g s of stopping", self.camera, flush_timeout)

    @property
    def fatal_error(self) -> str | None:
        return self.output.fatal

    def health(self) -> dict[str, object]:
        return {"opcua_listening": self.output.listening, "opcua_queue_depth": self.queue_depth}

    def status(self) -> str:
        return f"OPC UA {'listening' if self.output.listening else 'down'}, queue {self.queue_depth}"

    def collect(self, camera: str) -> Iterator[Metric]:
        yield from per_camera(CounterMetricFamily, camera, {
            "patchline_opcua_events": ("ResultReady events fired, one per verdict", self.fired),
            "patchline_opcua_triggers": ("Trigger calls handed to the camera", self.triggers),
            "patchline_opcua_rejected_triggers": ("Trigger calls refused for their arguments", self.rejected),
            "patchline_opcua_dropped": ("Verdicts, errors and models not shown (the server's loop stuck or gone)",
                                        self.dropped),
        })
        yield from per_camera(GaugeMetricFamily, camera, {
            "patchline_opcua_queue_depth": ("Updates waiting for the server's loop", self.queue_depth),
            "patchline_opcua_listening": ("1 while the OPC UA server listens", float(self.output.listening)),
        })

    @property
    def queue_depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def _submit(self, kind: str, *args: Any) -> bool:
        """Schedule an update on the server's loop; False when it was dropped."""
        loop, queue = self.output.loop, self.queue
        if loop is None or queue is None:
            raise RuntimeError(f"OpcUaSink {self.camera}: {kind} before the output started")
        if self._closed:
            raise RuntimeError(f"OpcUaSink {self.camera}: {kind} after stop()")
        if queue.qsize() >= MAX_QUEUE:
            self.dropped += 1
            return False
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, args))
        except RuntimeError:  # the loop is closed: the server ended (fatal_error says why)
            self.dropped += 1
            return False
        return True

    # -- on the server's loop ---------------------------------------------------------------------

    async def deliver(self, server: Server) -> None:
        """Apply the camera's updates in order, for as long as the server runs; an update that fails is logged."""
        assert self.queue is not None
        while True:
            kind, args = await self.queue.get()
            try:
                await getattr(self, "_apply_" + kind)(server, *args)
            except Exception:
                log.exception("OPC UA: camera %s: %s not shown", self.camera, kind)

    async def _write(self, server: Server, path: tuple[str, ...], value: Any, vtype: ua.VariantType,
                     now: datetime) -> None:
        assert self.nodes is not None
        await server.write_attribute_value(self.nodes.id(*path), _value(value, vtype, now))

    async def _apply_verdict(self, server: Server, verdict: dict, trigger: Trigger | None) -> None:
        now = datetime.now(timezone.utc)
        values = {name: (get(verdict), vtype) for name, (vtype, get) in RESULT_FIELDS.items()}
        for name, (value, vtype) in values.items():
            await self._write(server, ("Result", name), value, vtype, now)
        self.counts[verdict["verdict"]] += 1
        await self._write(server, ("Counters", COUNTERS[verdict["verdict"]]), self.counts[verdict["verdict"]],
                          ua.VariantType.UInt64, now)
        event = self.events.event
        event.Camera = self.camera
        for name, (value, _) in values.items():
            setattr(event, name, value)
        ours = trigger is not None and self._ours.pop(id(trigger), None) is trigger
        await self.events.trigger(message=f"{verdict['verdict']} seq {verdict['seq']}" +
                                  (f", answering Trigger({verdict['part_id']!r})" if ours else ""))
        self.fired += 1

    async def _apply_error(self, server: Server, payload: dict, trigger: Trigger | None) -> None:
        now = datetime.now(timezone.utc)
        ours = trigger is not None and self._ours.pop(id(trigger), None) is trigger
        report = {"camera": self.camera, "timestamp": iso_utc(time.time()), **payload, "opcua_trigger": ours}
        await self._write(server, ("LastError",), json.dumps(report, separators=(",", ":")), ua.VariantType.String,
                          now)
        self.counts["errors"] += 1
        await self._write(server, ("Counters", COUNTERS["errors"]), self.counts["errors"], ua.VariantType.UInt64, now)

    async def _apply_model(self, server: Server, state: dict) -> None:
        now = datetime.now(timezone.utc)
        for name, (vtype, get) in MODEL_FIELDS.items():
            await self._write(server, ("Model", name), get(state), vtype, now)

    async def _apply_state(self, server: Server, state: str, done: concurrent.futures.Future | None = None) -> None:
        await self._write(server, ("State",), state, ua.VariantType.String, datetime.now(timezone.utc))
        if done is not None:
            done.set_result(None)

    async def call_trigger(self, parent: ua.NodeId, *args: ua.Variant) -> ua.CallMethodResult | list:
        """The Trigger method: hand a checked part id to the camera, or refuse the call saying what is wrong."""
        if len(args) != 1:
            code = ua.StatusCodes.BadArgumentsMissing if not args else ua.StatusCodes.BadTooManyArguments
            return self._refuse(code, f"Trigger takes one argument, PartId (String); got {len(args)}", args)
        try:
            part_id = check_part_id(args[0].Value)
        except ValueError as exc:
            return self._refuse(ua.StatusCodes.BadInvalidArgument, f"PartId: {exc}", args)
        trigger = Trigger(part_id=part_id, received=time.time())
        self._ours[id(trigger)] = trigger  # before on_trigger: a refused trigger is answered within it
        self.triggers += 1
        self.on_trigger(trigger)
        return []

    def _refuse(self, code: int, detail: str, args: tuple) -> ua.CallMethodResult:
        self.rejected += 1
        self._rejected_log(f"OPC UA: camera {self.camera}: Trigger call refused: {detail}", self.camera)
        status = ua.StatusCode(code)
        return ua.CallMethodResult(
            StatusCode=status, InputArgumentResults=[status] * len(args),
            InputArgumentDiagnosticInfos=[ua.DiagnosticInfo(AdditionalInfo=detail)] * len(args))


class OpcUaOutput:
    """The ``opcua`` output: one server for the line, an object per camera in it."""

    def __init__(self, config: OpcUaConfig, line: LineConfig) -> None:
        self.config = config
        self.line = line.line
        self.sinks: dict[str, OpcUaSink] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.listening = False
        self.fatal: str | None = None
        self.refused_logins = 0
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._failure: str | None = None  # why the server did not start
        self._stop: asyncio.Event | None = None
        self._refused_log = ThrottledLog(log)

    def sink(self, camera: str, on_trigger: Callable[[Trigger], None], on_command: Callable[[str, dict], None],
             disk: DiskWrites) -> OpcUaSink:
        self.sinks[camera] = OpcUaSink(self, camera, on_trigger)
        return self.sinks[camera]

    def start(self) -> None:
        """Build the address space and listen; ConfigError saying why when the server cannot start."""
        cfg = self.config
        password = read_credential(cfg.password_credential, "opcua.password_credential") \
            if cfg.password_credential else None
        self._thread = threading.Thread(target=self._run, args=(password,), name="opcua-server", daemon=True)
        self._thread.start()
        if not self._started.wait(START_TIMEOUT_S):
            raise ConfigError(f"opcua: the server did not start within {START_TIMEOUT_S:g} s")
        if self._failure is not None:
            self._thread.join(5.0)
            raise ConfigError(f"opcua: {self._failure}")
        log.info("OPC UA: listening on opc.tcp://%s:%d (%s), %d camera(s) in namespace %s", cfg.host, cfg.port,
                 ", ".join(cfg.security_policies), len(self.sinks), cfg.namespace_uri)

    def close(self, availability: str) -> None:
        """Stop the server (clients see the connection end) and its thread."""
        loop, stop = self.loop, self._stop
        if loop is None or stop is None or self._thread is None:
            return
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop already ended
            pass
        self._thread.join(10.0)
        log.info("OPC UA: server stopped (%s)", availability)

    def _refused(self, username: str) -> None:
        self.refused_logins += 1
        self._refused_log(f"OPC UA: login refused for user {username!r}: wrong user name or password", username)

    # -- the server's thread ----------------------------------------------------------------------

    def _run(self, password: str | None) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self._serve(password))
        except Exception as exc:
            if self._started.is_set():
                self.fatal = f"opcua: the server ended: {exc}"
                log.exception("OPC UA: the server ended")
            else:
                self._failure = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
        finally:
            self.listening = False
            self._started.set()
            loop.close()

    async def _serve(self, password: str | None) -> None:
        self._stop = asyncio.Event()
        server = await self._server(password)
        tasks = [asyncio.ensure_future(sink.deliver(server)) for sink in self.sinks.values()]
        try:
            await self._listen(server)  # on failure, asyncua has already stopped what it started
            self.listening = True
            self._started.set()
            await self._stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            if self.listening:
                self.listening = False
                await server.stop()

    async def _server(self, password: str | None) -> Server:
        cfg = self.config
        server = Server(user_manager=_Users(cfg.username, password, self._refused))
        await server.init()
        server.set_endpoint(f"opc.tcp://{cfg.host}:{cfg.port}")
        server.set_server_name(cfg.server_name)
        await server.set_application_uri(cfg.application_uri)
        for setting, path, load in (("certificate", cfg.certificate, server.load_certificate),
                                    ("private_key", cfg.private_key, server.load_private_key)):
            if path is None:
                continue
            try:
                await load(path)
            except (OSError, ValueError, TypeError) as exc:
                raise ConfigError(f"{setting} {path} does not load: {getattr(exc, 'strerror', None) or exc}") from None
        server.set_security_policy([POLICIES[p] for p in cfg.security_policies])
        tokens: list[type] = [ua.UserNameIdentityToken] if cfg.username else [ua.AnonymousIdentityToken]
        server.set_identity_tokens(tokens)
        ids = Ids(await server.register_namespace(cfg.namespace_uri))
        etype = await event_type(server, ids)
        root = await server.nodes.objects.add_folder(ids("Patchline"), ids.name("Patchline"))
        line = await root.add_folder(ids("Patchline", self.line), ids.name(self.line))
        for camera, sink in self.sinks.items():
            sink.nodes = await camera_nodes(line, ids, camera, sink.call_trigger)
            sink.events = await server.get_event_generator(etype, sink.nodes.node)
            sink.queue = asyncio.Queue()
        return server

    async def _listen(self, server: Server) -> None:
        cfg = self.config
        try:
            await server.start()
        except OSError as exc:
            why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {why}") from None

