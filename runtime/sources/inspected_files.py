"""The folder source's memory of the files it has inspected, kept across restarts of the daemon.

With ``after_read: keep`` the inspected files stay in the folder; without a memory a restart
would inspect every one of them again. The names go to a journal in the state directory: a
first line naming the folder, then one JSON string per inspected file, appended (no fsync:
the page cache survives a restart of the daemon) *before* the file is read, so that a file
which brought the daemon down is not read again after the restart. Names of files that
left the folder are forgotten, and the journal is rewritten without them once it holds
twice as many lines as there are names to remember (plus COMPACT_SLACK): it stays bounded
by what the folder holds. A journal written for another folder is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.disk_writes import DiskWrites

log = logging.getLogger("patchline.source")
COMPACT_SLACK = 1000


class InspectedFiles:
    """Names of files of ``folder`` already inspected; remembered in ``journal`` (in memory only when None)."""

    def __init__(self, folder: Path, journal: Path | None, disk: DiskWrites) -> None:
        self.folder = str(Path(folder).resolve())
        self.journal = journal
        self.disk = disk
        self.names: set[str] = set()
        self._fd: int | None = None  # the journal, open for appending
        self._size = 0  # bytes of the journal known to be whole lines
        self._lines = 0
        if journal is not None:
            self._load()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _load(self) -> None:
        try:
            lines = self.journal.read_bytes().decode("utf-8", "surrogateescape").splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("folder source: cannot read its memory %s (%s); files already in %s will be inspected again",
                      self.journal, exc.strerror, self.folder)
            return
        try:
            header = json.loads(lines[0])["folder"] if lines else None
        except (ValueError, TypeError, KeyError):
            header = None
        if header != self.folder:
            log.info("folder source: %s remembers files of %s, not of %s: starting afresh", self.journal, header,
                     self.folder)
            return
        for line in lines[1:]:
            try:
                name = json.loads(line)
            except ValueError:
                continue  # a line cut by a power cut: that one name is forgotten
            if isinstance(name, str):
                self.names.add(name)
        self._lines = len(lines) - 1
        log.info("folder source: %d file(s) of %s already inspected (remembered in %s)", len(self.names),
                 self.folder, self.journal)

    def add(self, name: str) -> None:
        """Remember ``name``; a write the disk refuses is counted and logged, and the name kept in memory."""
        self.names.add(name)
        if self.journal is None:
            return
        line = (json.dumps(name) + "\n").encode()
        try:
            if self._fd is None:
                self._rewrite()  # the first name of this run: the journal starts afresh, compacted
            else:
                if os.write(self._fd, line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self._size += len(line)
                self._lines += 1
        except OSError as exc:
            if self._fd is not None:  # drop a line cut short by a full disk; shrinking needs no space
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._size)
            self.disk.failed("inspected_files", self.journal, exc, f"a restart may inspect {name} again")
            return
        self.disk.succeeded("inspected_files")

    def keep_only(self, present: Iterable[str]) -> None:
        """Forget the names of files no longer in the folder; compact the journal when it has grown."""
        self.names.intersection_update(present)
        if self.journal is not None and self._fd is not None and self._lines > 2 * len(self.names) + COMPACT_SLACK:
            try:
                self._rewrite()
            except OSError as exc:
                self.disk.failed("inspected_files", self.journal, exc, "its journal keeps growing until it can be "
                                 "rewritten")

    def _rewrite(self) -> None:
        """Write the journal anew with the names remembered now (temporary file + rename), and open it."""
        text = "".join(json.dumps(line) + "\n" for line in [{"folder": self.folder}, *sorted(self.names)])
        data = text.encode()
        write_atomically(self.journal, data, fsync=False)
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND)
        self._size, self._lines = len(data), len(self.names)
