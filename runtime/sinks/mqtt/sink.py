"""``MqttSink``: one camera's verdicts and availability out over MQTT, its triggers in (topics: topics.py).

The daemon uses it through the sink interface (runtime/sinks)::

    sink = MqttSink(config.mqtt, camera, state_dir, on_trigger=queue.put)   # on_trigger: keep it quick
    sink.start()                        # MqttError: unusable config (TLS files, credential); connects in background
    sink.publish_verdict(verdict, trigger)   # never blocks: queued, spooled, delivered in order (delivery.py)
    if sink.fatal_error: exit non-zero  # e.g. the broker refused the credentials; no retries follow
    sink.stop(flush_timeout=5.0, availability="stopped")   # deliver what is queued, announce, disconnect
"""

from __future__ import annotations

import json
import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from patchline.runtime.config import LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.metrics import per_camera
from patchline.runtime.sinks.mqtt.config import MqttConfig
from patchline.runtime.sinks.mqtt.client import FATAL_CONNACK, RECONNECT_DELAY_S, make_client
from patchline.runtime.sinks.mqtt.delivery import Delivery, Entry
from patchline.runtime.sinks.mqtt.topics import Topics
from patchline.runtime.triggers import Trigger, parse_trigger
from patchline.runtime.verdict import SCHEMA_VERSION, iso_utc

