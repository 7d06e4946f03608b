"""A warning that can repeat many times a second (corrupt frames, a full disk), logged without flooding and
without hiding what it was about.

The first one is logged at once; then at most one line per ``interval``, which counts the ones folded
in since the last line and names their subjects (the files, the frames): the rate is throttled, never
the names. ``flush()``, called from a loop that runs anyway, writes what was folded in once the interval
has passed, so the last burst is named even when nothing follows it.
"""

from __future__ import annotations

import logging
import threading
import time

MAX_NAMED = 50  # subjects named in one line; beyond that, how many more


class ThrottledLog:
    """One kind of repeating warning; thread-safe (GStreamer's streaming threads log here too)."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.logger = logger
        self.interval = interval
        self.level = level
        self._lock = threading.Lock()
        self._last_line = -float("inf")
        self._folded: list[tuple[str, str | None]] = []  # (message, subject) held back since the last line

    def __call__(self, message: str, subject: str | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_line < self.interval:
                self._folded.append((message, subject))
                return
            line = self._take(message, now)
        self.logger.log(self.level, "%s", line)

    def flush(self, force: bool = False) -> None:
        """Log what was folded in, once ``interval`` has passed since the last line (at once with ``force``)."""
        now = time.monotonic()
        with self._lock:
            if not self._folded or (now - self._last_line < self.interval and not force):
                return
            line = self._take(self._folded.pop()[0], now)
        self.logger.log(self.level, "%s", line)

    def reset(self) -> None:
        """Forget what was folded in (the condition is over and was reported so); the next one logs at once."""
        with self._lock:
            self._last_line, self._folded = -float("inf"), []

    def _take(self, message: str, now: float) -> str:
        folded = len(self._folded)
        subjects = [subject for _, subject in self._folded if subject is not None]
        self._last_line, self._folded = now, []
        if not folded:
            return message
        named = ", ".join(subjects[:MAX_NAMED]) + (f" and {len(subjects) - MAX_NAMED} more" if len(subjects) >
                                                   MAX_NAMED else "")
        return f"{message} (and {folded} more like it in the last {self.interval:g} s{': ' + named if named else ''})"
