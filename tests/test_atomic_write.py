"""write_atomically, on which the manifest, the engine cache, the spool, the seq counter and the folder source's
memory rely: the old file or the new one, never a part; nothing left behind by a failed write."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from patchline.runtime import atomic_write
from patchline.runtime.atomic_write import write_atomically
from patchline.runtime.sinks.mqtt.spool import Spool
from tests.conftest import fill


@pytest.mark.parametrize("fsync", [False, True])
def test_the_file_is_replaced_whole(tmp_path: Path, fsync: bool) -> None:
    path = tmp_path / "state"
    write_atomically(path, b"old contents", fsync=fsync)
    with open(path, "rb") as reader:  # opened before the rewrite: still reads the whole old file
        write_atomically(path, b"new", fsync=fsync)
        assert reader.read() == b"old contents"
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state"]


@pytest.mark.parametrize("fsync", [False, True])
def test_a_full_disk_keeps_the_old_file_and_no_temporary_one(small_disk, fsync: bool) -> None:
    disk = small_disk(1)
    path = disk / "state"
    write_atomically(path, b"old", fsync=fsync)
    hog = fill(disk)
    with pytest.raises(OSError) as err:
        write_atomically(path, bytes(1 << 16), fsync=fsync)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in disk.iterdir()) == sorted(["state", hog.name])  # no temporary file holds space


def test_what_a_crash_before_the_rename_leaves_the_spool_clears_at_load(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    kept = spool.put({"seq": 1})

    def crash(*args: object) -> None:
        raise SystemExit("killed between the write and the rename")

    monkeypatch.setattr(atomic_write.os, "replace", crash)
    with pytest.raises(SystemExit):
        spool.put({"seq": 2})
    monkeypatch.undo()
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != kept]
    assert leftover.name.startswith(".")  # hidden: never taken for a record
    records, corrupt = Spool(tmp_path).load()
    assert records == [(kept, {"seq": 1})] and corrupt == 0
    assert [p.name for p in tmp_path.iterdir()] == [kept]
