"""Failed writes to the edge box's disk: counted, logged without flooding, and told when they work again.

A full disk (ENOSPC) or a failing one (EIO) fails every write of the same kind, many a second;
each kind of write (the seq counter, the MQTT spool, evidence, the folder source's memory) logs
its first failure at once, then at most one line per LOG_INTERVAL_S with how many it folded
in, and one line when a write of that kind succeeds again. Nothing here raises: the caller
decides what a failed write costs and says so in ``consequence``.
"""

from __future__ import annotations

import errno
import logging
import threading

from patchline.runtime.throttled_log import ThrottledLog

log = logging.getLogger("patchline.disk")
LOG_INTERVAL_S = 10.0


class DiskWrites:
    """Counts of failed writes by (what, error name), e.g. ("seq_counter", "ENOSPC"); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._failing: dict[str, int] = {}  # what → failures since its last successful write
        self._logs: dict[str, ThrottledLog] = {}

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def failed(self, what: str, target: object, exc: OSError, consequence: str) -> None:
        """Record a failed write of ``what`` (to ``target``, a path) and log it, throttled per ``what``."""
        error = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
        with self._lock:
            self._counts[what, error] = self._counts.get((what, error), 0) + 1
            self._failing[what] = self._failing.get(what, 0) + 1
            throttled = self._logs.setdefault(what, ThrottledLog(log, LOG_INTERVAL_S, logging.ERROR))
        throttled(f"disk: cannot write {what.replace('_', ' ')} {target}: {exc.strerror or exc}; {consequence}")

    def flush(self) -> None:
        """Log the failures folded in since the last line (called from the frame loop)."""
        with self._lock:
            logs = list(self._logs.values())
        for throttled in logs:
            throttled.flush()

    def succeeded(self, what: str) -> None:
        """A write of ``what`` worked: say so once if writes of that kind were failing."""
        with self._lock:
            failures = self._failing.pop(what, 0)
            throttled = self._logs.get(what)
        if failures:
            throttled.flush(force=True)  # what was folded in comes before the news that it is over
            throttled.reset()
            log.warning("disk: writes of the %s work again (after %d failed)", what.replace("_", " "), failures)
