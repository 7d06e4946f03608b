"""The folder source: each new image file dropped into a folder, once, oldest first."""

from __future__ import annotations

import logging
import os
import stat
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.preprocess import IMAGE_SUFFIXES, ImageError, decode_image
from patchline.runtime.sources.base import (CorruptFrame, RawFrame, SourceContext, SourceCounters, SourceError,
                                            SourceSection, register)
from patchline.runtime.sources.inspected_files import InspectedFiles

log = logging.getLogger("patchline.source")

RELIST_S = 5.0
CLOCK_SLACK_S = 1.0


class FolderSourceConfig(SourceSection):
    """Images dropped into a folder: each new file once, oldest first (offline lines, tests)."""

    kind: Literal["folder"]
    path: str = Field(min_length=1)
    poll_interval_s: float = Field(0.2, gt=0)
    after_read: Literal["keep", "delete"] = "keep"
    # An idle folder is normal on an offline line: no watchdog unless asked for.
    start_timeout_s: float | None = Field(None, gt=0)
    stall_timeout_s: float | None = Field(None, gt=0)


class FolderBackend:
    """New image files in a folder, each once, oldest first.

    A file is taken once its size and mtime held still between two polls, so a writer may
    copy in place; writing to a hidden name (".x.png") and renaming is faster still. With a
    ``memory`` file (the daemon's state directory) the names of inspected files outlive a
    restart (inspected_files.py). Entries that cannot be stat'ed or read (a symlink
    loop, no permission, a folder named like an image) are skipped, counted once and named.
    """

    def __init__(self, config: FolderSourceConfig, counters: SourceCounters | None = None,
                 memory: Path | None = None, disk: DiskWrites | None = None) -> None:
        self.config = config
        self.root = Path(config.path)
        self.counters = counters or SourceCounters()
        self.description = f"folder {self.root}"
        self._seen = InspectedFiles(self.root, memory, disk or DiskWrites())
        self._pending: dict[str, tuple[int, float]] = {}  # name → (size, mtime) at the last poll
        self._unusable: set[str] = set()  # entries skipped (and counted) while they stay as they are
        self._listed_mtime: int | None = None  # the folder's mtime (ns) at the last listing
        self._listed_at = -float("inf")  # monotonic time of that listing
        self._listed_trusted = False

    def open(self) -> None:
        if not self.root.is_dir():
            raise SourceError(f"{self.root}: not a folder")

    def _ready(self) -> list[tuple[float, str]]:
        """Files not yet inspected whose size and mtime held still since the last poll, oldest first.

        An idle poll of a folder that keeps thousands of inspected files costs one stat of the folder: while its
        mtime (which every create, rename and delete updates) stays as it was at a listing, only the files still
        settling are looked at again. The mtime is trusted only when older than that listing by CLOCK_SLACK_S
        (a file system's coarse clock can give a later change the same mtime), and the folder is listed again
        at least every RELIST_S whatever it says (remote file systems).
        """
        folder = os.stat(self.root).st_mtime_ns
        now = time.monotonic()
        if folder == self._listed_mtime and self._listed_trusted and now - self._listed_at < RELIST_S:
            candidates = {name: info for name in self._pending
                          if name not in self._seen and (info := self._stat(name)) is not None}
        else:
            self._listed_trusted = folder < time.time_ns() - CLOCK_SLACK_S * 1e9
            candidates = self._list()
            self._listed_mtime, self._listed_at = folder, now
        ready = [(mtime, name) for name, (size, mtime) in candidates.items() if self._pending.get(name) == (size, mtime)]
        self._pending = candidates
        return sorted(ready)

    def _list(self) -> dict[str, tuple[int, float]]:
        """(size, mtime) of the folder's image files not yet inspected; forgets names no longer there."""
        names = {name for name in os.listdir(self.root)
                 if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)}
        self._seen.keep_only(names)
        candidates: dict[str, tuple[int, float]] = {}
        unusable: set[str] = set()
        for name in names - self._seen.names:  # set arithmetic: inspected files cost nothing more
            try:
                info = os.stat(self.root / name)  # follows a symlink
            except FileNotFoundError:
                continue  # gone since it was listed
            except OSError as exc:
                unusable.add(name)
                self._skip(name, exc.strerror or str(exc))
                continue
            if not stat.S_ISREG(info.st_mode):
                unusable.add(name)
                self._skip(name, "not a regular file")
                continue
            candidates[name] = (info.st_size, info.st_mtime)
        self._unusable = unusable
        return candidates

    def _stat(self, name: str) -> tuple[int, float] | None:
        try:
            info = os.stat(self.root / name)
        except OSError:
            return None  # gone or changed into something unusable: the next listing tells
        return info.st_size, info.st_mtime

    def _skip(self, name: str, reason: str) -> None:
        if name not in self._unusable:
            self.counters.unreadable += 1
            log.warning("source %s: skipping %s: %s", self.description, self.root / name, reason)

    def pull(self, timeout: float) -> RawFrame | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                ready = self._ready()
            except OSError as exc:
                raise SourceError(f"{self.root}: {exc.strerror}") from None
            for mtime, name in ready:
                frame = self._take(mtime, name)
                if frame is not None:
                    return frame
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.config.poll_interval_s, remaining))

    def _take(self, mtime: float, name: str) -> RawFrame | None:
        """The file's frame; None when it cannot be read (counted, named); CorruptFrame when it cannot be decoded."""
        self._seen.add(name)  # before reading: a file that brought the daemon down is not read again
        path = self.root / name
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.counters.unreadable += 1
            log.warning("source %s: skipping %s: cannot read: %s", self.description, path, exc.strerror or exc)
            return None
        finally:
            if self.config.after_read == "delete":
                path.unlink(missing_ok=True)
        try:
            image = decode_image(data, path, self.config.max_pixels)
        except Exception as exc:  # ImageError, or whatever else a decoder raises: this file only
            raise CorruptFrame(str(exc) if isinstance(exc, ImageError) else f"{path}: {type(exc).__name__}: {exc}",
                               name) from None
        age = max(0.0, time.time() - mtime)
        return RawFrame(image, time.monotonic() - age, name)

    def close(self) -> None:
        pass


@register(FolderSourceConfig)
def open_folder(config: FolderSourceConfig, context: SourceContext) -> FolderBackend:
    return FolderBackend(config, memory=context.memory, disk=context.disk)
