"""The verdict message a camera publishes per inspected frame, and its sequence number.

Contract (the daemon builds one verdict per inspected frame)::

    seq = SeqCounter(state_dir / f"{camera}.seq")
    verdict = make_verdict(camera=camera, seq=seq.next(),  # OSError: not recorded, so publish nothing
                           timestamp=capture_wall_time, frame_age_s=age, decision=decide(...),
                           location=inspection.location, latency_ms={**inspection.timings_ms, "decode": ...},
                           model_id=manifest.model_id, artifact_checksum=inspector.checksum,
                           part_id=trigger.part_id)
    sink.publish_verdict(verdict, trigger)   # an NG verdict first waits for its evidence (evidence.InOrder)

The payload's JSON Schema ships next to this module as ``verdict.schema.json`` (``SCHEMA_PATH``);
``SCHEMA_VERSION`` changes whenever a field changes meaning or is removed (adding one does not).
"""

from __future__ import annotations

import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.decision import Decision

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("verdict.schema.json")


# Numbers reserved durably (fdatasync) at a time; a sync costs milliseconds on an edge box's disk, the
# plain write in between microseconds.
RESERVE = 1000
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
BOOT_ID_WIDTH = 36  # a UUID; the record has a fixed width so that it can be rewritten in place


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()[:BOOT_ID_WIDTH] or "unknown"
    except OSError:
        return "unknown"


class SeqCounter:
    """A per-camera sequence number that only ever grows, also across restarts, power cuts and a full disk.

    The file holds ``<last> <reserved> <boot id>`` as one fixed-width record. Every ``next()`` records
    its number before returning it, by rewriting that record in place (no fsync): an overwrite of
    bytes the file already has needs no free space, so a full disk does not stop the numbering. Every
    RESERVE numbers the reservation is raised and synced first. A restart of the daemon in the same
    boot continues right after ``last`` (the page cache survives it), so the PLC sees no gap; after a
    reboot, when ``last`` may not have reached the disk, it continues after ``reserved``: a gap, never
    a repeat. The record (79 bytes) lies within the file's first sector, which a power cut leaves
    old or new. When the record cannot be written at all (EIO, a file that cannot be created on a
    full disk), ``next()`` raises OSError and hands out no number: a verdict is better not published
    than published under a number that could come again. A file holding just one integer (an
    operator's repair) continues after it. Thread-safe; one process per file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._boot = _boot_id()
        last, self._reserved, boot = self._read()
        self._value = last if boot == self._boot else self._reserved
        self._fd: int | None = None  # the file, once it holds a record of ours

    def _read(self) -> tuple[int, int, str]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return 0, 0, self._boot
        except OSError as exc:
            raise ValueError(f"sequence counter {self.path}: cannot read: {exc.strerror}") from exc
        parts = text.split()
        try:
            last = reserved = int(parts[0])
            boot = ""
            if len(parts) == 3:
                reserved, boot = int(parts[1]), parts[2]
            elif len(parts) != 1:
                raise ValueError
            if not 0 <= last <= reserved:
                raise ValueError
        except (IndexError, ValueError):
            # Refuse rather than restart at 1: repeated numbers would look like redeliveries downstream.
            raise ValueError(f"sequence counter {self.path}: unreadable content {text[:60]!r};"
                             " restore it or write the last seq the PLC saw into it") from None
        return last, reserved, boot

    def next(self) -> int:
        """The next number, recorded first. Raises OSError, handing out nothing, when it cannot be recorded."""
        with self._lock:
            value = self._value + 1
            reserved = self._reserved if value <= self._reserved else value + RESERVE - 1
            record = f"{value:020d} {reserved:020d} {self._boot:<{BOOT_ID_WIDTH}}\n".encode()
            if self._fd is None:
                self._fd = self._create(record)
            else:
                os.pwrite(self._fd, record, 0)
                if reserved != self._reserved:
                    os.fdatasync(self._fd)
            self._value, self._reserved = value, reserved
            return value

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _create(self, record: bytes) -> int:
        """Open the file for rewriting in place, first writing it whole (durably) when it is missing or
        not a record of ours (an older layout, an operator's repair)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            fd = None
        if fd is not None:
            if os.fstat(fd).st_size == len(record):
                try:
                    os.pwrite(fd, record, 0)
                    os.fdatasync(fd)
                    return fd
                except OSError:
                    os.close(fd)
                    raise
            os.close(fd)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, record, fsync=True)
        return os.open(self.path, os.O_RDWR)


def iso_utc(timestamp: float) -> str:
    """``2024-05-01T12:00:00.123Z``: ISO-8601, UTC, milliseconds."""
    return datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def epoch_seconds(iso: str) -> float:
    """The inverse of :func:`iso_utc`. Python 3.10's ``fromisoformat`` does not read the ``Z`` suffix (3.11's does)."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"verdict field {name} must be a finite number, got {value}")
    return value


def make_verdict(
    *,
    camera: str,
    seq: int,
    timestamp: float,
    frame_age_s: float,
    decision: Decision,
    location: tuple[int, int],
    latency_ms: dict[str, float],
    model_id: str,
    artifact_checksum: str,
    part_id: str | None = None,
    evidence: str | None = None,
    evidence_error: str | None = None,
) -> dict:
    """The verdict payload (a JSON-ready dict that validates against ``verdict.schema.json``).

    ``timestamp`` is the frame's capture time (Unix seconds, wall clock); ``frame_age_s`` how old the
    frame was when it was scored (>= 0, from a monotonic clock); ``location`` the (x, y) of the most
    anomalous patch in the source image's pixels; ``latency_ms`` named stage times in milliseconds;
    ``evidence`` the saved NG frame's folder, once it exists, else None and ``evidence_error`` says why.
    Raises ValueError on a value that would make an invalid message (NaN score, negative age, ...).
    """
    if seq < 1:
        raise ValueError(f"verdict seq must be >= 1, got {seq}")
    if decision.verdict not in ("OK", "NG"):
        raise ValueError(f"verdict must be 'OK' or 'NG', got {decision.verdict!r}")
    age = _finite("frame_age_s", frame_age_s)
    if age < 0:
        raise ValueError(f"verdict frame_age_s must be >= 0, got {age} (measure it with a monotonic clock)")
    x, y = (int(v) for v in location)
    latency = {name: round(_finite(f"latency_ms.{name}", ms), 3) for name, ms in latency_ms.items()}
    if any(ms < 0 for ms in latency.values()):
        raise ValueError(f"verdict latency_ms must not be negative: {latency}")
    return {
        "schema_version": SCHEMA_VERSION,
        "camera": camera,
        "seq": int(seq),
        "part_id": part_id,
        "timestamp": iso_utc(_finite("timestamp", timestamp)),
        "frame_age_ms": round(age * 1000.0, 3),
        "score": _finite("score", decision.score),
        "normalised_score": None if decision.normalised is None else _finite("normalised_score", decision.normalised),
        "threshold": _finite("threshold", decision.threshold),
        "verdict": decision.verdict,
        "location": {"x": x, "y": y},
        "latency_ms": latency,
        "model_id": model_id,
        "artifact_checksum": artifact_checksum,
        "evidence": evidence,
        "evidence_error": evidence_error,
    }
