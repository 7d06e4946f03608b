"""``SparkplugOutput``: the line as one Sparkplug B 3.0 edge node, each camera a device (``SparkplugSink``).

One paho connection (clean session / clean start, session expiry 0) whose will is the NDEATH. Each connection
gets the next bdSeq (0..255, kept in the state directory so that a host pairs every NDEATH with its NBIRTH
across a kill -9 and a restart); its NBIRTH carries it. After the NBIRTH (message seq 0), a DBIRTH for each
started camera, then DDATA per verdict; DDEATH when a camera stops; NDEATH published by ``close``.

Thread model: everything that touches the Sparkplug state (message seq, births, queues) runs on the node's own
thread, which takes events in order from one queue: the cameras' ``publish_*`` only put an event there
(never block), and paho's callbacks only record the connection's generation and bdSeq and put an event.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.config import ConfigError, LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.metrics import per_camera
from patchline.runtime.sinks.mqtt.client import FATAL_CONNACK, make_client
from patchline.runtime.sinks.sparkplug import payloads as sp
from patchline.runtime.sinks.sparkplug.config import SparkplugConfig
from patchline.runtime.throttled_log import ThrottledLog
from patchline.runtime.triggers import Trigger, check_part_id

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0  # close(): the NDEATH's acknowledgement and the node thread's end


class SparkplugSink:
    """One camera as a Sparkplug device: its calls become events on the node's thread, in order."""

    def __init__(self, node: SparkplugOutput, camera: str, on_trigger: Callable[[Trigger], None]) -> None:
        self.node = node
        self.camera = camera
        self.on_trigger = on_trigger
        # The node thread's, below: read by scrapes and health as plain values.
        self.started = False
        self.born = False
        self.dead = False
        self.pending: deque[tuple[int, list[sp.Metric]]] = deque()  # DDATA waiting for the births
        self.last: list[sp.Metric] | None = None  # the last published verdict's metrics, for a DBIRTH
        self.model: dict | None = None
        self.error: str | None = None
        self.published = 0
        self.dropped = 0
        self.malformed = 0

    def start(self) -> None:
        self.node.post(self.node.device_start, self)

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        self.node.post(self.node.device_verdict, self, *sp.verdict_values(verdict))

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        self.node.post(self.node.device_error, self, json.dumps(payload, separators=(",", ":")))

    def publish_model(self, state: dict) -> None:
        self.node.post(self.node.device_model, self, dict(state))

    def stop(self, flush_timeout: float, availability: str) -> None:
        """DDATA still waiting go out once the node is born (within ``flush_timeout``), then the DDEATH.
        Sparkplug has one death: ``availability`` ("stopped", "offline") is not told apart."""
        self.node.stop_device(self, flush_timeout)

    @property
    def fatal_error(self) -> str | None:
        return self.node.fatal

    def health(self) -> dict[str, object]:
        return {"sparkplug_connected": self.node.connected, "sparkplug_born": self.born,
                "sparkplug_queue_depth": len(self.pending)}

    def status(self) -> str:
        state = "born" if self.born else "connected" if self.node.connected else "disconnected"
        return f"sparkplug {state}, queue {len(self.pending)}"

    def collect(self, camera: str) -> Iterator[Metric]:
        yield from per_camera(CounterMetricFamily, camera, {
            "patchline_sparkplug_ddata": ("Verdicts published as DDATA", self.published),
            "patchline_sparkplug_dropped": ("Verdicts never published: the queue was full, or the camera stopped "
                                            "while the node was not born", self.dropped),
            "patchline_sparkplug_malformed_commands": ("DCMD to this camera refused as malformed", self.malformed),
        })
        yield from per_camera(GaugeMetricFamily, camera, {
            "patchline_sparkplug_queue_depth": ("Verdicts waiting for the node's and the camera's births",
                                                len(self.pending)),
            "patchline_sparkplug_born": ("1 while the camera's DBIRTH stands", float(self.born)),
        })
        if self is next(iter(self.node.devices.values())):  # the node's own counts, once: on its first camera
            yield from per_camera(CounterMetricFamily, camera, {
                "patchline_sparkplug_node_births": ("NBIRTHs published (connections, rebirth commands, host back "
                                                    "online)", self.node.births),
                "patchline_sparkplug_node_malformed": ("NCMD and host STATE messages refused as malformed",
                                                       self.node.malformed),
            })


