"""Trigger mode: each PLC trigger is answered with the first frame captured at or after it arrived.

A reader thread takes every frame from the source as it comes, whatever the model is doing,
and hands it to each waiting trigger that arrived at or before its capture time and has no
frame yet; the trigger keeps that frame until the model gets to it, however long earlier
triggers take. A short ring of recent frames covers a frame captured after a trigger arrived
but read before the trigger was registered. Triggers are answered in the order they came;
one not inspected within ``timeout_s`` of its arrival is given up with the truth:
``no_frame`` when no frame came at or after it, ``model_busy`` when its frame was there but
the model was busy with earlier triggers.

``Trigger``, ``parse_trigger`` and ``check_part_id`` are the input side every protocol shares: a sink that takes
triggers checks its part ids here and hands each ``Trigger`` to the daemon.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from patchline.runtime.sources.base import Frame, FrameSource

RING = 8  # recent frames kept for triggers registered after their frame was read
READ_TIMEOUT_S = 0.5  # the reader checks for stop at least this often
MAX_PART_ID = 128


@dataclass(frozen=True)
class Trigger:
    """A PLC's request to inspect the next frame."""

    part_id: str
    received: float  # wall clock (time.time()) when the trigger arrived
    response_topic: str | None = None  # MQTT v5 request/response
    correlation_data: bytes | None = None


def parse_trigger(payload: bytes) -> str:
    """The part id in a trigger payload: JSON ``{"part_id": ...}``, a JSON string/number, or plain text.

    Raises ValueError saying what is wrong.
    """
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("payload is not UTF-8 text") from None
    if not text:
        raise ValueError("payload is empty; send {\"part_id\": \"...\"} or the part id as plain text")
    try:
        value: Any = json.loads(text)
    except ValueError:
        if text[0] in "{[\"":
            raise ValueError("payload looks like JSON but does not parse") from None
        value = text
    if isinstance(value, dict):
        if "part_id" not in value:
            raise ValueError("JSON object has no part_id")
        value = value["part_id"]
    return check_part_id(value)


def check_part_id(value: object) -> str:
    """``value`` as a part id (a string, or an integer as its decimal digits), whatever protocol brought it.

    Raises ValueError saying what is wrong.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"part_id must be a string or an integer, got {type(value).__name__}")
    part_id = str(value).strip()
    if not part_id or len(part_id) > MAX_PART_ID or not part_id.isprintable():
        raise ValueError(f"part_id must be 1..{MAX_PART_ID} printable characters")
    return part_id


@dataclass
class Waiting:
    """A trigger, when it arrived (time.monotonic()), and its frame once one was captured at or after that."""

    trigger: Trigger
    arrived: float
    frame: Frame | None = None


class TriggeredFrames:
    """Pairs triggers with frames for the daemon's trigger mode; ``take`` gives them to the model in order."""

    def __init__(self, source: FrameSource, timeout_s: float, max_pending: int) -> None:
        self.source = source
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.frames_seen = 0
        self._cond = threading.Condition()
        self._waiting: deque[Waiting] = deque()
        self._ring: deque[Frame] = deque(maxlen=RING)
        self._ended: Exception | None = None  # what stopped the reader (EndOfStream, SourceConfigError …)
        self._stopping = False
        self._reader = threading.Thread(target=self._read_loop, name="frame-reader", daemon=True)

    def start(self) -> None:
        self._reader.start()

    def add(self, trigger: Trigger, arrived: float) -> tuple[str, str] | None:
        """Register a trigger; (reason, detail) when it is refused instead."""
        with self._cond:
            if self._stopping:
                return "stopping", "the daemon is stopping; trigger not inspected"
            if len(self._waiting) >= self.max_pending:
                return "too_many_triggers", f"{self.max_pending} triggers already waiting for a frame"
            frame = next((f for f in self._ring if f.monotonic >= arrived), None)
            self._waiting.append(Waiting(trigger, arrived, frame))
            self._cond.notify_all()
        return None

    def _read_loop(self) -> None:
        while not self._stopping:
            try:
                frame = self.source.read(READ_TIMEOUT_S)
            except Exception as exc:  # end of stream, a source that can never work: the daemon decides
                with self._cond:
                    self._ended = exc
                    self._cond.notify_all()
                return
            if frame is None:
                continue
            with self._cond:
                self.frames_seen += 1
                self._ring.append(frame)
                for waiting in self._waiting:
                    if waiting.frame is None and frame.monotonic >= waiting.arrived:
                        waiting.frame = frame
                self._cond.notify_all()

    def take(self, timeout: float) -> tuple[Waiting | None, list[tuple[Waiting, str, str]]]:
        """The oldest trigger once it has its frame (None after ``timeout``), and the triggers given up on
        meanwhile with (reason, detail). Raises what ended the reader."""
        given_up = []
        with self._cond:
            deadline = time.monotonic() + timeout
            while True:
                now = time.monotonic()
                while self._waiting and now - self._waiting[0].arrived > self.timeout_s:
                    waiting = self._waiting.popleft()
                    given_up.append((waiting, *self._why(waiting)))
                if self._waiting and self._waiting[0].frame is not None:
                    return self._waiting.popleft(), given_up
                if self._ended is not None:
                    if given_up:
                        return None, given_up
                    raise self._ended
                if now >= deadline:
                    return None, given_up
                wake = deadline
                if self._waiting:
                    wake = min(wake, self._waiting[0].arrived + self.timeout_s)
                self._cond.wait(max(0.0, wake - now) + 0.001)

    def _why(self, waiting: Waiting) -> tuple[str, str]:
        limit = f"{self.timeout_s:g} s"
        if waiting.frame is None:
            return "no_frame", f"no frame captured within {limit} after the trigger"
        delay = (waiting.frame.monotonic - waiting.arrived) * 1000.0
        return "model_busy", (f"its frame was captured {delay:.0f} ms after the trigger, but the model was busy "
                              f"with earlier triggers for {limit}")

    def stop(self) -> list[Waiting]:
        """Stop the reader (refusing new triggers); the triggers still waiting, to be answered ``stopping``."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
        if self._reader.is_alive():
            self._reader.join(READ_TIMEOUT_S * 4)
        return waiting