log = logging.getLogger(__name__)


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """An exception in a paho callback is logged; it must never end paho's network thread."""

    def run(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in MQTT callback %s (ignored)", callback.__name__)

    run.__name__ = callback.__name__
    return run


class MqttSink:
    """Publishes one camera's verdicts and availability, and receives its triggers.

    Thread model: ``publish_verdict``/``publish_error`` may be called from any thread and only append
    to an in-memory inbox; a sender thread (delivery.py) spools, bounds and hands verdicts to paho; paho's
    network thread runs the callbacks, which only record what happened. ``on_trigger`` runs in that network
    thread: it must return quickly.
    """

    def __init__(self, config: MqttConfig, camera: str, state_dir: str | Path,
                 on_trigger: Callable[[Trigger], None] | None = None, disk: DiskWrites | None = None,
                 on_command: Callable[[str, dict], None] | None = None) -> None:
        self.config = config
        self.camera = camera
        self.topics = Topics.for_camera(config.topic_prefix, camera)
        self.on_trigger = on_trigger
        self.on_command = on_command  # ("model/set", its JSON object), from paho's network thread
        self.spool_dir = Path(config.spool_dir or state_dir) / "mqtt-spool" / camera
        self.client_id = config.client_id or f"patchline-{camera}"
        self._v5 = config.protocol == "5"
        # One lock for the sink's state and its queue's (``delivery``, which also keeps the counts and knows the
        # connection): stop() chooses the last word under the lock that a connection completing takes to announce it.
        self._cond = threading.Condition()
        self.delivery = Delivery(config, camera, self.spool_dir, disk or DiskWrites(), self._cond, self._messages)
        self._closing = False
        self._final = "online"  # what a connection announces on `available`: stop() changes it
        self._model: str | None = None  # the retained `model` message, announced again at every connection
        self._fatal: str | None = None
        self._failing = False  # a connection attempt failed and was logged; quiet until the next success
        self._client: paho.Client | None = None

    # -- state, for the daemon (sink interface); the counts are delivery's ------------------------

    @property
    def fatal_error(self) -> str | None:
        """Why the sink gave up connecting (bad credentials, untrusted broker certificate); None while usable."""
        return self._fatal

    def health(self) -> dict[str, object]:
        return {"mqtt_connected": self.delivery.connected, "queue_depth": self.delivery.queue_depth}

    def status(self) -> str:
        return f"broker {'connected' if self.delivery.connected else 'disconnected'}, queue {self.delivery.queue_depth}"

    def collect(self, camera: str) -> Iterator[Metric]:
        d = self.delivery
        yield from per_camera(CounterMetricFamily, camera, {
            "patchline_mqtt_reconnects": ("Successful broker connections after the first", d.reconnects),
            "patchline_mqtt_delivered": ("Verdicts the broker acknowledged (every message of each), including ones "
                                         "an earlier run left in the spool", d.delivered),
            "patchline_mqtt_recovered": ("Verdicts an earlier run left in the spool, found at start", d.recovered),
            "patchline_mqtt_dropped": ("Verdicts that will never be delivered (overflow, age, refused)", d.dropped),
        })
        yield from per_camera(GaugeMetricFamily, camera, {
            "patchline_mqtt_queue_depth": ("Verdicts not yet acknowledged by the broker", d.queue_depth),
            "patchline_mqtt_connected": ("1 while connected to the broker", float(d.connected)),
        })

    # -- lifecycle -------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = make_client(self.config, self.client_id, self.topics.available)
        client.on_connect = _guarded(self._on_connect)
        client.on_connect_fail = _guarded(self._on_connect_fail)
        client.on_disconnect = _guarded(self._on_disconnect)
        client.on_publish = _guarded(self._on_publish)
        client.on_message = _guarded(self._on_message)
        return client

    def start(self) -> None:
        """Check the configuration, recover the spool, and connect in the background."""
        if self._client is not None:
            raise RuntimeError("MqttSink.start() called twice")
        client = self._make_client()
        self.delivery.start(client)
        self._client = client
        cfg = self.config
        log.info("MQTT: connecting to %s:%d as %s (MQTT %s%s)", cfg.host, cfg.port, self.client_id,
                 cfg.protocol, ", TLS" if cfg.tls else "")
        kwargs = {"clean_start": True} if self._v5 else {}
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, **kwargs)
        client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected; False on timeout or when a fatal error ended the attempts."""
        with self._cond:
            self._cond.wait_for(lambda: self.delivery.connected or self._fatal is not None, timeout)
            return self.delivery.connected

    def stop(self, flush_timeout: float = 5.0, availability: str = "stopped") -> None:
        """Deliver what is queued, publish ``availability`` (retained), disconnect; within ``flush_timeout`` s.

        ``availability`` is "stopped" for a stop the operator asked for and "offline" (what the will says) when
        the daemon ends because something went wrong. A broker that is away gets the whole ``flush_timeout`` to
        come back; a connection made meanwhile announces ``availability``, not "online", so the broker never
        keeps an "online" from a daemon that is gone. Whatever is not acknowledged stays in the spool.
        """
        if self._client is None or self.delivery.stopped:
            return
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            self._closing = True
            self._final = availability
            self._cond.notify_all()
            self._cond.wait_for(lambda: self.delivery.drained or self._fatal is not None,
                                max(0.0, deadline - time.monotonic()))
            connected = self.delivery.connected
        client = self._client
        announced = False
        if connected:
            info = client.publish(self.topics.available, availability, qos=1, retain=True)
            try:
                info.wait_for_publish(max(1.0, deadline - time.monotonic()))
                announced = info.is_published()
            except (RuntimeError, ValueError) as exc:
                log.warning("MQTT: could not publish %r: %s", availability, exc)
        client.disconnect()
        client.loop_stop()
        self.delivery.stop()
        left = self.delivery.spooled
        delivered = (f"{left} undelivered verdict(s) kept in {self.spool_dir} for the next start" if left
                     else "all verdicts delivered")
        counts = f"{self.delivery.reconnects} reconnects, {self.delivery.dropped} verdicts dropped"
        if announced:
            log.info("MQTT: disconnected; %s; availability %r published; %s", delivered, availability, counts)
        else:
            log.warning("MQTT: disconnected; %s; broker %s:%d unreachable, availability %r not published: it shows "
                        "'offline' (the will) once it notices the lost connection; %s", delivered, self.config.host,
                        self.config.port, availability, counts)

    # -- publishing ------------------------------------------------------------------------------

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        """Queue a verdict (from ``make_verdict``) for delivery; returns at once."""
        json.dumps(verdict, allow_nan=False)  # fail here, in the caller, on a payload that cannot be sent
        entry = Entry(None, time.time(), verdict, trigger.response_topic if trigger else None,
                      trigger.correlation_data if trigger else None)
        with self._cond:
            if self._closing:
                raise RuntimeError("MqttSink.publish_verdict() after stop()")
            self.delivery.put(entry)

    def publish_model(self, state: dict) -> None:
        """Publish ``state`` on the ``model`` topic, retained (QoS 1), and again at every connection: a broker
        restarted without persistence, or a PLC that subscribes later, still learns which model runs."""
        model = json.dumps({"schema_version": SCHEMA_VERSION, "camera": self.camera, **state}, separators=(",", ":"),
                           allow_nan=False)
        with self._cond:
            self._model = model
            connected = self._client is not None and self.delivery.connected
        # Published without the lock: paho's network thread holds its message lock while our PUBACK callback
        # waits for ours, so publishing under ours (paho takes its message lock) can deadlock the two. A
        # connection completing meanwhile announces the same message again, which retained messages allow.
        if connected:
            self._client.publish(self.topics.model, model, qos=1, retain=True)

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        """Publish a JSON error report on the error topic (QoS 1; best effort: not queued while disconnected).

        ``payload`` should hold at least ``error`` (a short code) and ``detail``; camera, timestamp and
        schema_version are added. When ``trigger`` came with a v5 ResponseTopic, the requester is told there too.
        """
        self._report_error(self._error_message(payload), trigger.response_topic if trigger else None,
                           trigger.correlation_data if trigger else None)

    def _report_error(self, report: dict, response_topic: str | None, correlation: bytes | None) -> None:
        self._publish_now(self.topics.error, report)
        if response_topic:  # a v5 requester waits on its ResponseTopic
            self._publish_now(response_topic, report, correlation)

    def _error_message(self, payload: dict) -> dict:
        return {"schema_version": SCHEMA_VERSION, "camera": self.camera, "timestamp": iso_utc(time.time()), **payload}

    def _publish_now(self, topic: str, message: dict, correlation_data: bytes | None = None) -> None:
        client = self._client
        if client is None or not self.delivery.connected:
            log.warning("MQTT: not connected, not published on %s: %s", topic, message)
            return
        client.publish(topic, json.dumps(message, separators=(",", ":")), qos=1, retain=False,
                       properties=self._response_properties(correlation_data))

    def _response_properties(self, correlation_data: bytes | None) -> Properties | None:
        if not self._v5 or correlation_data is None:
            return None
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation_data
        return props

    def _messages(self, entry: Entry) -> list[tuple[str, str, Properties | None]]:
        v = entry.verdict
        payload = json.dumps(v, separators=(",", ":"), allow_nan=False)
        messages = [
            (self.topics.verdict, payload, None),
            (self.topics.mirror("part_id"), v.get("part_id") or "", None),
            (self.topics.mirror("seq"), str(v["seq"]), None),
            (self.topics.mirror("score"), json.dumps(v["score"]), None),
            (self.topics.mirror("state"), v["verdict"], None),
        ]
        if entry.response_topic:
            messages.append((entry.response_topic, payload, self._response_properties(entry.correlation_data)))
        return messages

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        cfg = self.config
        if reason.is_failure:
            hint = FATAL_CONNACK.get(str(reason))
            if hint:
                self._set_fatal(f"broker {cfg.host}:{cfg.port} refused the connection: {reason} ({hint})")
            else:
                log.warning("MQTT: broker %s:%d refused the connection: %s (retrying)", cfg.host, cfg.port, reason)
            return
        with self._cond:
            # Under the lock that stop() takes to choose the last word: a connection completing while the daemon
            # stops announces that word (and takes no more triggers), never an "online" left behind.
            if not self._closing:
                client.subscribe([(self.topics.trigger, 1), (self.topics.model_set, 1)])
            client.publish(self.topics.available, self._final, qos=1, retain=True)
            if self._model is not None:
                client.publish(self.topics.model, self._model, qos=1, retain=True)
            self.delivery.link_up()
            self._failing = False
        reconnects = self.delivery.reconnects
        log.info("MQTT: connected to %s:%d%s", cfg.host, cfg.port, f" (reconnect {reconnects})" if reconnects else "")

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        # paho calls this inside its `except OSError`, so the exception is still at hand.
        exc = sys.exc_info()[1]
        cfg = self.config
        if isinstance(exc, ssl.SSLCertVerificationError):
            self._set_fatal(f"TLS: the certificate of broker {cfg.host}:{cfg.port} is not trusted"
                            f" (mqtt.tls.ca_file={cfg.tls.ca_file if cfg.tls else None}): {exc.verify_message}")
            return
        if not self._failing:
            self._failing = True
            log.warning("MQTT: cannot connect to %s:%d: %s (retrying every %d-%d s, quietly)",
                        cfg.host, cfg.port, exc, *RECONNECT_DELAY_S)

    def _set_fatal(self, message: str) -> None:
        log.error("MQTT: %s; giving up", message)
        with self._cond:
            self._fatal = f"MQTT: {message}"
            self._cond.notify_all()
        self._client.disconnect()  # ends paho's reconnect loop: no retry storm against a refusing broker

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        if self.delivery.link_down():
            if self._closing:
                log.info("MQTT: disconnected")
            else:
                log.warning("MQTT: connection to %s:%d lost (%s); %d verdict(s) queued, reconnecting",
                            self.config.host, self.config.port, reason, self.delivery.queue_depth)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        self.delivery.acknowledged(mid, reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)  # MQTT v5 only
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        answerable = bool(response_topic) and not any(c in response_topic for c in "+#")
        if message.topic == self.topics.model_set:
            self._command("model/set", message)
            return
        if message.retain:
            self._refuse_retained(message, response_topic if answerable else None, correlation)
            return
        try:
            part_id = parse_trigger(message.payload)
            if response_topic is not None and not answerable:
                raise ValueError(f"ResponseTopic {response_topic!r} is not a topic one can publish to")
        except ValueError as exc:
            log.warning("MQTT: malformed trigger on %s: %s", message.topic, exc)
            report = self._error_message({"error": "malformed_trigger", "detail": str(exc), "topic": message.topic,
                                          "payload": message.payload[:200].decode("utf-8", "replace")})
            self._report_error(report, response_topic if answerable else None, correlation)
            return
        trigger = Trigger(part_id, time.time(), response_topic, correlation)
        log.debug("MQTT: trigger %s", trigger)
        if self.on_trigger is not None:
            self.on_trigger(trigger)

    def _command(self, name: str, message: paho.MQTTMessage) -> None:
        """A command (a JSON object) for the daemon; a retained one is refused: the broker would replay it at every
        start, long after it was meant."""
        try:
            if message.retain:
                raise ValueError(f"a retained message on {message.topic} is not a command; clear it with "
                                 f"mosquitto_pub -r -n -t {message.topic}")
            payload = json.loads(message.payload)
            if not isinstance(payload, dict):
                raise ValueError("the payload is not a JSON object")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            log.warning("MQTT: command on %s refused: %s", message.topic, exc)
            self.publish_error({"error": "malformed_command", "detail": str(exc), "topic": message.topic})
            return
        if self.on_command is not None:
            self.on_command(name, payload)

    def _refuse_retained(self, message: paho.MQTTMessage, response_topic: str | None, correlation: bytes | None) -> None:
        # The broker replays a retained trigger at every subscription, long after the part it named has gone:
        # inspecting it would judge whatever is in front of the camera now.
        try:
            part_id = parse_trigger(message.payload)
        except ValueError:
            part_id = None
        detail = (f"a retained message on {message.topic}, replayed by the broker at every start: not inspected; "
                  f"publish triggers without the retain flag, and clear it with: mosquitto_pub -r -n -t {message.topic}")
        log.warning("MQTT: retained trigger %r: %s", part_id, detail)
        report = self._error_message({"error": "retained_trigger", "detail": detail, "part_id": part_id,
                                      "topic": message.topic})
        self._report_error(report, response_topic, correlation)


class MqttOutput:
    """The ``mqtt`` output: every camera its own MqttSink, with its own connection and will (nothing shared)."""

    def __init__(self, config: MqttConfig, line: LineConfig) -> None:
        self.config = config
        self.state_dir = line.state_dir

    def sink(self, camera: str, on_trigger: Callable[[Trigger], None], on_command: Callable[[str, dict], None],
             disk: DiskWrites) -> MqttSink:
        return MqttSink(self.config, camera, self.state_dir, on_trigger=on_trigger, disk=disk, on_command=on_command)

    def start(self) -> None:
        """Nothing shared to open: each camera's sink connects when the camera starts it."""

    def close(self, availability: str) -> None:
        """Nothing shared to close: each camera's sink announced its own availability when it stopped."""
