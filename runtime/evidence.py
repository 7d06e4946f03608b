"""NG evidence on the edge box: the frame and its heatmap overlay, under a size quota and a free-space floor.

Each NG verdict gets a folder ``<dir>/<UTC time>_seq<N>/`` with ``frame.<fmt>`` and
``heatmap.jpg``. Writing happens on a thread of its own so that PNG encoding never delays
the next frame; when the writer falls behind, evidence (not the verdict) is dropped and
counted. Before each write the oldest folders are deleted until the new one fits the quota
and leaves ``min_free_mb`` free on the disk; when even deleting all of them cannot make
that room, or the disk refuses the write, the frame is not saved.

A verdict names its evidence only once the files exist (``InOrder``): an NG verdict waits for
the writer, the verdicts after it wait behind it, and one whose evidence could not be saved
says ``"evidence": null`` and why in ``evidence_error``.
"""

from __future__ import annotations

import errno
import logging
import queue
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.overlay import encode_rgb, heatmap_overlay
from patchline.runtime.verdict import iso_utc

if TYPE_CHECKING:
    from patchline.runtime.triggers import Trigger

log = logging.getLogger("patchline.evidence")
BACKLOG = 8  # NG frames waiting to be written; beyond this, evidence is dropped
MB = 1024 * 1024

# Why a verdict's evidence is null (its ``evidence_error``).
DISABLED = "disabled"  # evidence.enabled is false
BACKLOG_FULL = "backlog_full"  # the writer was BACKLOG frames behind
NO_SPACE = "no_space"  # it would leave less than evidence.min_free_mb free, even with all older evidence deleted
WRITE_FAILED = "write_failed"  # the disk refused a write (or the frame could not be encoded)
NOT_WRITTEN = "not_written"  # the daemon stopped before the writer got to it

Done = Callable[[str | None, str | None], None]  # (folder, None) once written, else (None, why)


@dataclass
class _Job:
    folder: Path
    image: np.ndarray
    amap: np.ndarray
    done: Done


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class EvidenceStore:
    def __init__(self, root: str | Path, quota_mb: float, image_format: str = "png", min_free_mb: float = 0.0,
                 disk: DiskWrites | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota = int(quota_mb * MB)
        self.min_free = int(min_free_mb * MB)
        self.image_format = image_format
        self.disk = disk or DiskWrites()
        self.saved = 0
        self.dropped = 0
        self.failed = 0
        self.no_space = 0
        # Folder names start with the UTC time, so sorting them sorts by age.
        self._folders = deque((p, _folder_size(p)) for p in sorted(self.root.iterdir()) if p.is_dir())
        self._used = sum(size for _, size in self._folders)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(BACKLOG)
        self._thread = threading.Thread(target=self._write_loop, name="evidence", daemon=True)
        self._thread.start()

    def submit(self, seq: int, timestamp: float, image: np.ndarray, amap: np.ndarray, done: Done) -> None:
        """Queue a frame and its anomaly map; ``done`` is called with the folder once it is written (on the
        writer's thread), or with None and the reason when it is not (at once when the backlog is full)."""
        stamp = iso_utc(timestamp).replace(":", "").replace("-", "")
        folder = self.root / f"{stamp}_seq{seq:09d}"
        try:
            self._jobs.put_nowait(_Job(folder, image, amap, done))
        except queue.Full:
            self.dropped += 1
            log.warning("evidence writer behind (%d waiting): NG frame seq=%d not saved", BACKLOG, seq)
            done(None, BACKLOG_FULL)

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job.done(*self._write(job))

    def _write(self, job: _Job) -> tuple[str | None, str | None]:
        try:
            files = {f"frame.{self.image_format}": encode_rgb(job.image, self.image_format),
                     "heatmap.jpg": encode_rgb(heatmap_overlay(job.image, job.amap), "jpg")}
        except Exception as exc:  # a frame that cannot be encoded costs its evidence, never the writer thread
            self.failed += 1
            log.error("evidence %s not saved: %s", job.folder, exc)
            return None, WRITE_FAILED
        size = sum(len(data) for data in files.values())
        try:
            free = self._make_room(size)
            if free - size < self.min_free:
                self.no_space += 1
                self.disk.failed("evidence", job.folder, OSError(errno.ENOSPC, (
                    f"{free / MB:.1f} MB free on the disk, evidence.min_free_mb is {self.min_free / MB:g}")),
                    "NG frame not saved")
                return None, NO_SPACE
            job.folder.mkdir(parents=True)
            for name, data in files.items():
                (job.folder / name).write_bytes(data)
        except OSError as exc:
            self.failed += 1
            self.disk.failed("evidence", job.folder, exc, "NG frame not saved")
            shutil.rmtree(job.folder, ignore_errors=True)
            return None, WRITE_FAILED
        self.disk.succeeded("evidence")
        self._folders.append((job.folder, size))
        self._used += size
        self.saved += 1
        return str(job.folder), None

    def _make_room(self, size: int) -> int:
        """Delete the oldest folders until ``size`` more bytes fit the quota and leave min_free on the disk, or
        none is left; the bytes free then. The newest folder is kept even when it alone is over the quota."""
        free = shutil.disk_usage(self.root).free
        while self._folders and (self._used + size > self.quota or free - size < self.min_free):
            oldest, used = self._folders.popleft()
            shutil.rmtree(oldest, ignore_errors=True)
            self._used -= used
            log.debug("evidence quota: deleted %s", oldest)
            free = shutil.disk_usage(self.root).free
        return free

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (for up to ``timeout`` s), then stop the writer."""
        deadline = time.monotonic() + timeout
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            pass  # the writer is stuck on a full backlog; the join below gives up in time too
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.error("evidence writer did not finish within %.0f s; %d NG frame(s) left unwritten",
                      timeout, self._jobs.qsize())


@dataclass
class _Held:
    verdict: dict
    trigger: Trigger | None
    waiting: bool


class InOrder:
    """Hands verdicts to ``publish`` in the order they were made; a held one (an NG verdict whose evidence is
    being written) and those after it go once its evidence is settled. Thread-safe."""

    def __init__(self, publish: Callable[[dict, Trigger | None], None]) -> None:
        self._publish = publish
        self._lock = threading.Lock()
        self._queue: deque[_Held] = deque()

    def publish(self, verdict: dict, trigger: Trigger | None = None) -> None:
        with self._lock:
            self._queue.append(_Held(verdict, trigger, False))
            self._flush()

    def hold(self, verdict: dict, trigger: Trigger | None = None) -> Done:
        """Queue ``verdict`` until the returned callable is given its evidence folder, or None and why."""
        held = _Held(verdict, trigger, True)
        with self._lock:
            self._queue.append(held)

        def settle(folder: str | None, error: str | None) -> None:
            with self._lock:
                if held.waiting:
                    self._settle(held, folder, error)
                    self._flush()

        return settle

    def release(self, error: str) -> None:
        """Publish every verdict still held, its evidence null for ``error`` (the daemon is stopping)."""
        with self._lock:
            for held in self._queue:
                if held.waiting:
                    self._settle(held, None, error)
            self._flush()

    @staticmethod
    def _settle(held: _Held, folder: str | None, error: str | None) -> None:
        held.verdict["evidence"], held.verdict["evidence_error"] = folder, error
        held.waiting = False

    def _flush(self) -> None:
        while self._queue and not self._queue[0].waiting:
            held = self._queue.popleft()
            self._publish(held.verdict, held.trigger)
