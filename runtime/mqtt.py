"""Verdicts out to the line's PLCs over MQTT, triggers in (paho-mqtt 2.x, callback API version 2).

Topics, all under ``<topic_prefix>/<camera>/`` (see ``Topics``):

    verdict            verdict JSON (runtime/verdict.schema.json), QoS 1, not retained
    verdict/part_id    scalar mirrors of each verdict for PLCs without a JSON parser, QoS 1, not
    verdict/seq        retained, published right after the JSON in this order — ``verdict/state``
    verdict/score      comes last, so a PLC that sees it has already received that verdict's
    verdict/state      part_id/seq/score ("" part_id in continuous mode; score as in the JSON)
    available          retained, QoS 1: "online" (every connect); "stopped" (stopped on request, or a file source
                       ended); "offline" (the will, or the daemon ended on an error or a crash)
    trigger            subscribed: {"part_id": "..."} or a plain string; MQTT v5 ResponseTopic and
                       CorrelationData are kept, and the verdict answering it is also published to the
                       ResponseTopic with the CorrelationData; a retained trigger (the broker replays it
                       at every subscription) is answered on ``error`` and never passed on
    error              JSON {"error", "detail", ...} for malformed and retained triggers and ``publish_error``, QoS 1

Contract for the daemon::

    sink = MqttSink(config.mqtt, camera, state_dir, on_trigger=queue.put)   # on_trigger: keep it quick
    sink.start()                        # MqttError: unusable config (TLS files, credential); connects in background
    sink.publish_verdict(verdict, trigger)   # never blocks: queued, spooled, delivered in order
    if sink.fatal_error: exit non-zero  # e.g. the broker refused the credentials; no retries follow
    sink.stop(flush_timeout=5.0, availability="stopped")   # deliver what is queued, announce, disconnect

Delivery: every verdict goes through one ordered queue, bounded by ``queue_max_count`` and
``queue_max_age_s`` (the oldest waiting verdicts are dropped, counted in ``dropped`` and logged),
and spooled to disk (``spool_dir`` or ``state_dir``, in ``mqtt-spool/<camera>``) until all of its
messages are acknowledged (PUBACK), so a broker outage, a daemon restart during one, or both lose
nothing that fits the bounds. A message whose PUBACK was lost is sent again: duplicates are possible
and carry the same ``seq``.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from patchline.runtime.config import MqttConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.spool import Spool
from patchline.runtime.triggers import Trigger, parse_trigger
from patchline.runtime.verdict import SCHEMA_VERSION, iso_utc

log = logging.getLogger(__name__)

# Verdicts handed to paho and not yet acknowledged; more only adds memory that a disconnect makes paho resend.
WINDOW = 20
# paho stops resending after a reconnect at its first message over the in-flight limit: keep it far above
# WINDOW x messages per verdict (6) plus availability and error messages.
PAHO_MAX_INFLIGHT = 1000
RECONNECT_DELAY_S = (1, 30)  # paho doubles the wait from the first to the second after each failure
DROP_LOG_INTERVAL_S = 10.0
SENDER_JOIN_TIMEOUT_S = 5.0  # stop() has flushed already; the sender only has to notice it is stopping
# NO_CONN: the connection dropped just now; paho keeps the message and sends it after the reconnect.
ACCEPTED = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)
# CONNACK refusals that retrying cannot fix: stop and report instead of hammering the broker.
FATAL_CONNACK = {
    "Bad user name or password": "check mqtt.username and the password credential",
    "Not authorized": "check mqtt.username, the password credential and the broker's ACL",
    "Client identifier not valid": "check mqtt.client_id",
    "Banned": "the broker has banned this client",
    "Bad authentication method": "check the broker's authentication settings",
    "Unsupported protocol version": "set mqtt.protocol to a version the broker supports",
}


class MqttError(RuntimeError):
    """An MQTT configuration that cannot work (TLS files, credentials, topic names)."""


@dataclass(frozen=True)
class Topics:
    base: str

    @classmethod
    def for_camera(cls, prefix: str, camera: str) -> Topics:
        if not camera or any(c in camera for c in "/+#"):
            raise MqttError(f"camera name {camera!r} cannot be used in an MQTT topic (empty, or contains / + #)")
        if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/") or prefix.endswith("/"):
            raise MqttError(f"mqtt.topic_prefix {prefix!r} is not a valid topic prefix (no + #, no leading/trailing /)")
        return cls(f"{prefix}/{camera}")

    @property
    def verdict(self) -> str:
        return f"{self.base}/verdict"

    @property
    def available(self) -> str:
        return f"{self.base}/available"

    @property
    def trigger(self) -> str:
        return f"{self.base}/trigger"

    @property
    def error(self) -> str:
        return f"{self.base}/error"

    def mirror(self, name: str) -> str:
        return f"{self.base}/verdict/{name}"


def read_password(name: str) -> str:
    """The password named ``name``: ``$CREDENTIALS_DIRECTORY/<name>`` (systemd LoadCredential) or env var ``<name>``."""
    if not name or "/" in name or name.startswith("."):
        raise MqttError(f"mqtt.password_credential {name!r} must be a plain name"
                        " (of a file in $CREDENTIALS_DIRECTORY or of an environment variable)")
    folder = os.environ.get("CREDENTIALS_DIRECTORY")
    if folder and (Path(folder) / name).exists():
        path = Path(folder) / name
        try:
            return path.read_text().rstrip("\r\n")
        except OSError as exc:
            raise MqttError(f"mqtt.password_credential: cannot read {path}: {exc.strerror}") from exc
    if name in os.environ:
        return os.environ[name]
    where = f"{folder}/{name}" if folder else "$CREDENTIALS_DIRECTORY/" + name + " (CREDENTIALS_DIRECTORY is not set)"
    raise MqttError(f"mqtt.password_credential {name!r} not found: neither {where} nor environment variable {name}")


def _guarded(callback: Callable[..., None]) -> Callable[..., None]:
    """An exception in a paho callback is logged; it must never end paho's network thread."""

    def run(*args: Any) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("error in MQTT callback %s (ignored)", callback.__name__)

    run.__name__ = callback.__name__
    return run


