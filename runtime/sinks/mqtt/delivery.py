"""The MQTT sink's delivery: every verdict through one ordered queue, spooled until the broker acknowledges it.

The queue is bounded by ``queue_max_count`` and ``queue_max_age_s`` (the oldest waiting verdicts are dropped,
counted in ``dropped`` and logged), and each verdict is spooled to disk (``spool_dir`` or ``state_dir``, in
``mqtt-spool/<camera>``) until all of its messages are acknowledged (PUBACK), so a broker outage, a daemon
restart during one, or both lose nothing that fits the bounds. A message whose PUBACK was lost is sent again:
duplicates are possible and carry the same ``seq``.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from patchline.runtime.sinks.mqtt.config import MqttConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.mqtt.spool import Spool

log = logging.getLogger(__name__)

# Verdicts handed to paho and not yet acknowledged; more only adds memory that a disconnect makes paho resend.
WINDOW = 20
DROP_LOG_INTERVAL_S = 10.0
SENDER_JOIN_TIMEOUT_S = 5.0  # stop() has flushed already; the sender only has to notice it is stopping
# NO_CONN: the connection dropped just now; paho keeps the message and sends it after the reconnect.
ACCEPTED = (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN)

Messages = Callable[["Entry"], list[tuple[str, str, "Properties | None"]]]  # a verdict's (topic, payload, props)


@dataclass
class Entry:
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
    def from_record(cls, key: str, record: dict) -> Entry:
        verdict = record["verdict"]
        missing = {"seq", "score", "verdict"} - set(verdict)
        if missing:
            raise ValueError(f"verdict lacks {sorted(missing)}")
        corr = record.get("correlation_data")
        return cls(key, float(record["queued_at"]), verdict, record.get("response_topic"),
                   bytes.fromhex(corr) if corr is not None else None)


class Delivery:
    """One camera's queue of verdicts and the sender thread that spools, bounds and hands them to paho in order.

    ``put`` may be called from any thread and only appends to an in-memory inbox; paho's network thread reports
    connections (``link_up``, ``link_down``) and acknowledgements (``acknowledged``). All state is guarded by
    ``cond``, which the sink shares so that its own state and the queue's change together.
    """

    def __init__(self, config: MqttConfig, camera: str, spool_dir: Path, disk: DiskWrites,
                 cond: threading.Condition, messages: Messages) -> None:
        self.config = config
        self.camera = camera
        self.spool_dir = spool_dir
        self.disk = disk  # spool writes the disk refuses: counted, logged
        self._cond = cond
        self._messages = messages
        self._inbox: deque[Entry] = deque()
        self._acks: list[tuple[int, ReasonCode]] = []
        self._pending: deque[Entry] = deque()  # sender thread only: spooled, in order, handed ones first
        self._owner: dict[int, Entry] = {}
        self._link = 0
        self._connected = False
        self._stopping = False
        self._kick = False  # connected: hand over what waited for the broker now, not at the next tick
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
    def drained(self) -> bool:
        """Connected, and every verdict acknowledged (call it holding ``cond``)."""
        return self._connected and not self._inbox and not self._pending

    @property
    def queue_depth(self) -> int:
        """Verdicts not yet acknowledged by the broker (waiting, in flight, or not yet spooled)."""
        return len(self._inbox) + len(self._pending)

    @property
    def spooled(self) -> int:
        """Verdicts spooled and not acknowledged; once stopped, those kept for the next start."""
        return len(self._pending)

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
    def stopped(self) -> bool:
        return self._stopping

    @property
    def reconnects(self) -> int:
        """Successful connections after the first."""
        return max(0, self._link - 1)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, client: paho.Client) -> None:
        """Recover what an earlier run left in the spool (to be delivered first), then start the sender."""
        self._spool = Spool(self.spool_dir)
        records, corrupt = self._spool.load()
        self._counts["corrupt"] += corrupt
        for key, record in records:
            try:
                self._pending.append(Entry.from_record(key, record))
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

    def stop(self) -> None:
        """End the sender; what is not acknowledged stays in the spool."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._sender is not None:
            self._sender.join(SENDER_JOIN_TIMEOUT_S)
            if self._sender.is_alive():
                log.error("MQTT: the sender thread did not end within %.0f s; stopping without it",
                          SENDER_JOIN_TIMEOUT_S)

    # -- events ----------------------------------------------------------------------------------

    def put(self, entry: Entry) -> None:
        with self._cond:
            self._inbox.append(entry)
            self._cond.notify_all()

    def link_up(self) -> None:
        """A connection was made: what waited for the broker is handed over at once, on this link."""
        with self._cond:
            self._link += 1
            self._connected = True
            self._kick = True
            self._cond.notify_all()

    def link_down(self) -> bool:
        """The connection is gone; whether there was one."""
        with self._cond:
            was_connected, self._connected = self._connected, False
            self._cond.notify_all()
        return was_connected

    def acknowledged(self, mid: int, reason: ReasonCode) -> None:
        with self._cond:
            self._acks.append((mid, reason))
            self._cond.notify_all()

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

    def _step(self, new: list[Entry], acks: list[tuple[int, ReasonCode]], handing: bool) -> None:
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

    def _spool_put(self, entry: Entry) -> str:
        """The entry's spool key; "" when the disk refuses it: it is then delivered from memory only."""
        try:
            key = self._spool.put(entry.record())
        except OSError as exc:
            self.disk.failed("spool", self.spool_dir, exc, f"verdict seq={entry.verdict.get('seq')} kept in memory "
                             "only (lost on restart)")
            return ""
        self.disk.succeeded("spool")
        return key

    def _spool_remove(self, entry: Entry) -> None:
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
