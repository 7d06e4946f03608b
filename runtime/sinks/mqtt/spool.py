"""Verdicts waiting for the broker's acknowledgement, kept on disk so a restart does not lose them.

One JSON file per message, named by a growing counter so that sorting the names restores the order.
Chosen over an append-only log + acknowledged offset because removing an entry (acknowledged,
dropped for age or overflow, from anywhere in the queue) is a single unlink, no compaction is
needed, and a torn write can only damage the one file being written. Files are written to a
temporary name and renamed; there is no fsync per message: the page cache survives a crash or
restart of the daemon, only a power cut can lose the last few seconds (the counter in
``SeqCounter`` shows such a loss as a gap).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from patchline.runtime.atomic_write import write_atomically

log = logging.getLogger(__name__)

SUFFIX = ".json"
KEY = re.compile(r"\d{12,}\.json")  # what put() names its files; the counter outgrows 12 digits only after 10^12


class Spool:
    """Ordered records in ``folder``; ``put`` returns a key that ``remove`` takes."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        names = sorted(p.name for p in self.folder.glob(f"*{SUFFIX}") if KEY.fullmatch(p.name))
        self._next = int(names[-1].removesuffix(SUFFIX)) + 1 if names else 1

    def put(self, record: dict) -> str:
        key = f"{self._next:012d}{SUFFIX}"
        self._next += 1
        write_atomically(self.folder / key, json.dumps(record, separators=(",", ":"), allow_nan=False).encode(),
                         fsync=False)
        return key

    def remove(self, key: str) -> None:
        (self.folder / key).unlink(missing_ok=True)

    def load(self) -> tuple[list[tuple[str, dict]], int]:
        """The records left by a previous run, oldest first, and how many were unreadable.

        An unreadable file (a power cut mid-write) or one not named like ours is set aside (``set_aside``)
        and counted; temporary files of interrupted writes are removed.
        """
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        records: list[tuple[str, dict]] = []
        corrupt = 0
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                if not KEY.fullmatch(path.name):
                    raise ValueError(f"not a spool file name (expected {KEY.pattern})")
                record = json.loads(path.read_text())
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                self.set_aside(path.name, f"is unreadable ({exc})")
                corrupt += 1
                continue
            records.append((path.name, record))
        return records, corrupt

    def set_aside(self, key: str, problem: str) -> None:
        """Rename a bad file to ``<key>.corrupt`` for inspection, saying what is wrong with it."""
        path = self.folder / key
        try:
            path.rename(path.with_name(path.name + ".corrupt"))
        except OSError as exc:
            log.error("spool file %s %s; cannot move it aside (%s): left in place", path, problem, exc)
            return
        log.error("spool file %s %s: moved aside as %s.corrupt", path, problem, path.name)