class SparkplugOutput:
    """The ``sparkplug`` output: the line's edge node. ``sink`` adds a camera as a device."""

    def __init__(self, config: SparkplugConfig, line: LineConfig) -> None:
        self.config = config
        self.broker = config.broker or line.mqtt
        self.client_id = (config.broker.client_id if config.broker is not None and config.broker.client_id
                          else f"patchline-{line.line}-sparkplug")
        self.line = line.line
        self.topics = sp.Topics(config.group_id, config.edge_node_id or line.line)
        self.bdseq_file = Path(line.state_dir) / f"sparkplug-{config.group_id}-{self.topics.node}.bdseq"
        self.devices: dict[str, SparkplugSink] = {}
        self.fatal: str | None = None
        self.connected = False
        self.births = 0
        self.malformed = 0
        self._events: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="sparkplug-node", daemon=True)
        self._changed = threading.Condition()  # notified after each event: stop_device waits on it
        self._lock = threading.Lock()  # the connection's generation and bdSeq, shared with paho's thread
        self._generation = 0
        self._bdseq = -1
        self._closing = False
        self._client: paho.Client | None = None
        # The node thread's:
        self._seq = 0
        self._born = False
        self._host_online = config.primary_host_id is None
        self._host_timestamp = -1
        self._command_errors = 0
        self._last_command_error: str | None = None
        self._warn = ThrottledLog(log)
        self._failing = False

    def sink(self, camera: str, on_trigger: Callable[[Trigger], None], on_command: Callable[[str, dict], None],
             disk: DiskWrites) -> SparkplugSink:
        self.devices[camera] = SparkplugSink(self, camera, on_trigger)
        return self.devices[camera]

    # -- lifecycle (the daemon's thread) ---------------------------------------------------------------

    def start(self) -> None:
        """Check the connection's settings and the bdSeq file, and connect in the background. ConfigError."""
        client = make_client(self.broker, self.client_id, self.topics.node_topic("NDEATH"))
        try:
            self._bdseq = self._next_bdseq()
        except OSError as exc:
            raise ConfigError(f"sparkplug: cannot keep bdSeq in {self.bdseq_file}: {exc}") from exc
        self._set_will(client)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._thread.start()
        log.info("Sparkplug: edge node %s/%s connecting to %s:%d as %s (bdSeq %d%s)", self.topics.group,
                 self.topics.node, self.broker.host, self.broker.port, self.client_id, self._bdseq,
                 f", waiting for primary host {self.config.primary_host_id}" if self.config.primary_host_id else "")
        self._connect()

    def _connect(self) -> None:
        kwargs = {"clean_start": True} if self.broker.protocol == "5" else {}
        self._client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive_s, **kwargs)
        self._client.loop_start()

    def stop_device(self, device: SparkplugSink, flush_timeout: float) -> None:
        """Wait until ``device``'s queue is out (or ``flush_timeout``), then have its DDEATH published."""
        if not self._running():  # the node never started (another output refused the line's start)
            return
        with self._changed:
            self._changed.wait_for(lambda: (self._born and device.born and not device.pending) or not self._running(),
                                   flush_timeout)
        done = threading.Event()
        self.post(self.device_stop, device, done)
        done.wait(max(1.0, flush_timeout))

    def close(self, availability: str) -> None:
        """Publish the NDEATH (the node's death whatever ``availability``), disconnect, end the node's thread."""
        if self._client is None or not self._running():
            return
        done = threading.Event()
        self.post(self._close, done)
        done.wait(CLOSE_TIMEOUT_S)
        self._events.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)

    def _running(self) -> bool:
        return self._thread.is_alive()

    def post(self, handler: Callable[..., None], *args: Any) -> None:
        """Run ``handler(*args)`` on the node's thread, after the events before it; returns at once."""
        self._events.put(lambda: handler(*args))

    def _run(self) -> None:
        while (event := self._events.get()) is not None:
            try:
                event()
            except Exception:  # one bad event must not end the node: the cameras keep their output
                log.exception("Sparkplug: error in the node's thread (ignored)")
            with self._changed:
                self._changed.notify_all()

    # -- bdSeq (start, and paho's thread at each disconnection) -----------------------------------------

    def _next_bdseq(self) -> int:
        """The stored bdSeq + 1 (mod 256), stored before the connection whose will carries it."""
        try:
            previous = int(self.bdseq_file.read_text())
        except FileNotFoundError:
            previous = -1
        except ValueError:
            log.warning("Sparkplug: %s does not hold a bdSeq; starting again at 0", self.bdseq_file)
            previous = -1
        value = (previous + 1) % 256
        write_atomically(self.bdseq_file, f"{value}\n".encode(), fsync=True)
        return value

    def _set_will(self, client: paho.Client) -> None:
        # Sparkplug 3.0: the NDEATH will is QoS 1 and not retained.
        client.will_set(self.topics.node_topic("NDEATH"), self._death(self._bdseq), qos=1, retain=False)

    @staticmethod
    def _death(bdseq: int) -> bytes:
        """The NDEATH payload: the bdSeq of the NBIRTH it ends, and no message seq."""
        return sp.encode(sp.milliseconds(time.time()), [(sp.BDSEQ, sp.INT64, bdseq)], seq=None)

    def _publish_death(self, bdseq: int, timeout: float) -> bool:
        """The NDEATH published by the node itself (a clean disconnection does not fire the will)."""
        info = self._client.publish(self.topics.node_topic("NDEATH"), self._death(bdseq), qos=1, retain=False)
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            log.warning("Sparkplug: NDEATH not published: %s (the broker publishes the will)", exc)
        return info.is_published()

    # -- paho callbacks (paho's network thread): record, then hand over ------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            hint = FATAL_CONNACK.get(str(reason))
            if hint is None:
                log.warning("Sparkplug: broker %s:%d refused the connection: %s (retrying)", self.broker.host,
                            self.broker.port, reason)
                return
            self.fatal = f"Sparkplug: broker {self.broker.host}:{self.broker.port} refused the connection: {reason} " \
                         f"({hint})"
            log.error("%s; giving up", self.fatal)
            client.disconnect()  # ends paho's reconnect loop: no retry storm against a refusing broker
            return
        with self._lock:
            generation, bdseq = self._generation, self._bdseq
        self.post(self._connected, generation, bdseq)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if not self._failing:
            self._failing = True
            log.warning("Sparkplug: cannot connect to %s:%d (retrying, quietly)", self.broker.host, self.broker.port)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        with self._lock:
            self._generation += 1
            if not self._closing:
                # paho reconnects from this thread after this returns: the next CONNECT carries the next bdSeq.
                try:
                    self._bdseq = self._next_bdseq()
                except OSError as exc:
                    self._bdseq = (self._bdseq + 1) % 256
                    log.error("Sparkplug: cannot store bdSeq %d in %s: %s (a restart may repeat it)", self._bdseq,
                              self.bdseq_file, exc)
                self._set_will(client)
        self.post(self._disconnected, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self.post(self._message, message.topic, message.payload, message.retain)

    # -- the node's thread ------------------------------------------------------------------------------

    def _publish(self, topic: str, timestamp_ms: int, metrics: list[sp.Metric]) -> bool:
        """Publish a birth, data or death with the next message seq (0..255); False when paho refused it."""
        payload = sp.encode(timestamp_ms, metrics, self._seq)
        self._seq = (self._seq + 1) % 256
        return self._client.publish(topic, payload, qos=0, retain=False).rc == paho.MQTT_ERR_SUCCESS

    def _connected(self, generation: int, bdseq: int) -> None:
        if generation != self._generation:
            return  # a connection already lost again: its successor births
        self.connected = True
        self._failing = False
        topics = [(self.topics.node_topic("NCMD"), 1), (self.topics.device_topic("DCMD", "+"), 1)]
        if self.config.primary_host_id is not None:
            self._host_online = False  # until its STATE (retained) says otherwise on this connection
            topics.append((sp.Topics.state(self.config.primary_host_id), 1))
        self._client.subscribe(topics)  # before the NBIRTH on the same connection: a command after it is heard
        log.info("Sparkplug: connected to %s:%d (bdSeq %d)", self.broker.host, self.broker.port, bdseq)
        if self._host_online:
            self._birth(bdseq)

    def _disconnected(self, reason: ReasonCode) -> None:
        was = self.connected
        self.connected = self._born = False
        for device in self.devices.values():
            device.born = False
        if was and not self._closing:
            log.warning("Sparkplug: connection to %s:%d lost (%s); reconnecting, then births again",
                        self.broker.host, self.broker.port, reason)

    def _birth(self, bdseq: int | None = None) -> None:
        """NBIRTH (seq 0), then a DBIRTH for each started camera, each followed by its waiting DDATA."""
        with self._lock:
            bdseq = self._bdseq if bdseq is None else bdseq
        self._seq = 0
        now = sp.milliseconds(time.time())
        self._publish(self.topics.node_topic("NBIRTH"), now, [
            (sp.BDSEQ, sp.INT64, bdseq), (sp.REBIRTH, sp.BOOLEAN, False), (sp.LINE, sp.STRING, self.line),
            (sp.COMMAND_ERRORS, sp.UINT64, self._command_errors),
            (sp.LAST_COMMAND_ERROR, sp.STRING, self._last_command_error)])
        self._born = True
        self.births += 1
        for device in self.devices.values():
            if device.started and not device.dead:
                self._device_birth(device)

    def _device_birth(self, device: SparkplugSink) -> None:
        self._publish(self.topics.device_topic("DBIRTH", device.camera), sp.milliseconds(time.time()),
                      sp.device_birth_values(device.last, device.model, device.error))
        device.born = True
        while device.pending:
            self._device_data(device, *device.pending.popleft())

    def _device_data(self, device: SparkplugSink, timestamp_ms: int, metrics: list[sp.Metric]) -> None:
        if self._publish(self.topics.device_topic("DDATA", device.camera), timestamp_ms, metrics):
            device.published += 1
            device.last = metrics
        else:
            device.dropped += 1  # QoS 0 on a connection paho already knows is gone

    def device_start(self, device: SparkplugSink) -> None:
        device.started = True
        if self._born:
            self._device_birth(device)

    def device_verdict(self, device: SparkplugSink, timestamp_ms: int, metrics: list[sp.Metric]) -> None:
        if self._born and device.born:
            self._device_data(device, timestamp_ms, metrics)
            return
        if device.dead:
            device.dropped += 1
            return
        if len(device.pending) >= self.config.queue_max_count:
            device.pending.popleft()
            device.dropped += 1
        device.pending.append((timestamp_ms, metrics))

    def device_error(self, device: SparkplugSink, report: str) -> None:
        device.error = report
        if self._born and device.born:
            self._publish(self.topics.device_topic("DDATA", device.camera), sp.milliseconds(time.time()),
                          [(sp.ERROR, sp.STRING, report)])

    def device_model(self, device: SparkplugSink, state: dict) -> None:
        device.model = state
        if self._born and device.born:
            self._publish(self.topics.device_topic("DDATA", device.camera), sp.milliseconds(time.time()),
                          sp.model_values(state))

    def device_stop(self, device: SparkplugSink, done: threading.Event) -> None:
        if device.dead:
            done.set()
            return
        if self._born and device.born:
            self._publish(self.topics.device_topic("DDEATH", device.camera), sp.milliseconds(time.time()), [])
        elif device.pending:
            log.warning("Sparkplug: camera %s stopped while the node was not born: %d verdict(s) not published",
                        device.camera, len(device.pending))
        device.dropped += len(device.pending)
        device.pending.clear()
        device.dead, device.born = True, False
        done.set()

    def _close(self, done: threading.Event) -> None:
        with self._lock:
            self._closing = True
            bdseq = self._bdseq
        published = self.connected and self._publish_death(bdseq, CLOSE_TIMEOUT_S / 2)
        self._client.disconnect()
        self._client.loop_stop()
        self.connected = self._born = False
        log.info("Sparkplug: disconnected; NDEATH (bdSeq %d) %s", bdseq,
                 "published" if published else "not published: the broker publishes the will when it notices")
        done.set()

    # -- inbound: commands and the primary host's STATE --------------------------------------------------

    def _message(self, topic: str, payload: bytes, retain: bool) -> None:
        if not payload:
            return  # an empty message clears a retained one (what the refusal of a retained command asks for)
        if self.config.primary_host_id is not None and topic == sp.Topics.state(self.config.primary_host_id):
            self._host_state(payload)
            return
        device = None
        if topic != self.topics.node_topic("NCMD"):
            camera = topic.rsplit("/", 1)[-1]
            device = self.devices.get(camera)
            if device is None:
                self._refuse(None, topic, f"no camera {camera!r} on this node ({', '.join(self.devices)})")
                return
        if retain:
            self._refuse(device, topic, "a retained command, replayed by the broker at every subscription: not "
                                        "executed; publish commands without the retain flag and clear it")
            return
        try:
            if device is None:
                commands = sp.decode_command(payload, {sp.REBIRTH: sp.BOOLEAN})
            else:
                commands = [(name, check_part_id(value))
                            for name, value in sp.decode_command(payload, {sp.TRIGGER: sp.STRING})]
        except ValueError as exc:
            self._refuse(device, topic, str(exc))
            return
        for _name, value in commands:
            if device is not None:
                device.on_trigger(Trigger(value, time.time()))
            elif value and self.connected and self._host_online:
                log.info("Sparkplug: rebirth requested")
                self._birth()

    def _refuse(self, device: SparkplugSink | None, topic: str, detail: str) -> None:
        """A malformed command: logged (throttled), counted, told in NDATA ``Node Info/Last Command Error``."""
        if device is None:
            self.malformed += 1
        else:
            device.malformed += 1
        self._command_errors += 1
        self._last_command_error = f"{topic}: {detail}"
        self._warn(f"Sparkplug: command refused: {self._last_command_error}", topic)
        if self._born:
            self._publish(self.topics.node_topic("NDATA"), sp.milliseconds(time.time()), [
                (sp.COMMAND_ERRORS, sp.UINT64, self._command_errors),
                (sp.LAST_COMMAND_ERROR, sp.STRING, self._last_command_error)])

    def _host_state(self, payload: bytes) -> None:
        try:
            online, timestamp = sp.decode_state(payload)
        except ValueError as exc:
            self.malformed += 1
            self._warn(f"Sparkplug: primary host {self.config.primary_host_id}: {exc} (ignored)", "STATE")
            return
        if timestamp < self._host_timestamp:
            return  # an older STATE arriving late (Sparkplug 3.0: the host's timestamps order them)
        self._host_timestamp = timestamp
        if online and not self._host_online:
            self._host_online = True
            log.info("Sparkplug: primary host %s online", self.config.primary_host_id)
            if self.connected:
                self._birth()
        elif not online and self._host_online:
            self._host_online = False
            log.warning("Sparkplug: primary host %s offline: NDEATH, disconnecting, reconnecting to wait for it",
                        self.config.primary_host_id)
            self._reconnect()

    def _reconnect(self) -> None:
        """Sparkplug 3.0 when the primary host goes offline: NDEATH, disconnect, connect again (next bdSeq)."""
        with self._lock:
            bdseq = self._bdseq
        if self.connected:
            self._publish_death(bdseq, 1.0)
        self._client.disconnect()  # paho's on_disconnect prepares the next bdSeq and will
        self._client.loop_stop()
        self._connect()
