"""Replacing a file whole: the new bytes go to a temporary file beside it, which is then renamed over it.

A reader, or a crash of the writer, finds the old file or the new one, never a part of either. The
temporary name is hidden and carries the writer's pid (``.<name>.<pid>.tmp``): two processes that
write the same file (two calibrations of one artifact) never write into one temporary file, and a
folder's loader can clear what a crash left by the pattern ``.*.tmp`` (the MQTT spool does). A write
that fails removes its temporary file: on a full disk it would hold space that is missing.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes, *, fsync: bool) -> None:
    """Replace ``path`` by a file holding ``data``; OSError (the old file untouched) when it cannot be written.

    ``fsync``: the bytes and then the rename are on the disk when this returns, so that a power cut keeps
    the new file (costs milliseconds on an edge box's disk). Without it they reach the disk when the kernel
    writes them back: a restart of the process keeps them (the page cache survives it), a power cut may not.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
