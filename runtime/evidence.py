"""NG evidence on the edge box: the frame and its heatmap overlay, under a size quota.

Each NG verdict gets a folder ``<dir>/<UTC time>_seq<N>/`` with ``frame.<fmt>`` and
``heatmap.jpg``. Writing happens on a thread of its own so that PNG encoding never delays
the next frame; when the writer falls behind, evidence (not the verdict) is dropped and
counted. After each write the oldest folders are deleted until the total fits the quota.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from patchline.runtime.overlay import heatmap_overlay, write_rgb
from patchline.runtime.verdict import iso_utc

log = logging.getLogger("patchline.evidence")
BACKLOG = 8  # NG frames waiting to be written; beyond this, evidence is dropped


@dataclass
class _Job:
    folder: Path
    image: np.ndarray
    amap: np.ndarray


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class EvidenceStore:
    def __init__(self, root: str | Path, quota_mb: float, image_format: str = "png") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.quota = int(quota_mb * 1024 * 1024)
        self.image_format = image_format
        self.saved = 0
        self.dropped = 0
        self.failed = 0
        # Folder names start with the UTC time, so sorting them sorts by age.
        self._folders = [(p, _folder_size(p)) for p in sorted(self.root.iterdir()) if p.is_dir()]
        self._used = sum(size for _, size in self._folders)
        self._jobs: queue.Queue[_Job | None] = queue.Queue(BACKLOG)
        self._thread = threading.Thread(target=self._write_loop, name="evidence", daemon=True)
        self._thread.start()

    def submit(self, seq: int, timestamp: float, image: np.ndarray, amap: np.ndarray) -> str | None:
        """Queue a frame and its anomaly map; the folder it will be written to, or None when dropped."""
        stamp = iso_utc(timestamp).replace(":", "").replace("-", "")
        folder = self.root / f"{stamp}_seq{seq:09d}"
        try:
            self._jobs.put_nowait(_Job(folder, image, amap))
        except queue.Full:
            self.dropped += 1
            log.warning("evidence writer behind (%d waiting): NG frame seq=%d not saved", BACKLOG, seq)
            return None
        return str(folder)

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                write_rgb(job.folder / f"frame.{self.image_format}", job.image)
                write_rgb(job.folder / "heatmap.jpg", heatmap_overlay(job.image, job.amap))
                size = _folder_size(job.folder)
            except Exception as exc:  # any failure costs this one folder, never the writer thread
                self.failed += 1
                log.error("evidence %s not saved: %s", job.folder, exc)
                shutil.rmtree(job.folder, ignore_errors=True)
                continue
            self._folders.append((job.folder, size))
            self._used += size
            self.saved += 1
            self._enforce_quota()

    def _enforce_quota(self) -> None:
        while self._used > self.quota and len(self._folders) > 1:
            oldest, size = self._folders.pop(0)
            shutil.rmtree(oldest, ignore_errors=True)
            self._used -= size
            log.debug("evidence quota: deleted %s", oldest)

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