@dataclass
class _Entry:
    """One queued verdict: its messages are handed to paho together and it is done when all are acknowledged."""

    key: str | None  # spool file, None until written
    queued_at: float  # wall clock, so the age bound holds across restarts
    verdict: dict
    response_topic: str | None
    correlation_data: bytes | None
    mids: set[int] = field(default_factory=set)  # handed to paho, not yet acknowledged
    link: int = 0  # connection the entry was handed on (0: not handed)
    rejected: bool = False

    def record(self) -> dict:
        return {"queued_at": self.queued_at, "verdict": self.verdict, "response_topic": self.response_topic,
                "correlation_data": self.correlation_data.hex() if self.correlation_data is not None else None}

    @classmethod
    def from_record(cls, key: str, record: dict) -> _Entry:
        verdict = record["verdict"]
        missing = {"seq", "score", "verdict"} - set(verdict)
        if missing:
            raise ValueError(f"verdict lacks {sorted(missing)}")
        corr = record.get("correlation_data")
        return cls(key, float(record["queued_at"]), verdict, record.get("response_topic"),
                   bytes.fromhex(corr) if corr is not None else None)


class MqttSink:
    """Publishes one camera's verdicts and availability, and receives its triggers.

    Thread model: ``publish_verdict``/``publish_error`` may be called from any thread and only append
    to an in-memory inbox; a sender thread spools, bounds and hands verdicts to paho; paho's network
    thread runs the callbacks, which only record what happened. ``on_trigger`` runs in that network
    thread: it must return quickly.
    """

    def __init__(self, config: MqttConfig, camera: str, state_dir: str | Path,
                 on_trigger: Callable[[Trigger], None] | None = None, disk: DiskWrites | None = None) -> None:
        self.config = config
        self.disk = disk or DiskWrites()  # spool writes the disk refuses: counted, logged
        self.camera = camera
        self.topics = Topics.for_camera(config.topic_prefix, camera)
        self.on_trigger = on_trigger
        self.spool_dir = Path(config.spool_dir or state_dir) / "mqtt-spool" / camera
        self.client_id = config.client_id or f"patchline-{camera}"
        self._v5 = config.protocol == "5"
        self._cond = threading.Condition()
        self._inbox: deque[_Entry] = deque()
        self._acks: list[tuple[int, ReasonCode]] = []
        self._pending: deque[_Entry] = deque()  # sender thread only: spooled, in order, handed ones first
        self._owner: dict[int, _Entry] = {}
        self._link = 0
        self._connected = False
        self._closing = False
        self._stopping = False
        self._final = "online"  # what a connection announces on `available`: stop() changes it
        self._kick = False  # connected: hand over what waited for the broker now, not at the next tick
        self._fatal: str | None = None
        self._failing = False  # a connection attempt failed and was logged; quiet until the next success
        self._recovered = 0
        self._counts = {"delivered": 0, "overflow": 0, "expired": 0, "rejected": 0, "corrupt": 0}
        self._last_drop_log = 0.0
        self._client: paho.Client | None = None
        self._sender: threading.Thread | None = None
        self._spool: Spool | None = None

    # -- read-only state -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queue_depth(self) -> int:
        """Verdicts not yet acknowledged by the broker (waiting, in flight, or not yet spooled)."""
        return len(self._inbox) + len(self._pending)

    @property
    def dropped(self) -> int:
        """Verdicts that will never be delivered: queue overflow, too old, refused by the broker, unreadable spool."""
        c = self._counts
        return c["overflow"] + c["expired"] + c["rejected"] + c["corrupt"]

    @property
    def delivered(self) -> int:
        """Verdicts whose every message the broker acknowledged."""
        return self._counts["delivered"]

    @property
    def drops(self) -> dict[str, int]:
        """``dropped`` by cause: overflow, expired, rejected, corrupt."""
        return {k: v for k, v in self._counts.items() if k != "delivered"}

    @property
    def recovered(self) -> int:
        """Verdicts of an earlier run found in the spool at start (delivered first)."""
        return self._recovered

    @property
    def reconnects(self) -> int:
        """Successful connections after the first."""
        return max(0, self._link - 1)

    @property
    def fatal_error(self) -> str | None:
        """Why the sink gave up connecting (bad credentials, untrusted broker certificate); None while usable."""
        return self._fatal

    # -- lifecycle -------------------------------------------------------------------------------

    def _make_client(self) -> paho.Client:
        cfg = self.config
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
            clean_session=None if self._v5 else True,
        )
        client.suppress_exceptions = True
        if cfg.username is not None or cfg.password_credential is not None:
            if cfg.username is None:
                raise MqttError("mqtt.password_credential is set but mqtt.username is not")
            password = read_password(cfg.password_credential) if cfg.password_credential else None
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            tls = cfg.tls
            if tls.key_file and not tls.cert_file:
                raise MqttError("mqtt.tls.key_file is set but mqtt.tls.cert_file is not")
            for name in ("ca_file", "cert_file", "key_file"):
                path = getattr(tls, name)
                if path is not None and not os.access(path, os.R_OK):
                    raise MqttError(f"mqtt.tls.{name}: {path} does not exist or is not readable")
            try:
                client.tls_set(ca_certs=tls.ca_file, certfile=tls.cert_file, keyfile=tls.key_file)
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise MqttError(f"mqtt.tls: cannot load ca_file={tls.ca_file}, cert_file={tls.cert_file},"
                                f" key_file={tls.key_file}: {exc}") from exc
            client.tls_insecure_set(tls.insecure)
        client.will_set(self.topics.available, "offline", qos=1, retain=True)
        client.max_inflight_messages_set(PAHO_MAX_INFLIGHT)
        client.reconnect_delay_set(*RECONNECT_DELAY_S)
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
        self._spool = Spool(self.spool_dir)
        records, corrupt = self._spool.load()
        self._counts["corrupt"] += corrupt
        for key, record in records:
            try:
                self._pending.append(_Entry.from_record(key, record))
            except (KeyError, TypeError, ValueError) as exc:
                self._spool.set_aside(key, f"has an unexpected layout ({exc!r})")
                self._counts["corrupt"] += 1
        self._recovered = len(self._pending)
        if records:
            log.info("MQTT: %d verdict(s) of a previous run found in %s: delivering them first",
                     len(self._pending), self.spool_dir)
        self._client = client
        self._sender = threading.Thread(target=self._send_loop, name=f"mqtt-sender-{self.camera}", daemon=True)
        self._sender.start()
        cfg = self.config
        log.info("MQTT: connecting to %s:%d as %s (MQTT %s%s)", cfg.host, cfg.port, self.client_id,
                 cfg.protocol, ", TLS" if cfg.tls else "")
        kwargs = {"clean_start": True} if self._v5 else {}
        client.connect_async(cfg.host, cfg.port, cfg.keepalive_s, **kwargs)
        client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected; False on timeout or when a fatal error ended the attempts."""
        with self._cond:
            self._cond.wait_for(lambda: self._connected or self._fatal is not None, timeout)
            return self._connected

    def stop(self, flush_timeout: float = 5.0, availability: str = "stopped") -> None:
        """Deliver what is queued, publish ``availability`` (retained), disconnect; within ``flush_timeout`` s.

        ``availability`` is "stopped" for a stop the operator asked for and "offline" (what the will says) when
        the daemon ends because something went wrong. A broker that is away gets the whole ``flush_timeout`` to
        come back; a connection made meanwhile announces ``availability``, not "online", so the broker never
        keeps an "online" from a daemon that is gone. Whatever is not acknowledged stays in the spool.
        """
        if self._client is None or self._stopping:
            return
        deadline = time.monotonic() + flush_timeout
        with self._cond:
            self._closing = True
            self._final = availability
            self._cond.notify_all()
            self._cond.wait_for(lambda: (self._connected and not self._inbox and not self._pending)
                                or self._fatal is not None, max(0.0, deadline - time.monotonic()))
            connected = self._connected
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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(SENDER_JOIN_TIMEOUT_S)
            if self._sender.is_alive():
                log.error("MQTT: the sender thread did not end within %.0f s; stopping without it",
                          SENDER_JOIN_TIMEOUT_S)
        left = len(self._pending)
        delivered = (f"{left} undelivered verdict(s) kept in {self.spool_dir} for the next start" if left
                     else "all verdicts delivered")
        if announced:
            log.info("MQTT: disconnected; %s; availability %r published", delivered, availability)
        else:
            log.warning("MQTT: disconnected; %s; broker %s:%d unreachable, availability %r not published: it shows "
                        "'offline' (the will) once it notices the lost connection", delivered, self.config.host,
                        self.config.port, availability)

    # -- publishing ------------------------------------------------------------------------------

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        """Queue a verdict (from ``make_verdict``) for delivery; returns at once."""
        json.dumps(verdict, allow_nan=False)  # fail here, in the caller, on a payload that cannot be sent
        entry = _Entry(None, time.time(), verdict, trigger.response_topic if trigger else None,
                       trigger.correlation_data if trigger else None)
        with self._cond:
            if self._closing:
                raise RuntimeError("MqttSink.publish_verdict() after stop()")
            self._inbox.append(entry)
            self._cond.notify_all()

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
        if client is None or not self._connected:
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

    def _messages(self, entry: _Entry) -> list[tuple[str, str, Properties | None]]:
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

    # -- sender thread ---------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._inbox or self._acks or self._kick or self._stopping, timeout=1.0)
                self._kick = False
                new = list(self._inbox)
                acks, self._acks = self._acks, []
                stopping = self._stopping
            try:
                self._step(new, acks, handing=not stopping)
            except Exception:
                # Never let the only delivery thread die; what failed stays queued/spooled and is retried,
                # or, when stopping, stays spooled for the next start.
                log.exception("MQTT sender: unexpected error%s", "" if stopping else " (retrying in 1 s)")
                if stopping:
                    return
                time.sleep(1.0)
                continue
            finally:
                with self._cond:
                    # Drop from the inbox only what _step spooled (it may fail half-way).
                    while self._inbox and self._inbox[0].key is not None:
                        self._inbox.popleft()
                    self._cond.notify_all()
            if stopping:
                return

    def _step(self, new: list[_Entry], acks: list[tuple[int, ReasonCode]], handing: bool) -> None:
        for entry in new:
            if entry.key is None:
                entry.key = self._spool_put(entry)
                self._pending.append(entry)
        for mid, reason in acks:
            entry = self._owner.pop(mid, None)
            if entry is None:
                continue
            entry.mids.discard(mid)
            if reason.is_failure:
                entry.rejected = True
                log.error("MQTT: broker refused verdict seq=%s: %s", entry.verdict.get("seq"), reason)
        while self._pending and self._pending[0].link and not self._pending[0].mids:
            entry = self._pending.popleft()
            self._spool_remove(entry)
            self._counts["rejected" if entry.rejected else "delivered"] += 1
        self._bound_queue()
        if handing:
            self._hand_over()

    def _spool_put(self, entry: _Entry) -> str:
        """The entry's spool key; "" when the disk refuses it: it is then delivered from memory only."""
        try:
            key = self._spool.put(entry.record())
        except OSError as exc:
            self.disk.failed("spool", self.spool_dir, exc, f"verdict seq={entry.verdict.get('seq')} kept in memory "
                             "only (lost on restart)")
            return ""
        self.disk.succeeded("spool")
        return key

    def _spool_remove(self, entry: _Entry) -> None:
        if not entry.key:
            return
        try:
            self._spool.remove(entry.key)
        except OSError as exc:
            self.disk.failed("spool", self.spool_dir / entry.key, exc, "it will be sent again after a restart")

    def _handed(self) -> int:
        """How many verdicts at the front of the queue were handed to paho (they are handed in order)."""
        return sum(1 for _ in itertools.takewhile(lambda e: e.link, self._pending))

    def _bound_queue(self) -> None:
        """Drop the oldest waiting verdicts over the count or age limit (ones already handed to paho stay)."""
        handed = self._handed()
        oldest_allowed = time.time() - self.config.queue_max_age_s
        dropped = 0
        while len(self._pending) > handed and (len(self._pending) > self.config.queue_max_count
                                               or self._pending[handed].queued_at < oldest_allowed):
            entry = self._pending[handed]
            del self._pending[handed]
            self._spool_remove(entry)
            self._counts["overflow" if len(self._pending) >= self.config.queue_max_count else "expired"] += 1
            dropped += 1
        now = time.monotonic()
        if dropped and now - self._last_drop_log >= DROP_LOG_INTERVAL_S:
            self._last_drop_log = now
            log.warning("MQTT: verdict queue over its limit (%d verdicts, %.0f s): dropped oldest; dropped so far %s",
                        self.config.queue_max_count, self.config.queue_max_age_s, self.drops)

    def _hand_over(self) -> None:
        if not self._connected:
            return
        link = self._link
        handed = self._handed()
        in_flight = [e for e in itertools.islice(self._pending, handed) if e.mids]
        # After a reconnect paho resends what it holds first; handing more before that is acknowledged
        # could overtake it and break the order.
        if any(e.link != link for e in in_flight):
            return
        for entry in itertools.islice(self._pending, handed, handed + WINDOW - len(in_flight)):
            entry.link = link
            for topic, payload, props in self._messages(entry):
                try:
                    info = self._client.publish(topic, payload, qos=1, retain=False, properties=props)
                    problem = None if info.rc in ACCEPTED else paho.error_string(info.rc)
                except ValueError as exc:  # a topic paho refuses, e.g. too long
                    problem = str(exc)
                if problem:
                    entry.rejected = True
                    log.error("MQTT: cannot publish verdict seq=%s on %s: %s", entry.verdict.get("seq"), topic, problem)
                    continue
                entry.mids.add(info.mid)
                self._owner[info.mid] = entry

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
                client.subscribe(self.topics.trigger, qos=1)
            client.publish(self.topics.available, self._final, qos=1, retain=True)
            self._link += 1
            self._connected = True
            self._failing = False
            self._kick = True
            self._cond.notify_all()
        log.info("MQTT: connected to %s:%d%s", cfg.host, cfg.port,
                 f" (reconnect {self.reconnects})" if self.reconnects else "")

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
            self._fatal = message
            self._cond.notify_all()
        self._client.disconnect()  # ends paho's reconnect loop: no retry storm against a refusing broker

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Any) -> None:
        with self._cond:
            was_connected, self._connected = self._connected, False
            self._cond.notify_all()
        if was_connected:
            if self._closing:
                log.info("MQTT: disconnected")
            else:
                log.warning("MQTT: connection to %s:%d lost (%s); %d verdict(s) queued, reconnecting",
                            self.config.host, self.config.port, reason, self.queue_depth)

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any) -> None:
        with self._cond:
            self._acks.append((mid, reason))
            self._cond.notify_all()

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        props = getattr(message, "properties", None)  # MQTT v5 only
        response_topic = getattr(props, "ResponseTopic", None)
        correlation = getattr(props, "CorrelationData", None)
        answerable = bool(response_topic) and not any(c in response_topic for c in "+#")
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
