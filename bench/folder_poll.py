"""The folder source's poll with many inspected files kept in the folder (``after_read: keep``).

    python bench/folder_poll.py [--files 20000 100000] [--polls 50]

For each count: a folder on the disk the state lives on (``--dir``, default a temporary folder) holding
that many image files, all already inspected; then the cost of ``FolderBackend``'s poll (``_ready``, what
``pull`` runs every ``poll_interval_s``), measured three ways:

- ``idle``: the folder unchanged — one stat of the folder, nothing listed;
- ``relist``: the listing the source makes after a change, and every RELIST_S anyway (names compared
  with the memory, no stat of inspected files);
- ``new_file``: from a new file's rename into the folder to the poll that returns it (two polls: it must
  hold still for one poll interval first), minus that interval.

Writes bench/results/folder-poll-<host>-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from patchline.runtime.sources import folder as folder_source
from patchline.runtime.tools.bench import summarise, write_result

ROOT = Path(__file__).resolve().parents[1]


def measure(count: int, polls: int, parent: str | None) -> dict:
    with tempfile.TemporaryDirectory(dir=parent) as tmp:
        folder, state = Path(tmp) / "inbox", Path(tmp) / "state"
        folder.mkdir()
        state.mkdir()
        backend = folder_source.FolderBackend(
            folder_source.FolderSourceConfig(kind="folder", path=str(folder), poll_interval_s=0.01),
            memory=state / "cam.inspected")
        for i in range(count):
            (folder / f"part{i:07d}.png").write_bytes(b"\x89PNG")
            backend._seen.add(f"part{i:07d}.png")
        time.sleep(folder_source.CLOCK_SLACK_S + 0.1)  # the folder's mtime is old enough to be trusted
        backend._ready()  # the listing after the files came

        def timed(step) -> float:
            started = time.perf_counter()
            step()
            return (time.perf_counter() - started) * 1000

        idle = [timed(backend._ready) for _ in range(polls)]
        relist = []
        for _ in range(polls):
            backend._listed_at = -float("inf")  # as when RELIST_S has passed
            relist.append(timed(backend._ready))
        arrival = []
        for i in range(min(polls, 20)):
            name = f"new{i:03d}.png"
            (folder / f".{name}").write_bytes(b"\x89PNG")
            started = time.perf_counter()
            os.replace(folder / f".{name}", folder / name)
            while (name,) != tuple(n for _, n in backend._ready()):
                pass
            arrival.append((time.perf_counter() - started) * 1000)
            backend._seen.add(name)
    return {"files": count, "idle": summarise(idle, (50, 99)), "relist": summarise(relist, (50, 99)),
            "new_file": summarise(arrival, (50, 99))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--polls", type=int, default=50)
    parser.add_argument("--dir", help="parent of the benchmark's folder (default: the system's temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    results = [measure(count, args.polls, args.dir) for count in args.files]
    for r in results:
        print(f"{r['files']:>7} files: idle poll {r['idle']['median_ms']:.3f} ms (p99 {r['idle']['p99_ms']:.3f}), "
              f"relist {r['relist']['median_ms']:.1f} ms (p99 {r['relist']['p99_ms']:.1f}), new file found in "
              f"{r['new_file']['median_ms']:.1f} ms (p99 {r['new_file']['p99_ms']:.1f})")
    print(write_result("folder-poll", {"results": results, "relist_s": folder_source.RELIST_S}, args.out))


if __name__ == "__main__":
    main()
