"""Frame sources against real GStreamer pipelines, real video files and a real folder."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter

from patchline.runtime.sources import SourceConfig, base, folder, inspected_files, open_source
from patchline.runtime.sources.base import EndOfStream, SourceConfigError, reconnect_delay
from patchline.runtime.sources.opencv import opencv_has_gstreamer
from patchline.runtime.tools.broker import free_port
from patchline.runtime.tools.demo import write_video
from tests.conftest import needs_gstreamer
from tests.hostile import corpus, encode, lying_png
from tests.video import corrupt_frames, grey_frames

SOURCE = TypeAdapter(SourceConfig)


def source(**fields):
    return open_source(SOURCE.validate_python(fields))


def read_all(src, limit: int = 200, timeout: float = 2.0) -> list:
    frames = []
    with pytest.raises(EndOfStream):
        for _ in range(limit):
            frame = src.read(timeout)
            if frame is not None:
                frames.append(frame)
    return frames


def grey_index(frame) -> int:
    return round((float(frame.image.mean()) - 10) / 10)


@needs_gstreamer
def test_videotestsrc_frames_are_rgb_with_capture_times():
    src = source(kind="gstreamer",
                 pipeline="videotestsrc is-live=true ! video/x-raw,width=161,height=120,framerate=30/1")
    frames = []
    while len(frames) < 5:
        frame = src.read(5.0)
        if frame is not None:
            frames.append(frame)
    src.close()
    assert [f.index for f in frames] == [0, 1, 2, 3, 4]
    # An odd width makes GStreamer pad the rows: the stride must be undone, not read as pixels.
    assert all(f.image.shape == (120, 161, 3) and f.image.dtype == np.uint8 for f in frames)
    assert frames[0].image[0, 0].tolist() == [255, 255, 255]  # SMPTE bars start white (RGB order)
    monotonic = [f.monotonic for f in frames]
    assert monotonic == sorted(monotonic) and monotonic[-1] <= time.monotonic()
    assert abs(frames[-1].captured - time.time()) < 2.0
    assert src.counters.frames == 5 and src.counters.stalls == 0


@needs_gstreamer
def test_filesrc_plays_to_end_of_stream_then_loops(tmp_path):
    video = write_video(tmp_path / "clip.avi", grey_frames(12), fps=30)
    pipeline = f"filesrc location={video} ! decodebin"
    src = source(kind="gstreamer", pipeline=pipeline, at_end="stop")
    frames = read_all(src)
    counted = src.counters
    assert len(frames) + counted.skipped == 12 and counted.lost == 0
    indices = [grey_index(f) for f in frames]
    assert indices == sorted(set(indices)) and indices[-1] == 11

    looping = source(kind="gstreamer", pipeline=pipeline, at_end="loop")
    seen = []
    while len(seen) < 20:
        frame = looping.read(2.0)
        if frame is not None:
            seen.append(grey_index(frame))
    looping.close()
    assert seen.index(0, 1) > 0 and looping.counters.reconnects == 0  # back at frame 0, a loop not a failure


@needs_gstreamer
def test_corrupt_frames_in_a_stream_are_counted_and_skipped(tmp_path):
    video = write_video(tmp_path / "clip.avi", grey_frames(12), fps=30)
    corrupt_frames(video, [4, 5])
    # An appsink of our own that keeps every frame: the gaps must come from the corrupt frames alone.
    src = source(kind="gstreamer", at_end="stop", pipeline=f"filesrc location={video} ! decodebin ! videoconvert ! "
                 "video/x-raw,format=BGR ! appsink sync=false max-buffers=64")
    frames = read_all(src)
    assert [grey_index(f) for f in frames] == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11]
    assert src.counters.lost == 2 and src.counters.skipped == 0


def test_folder_source_takes_new_images_oldest_first_and_skips_corrupt(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    frames = grey_frames(3)
    for i, name in enumerate(["b.png", "a.png", "c.jpg"]):
        cv2.imwrite(str(inbox / name), frames[i])
        os.utime(inbox / name, (1000 + i, 1000 + i))
    (inbox / "broken.png").write_bytes(b"\x89PNG not really")
    os.utime(inbox / "broken.png", (999, 999))
    (inbox / "notes.txt").write_text("not an image")
    src = source(kind="folder", path=str(inbox), poll_interval_s=0.05, after_read="delete")
    got = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        frame = src.read(0.5)
        if frame is not None:
            got.append(frame)
    assert [f.origin for f in got] == ["b.png", "a.png", "c.jpg"]
    assert [grey_index(f) for f in got] == [0, 1, 2]
    assert abs(got[0].captured - 1000) < 1.0  # a folder frame's capture time is the file's mtime
    assert got[0].to_source(5, 7) == (5, 7)  # no roi: the image is the camera's frame
    assert src.counters.corrupt == 1 and not (inbox / "broken.png").exists()
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.txt"]

    assert src.read(0.3) is None  # nothing new: no frame, no substitute
    cv2.imwrite(str(inbox / "late.png"), frames[2])
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = src.read(0.5)
    assert frame.origin == "late.png" and frame.index == 3


def test_roi_crops_and_a_frame_that_does_not_contain_it_is_skipped(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)
    cv2.imwrite(str(inbox / "x.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    os.utime(inbox / "x.png", (1000, 1000))
    cv2.imwrite(str(inbox / "small.png"), image[:40, :50])  # one odd file must not stop the line
    os.utime(inbox / "small.png", (1001, 1001))
    src = source(kind="folder", path=str(inbox), poll_interval_s=0.05, roi={"x": 10, "y": 20, "width": 64, "height": 48})
    frame = None
    while frame is None:
        frame = src.read(1.0)
    assert np.array_equal(frame.image, image[20:68, 10:74])
    # A point of the cropped image maps back to the camera's pixels (the verdict's location) with one call.
    assert frame.to_source(0, 0) == (10, 20) and frame.to_source(63, 47) == (73, 67)
    while src.counters.corrupt == 0:
        assert src.read(1.0) is None
    cv2.imwrite(str(inbox / "y.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    frame = None
    while frame is None:
        frame = src.read(1.0)
    assert frame.origin == "y.png" and src.counters.frames == 2 and src.counters.reconnects == 0


def test_folder_source_takes_hostile_files_and_symlink_loops_in_its_stride(tmp_path, caplog, monkeypatch):
    """Every file of the hostile corpus becomes a frame or is counted corrupt, and each corrupt one is named in the
    log however many come at once (the lines are throttled, not the names); entries that cannot be stat'ed or
    opened (a symlink loop, a folder named like an image, no read permission) are skipped, counted and named."""
    monkeypatch.setattr(base, "CORRUPT_LOG_INTERVAL_S", 0.5)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (96, 128, 3), np.uint8)
    files, usable = corpus(rgb)
    for name, data in files.items():
        (inbox / name).write_bytes(data)
    os.symlink("loop.png", inbox / "loop.png")  # a link to itself
    os.symlink("pong.png", inbox / "ping.png")  # and two that point at each other
    os.symlink("ping.png", inbox / "pong.png")
    (inbox / "folder.png").mkdir()
    src = source(kind="folder", path=str(inbox), poll_interval_s=0.05)
    got, deadline = [], time.monotonic() + 60
    while src.counters.frames + src.counters.corrupt < len(files) and time.monotonic() < deadline:
        frame = src.read(0.5)
        if frame is not None:
            got.append(frame)
    assert sorted(f.origin for f in got) == sorted(usable)
    assert all(f.image.shape == (96, 128, 3) and f.image.dtype == np.uint8 for f in got)
    assert src.counters.corrupt == len(files) - len(usable)
    assert src.counters.unreadable == 4 and src.counters.reconnects == 0
    time.sleep(0.5)
    src.read(0.1)  # what the throttle folded in is logged, by name, once its interval has passed
    corrupt_lines = "\n".join(r.getMessage() for r in caplog.records if "corrupt frame skipped" in r.getMessage())
    assert len(caplog.records) < len(files)
    for name in set(files) - set(usable):
        assert name in corrupt_lines, name
    skipped = {r.getMessage() for r in caplog.records if "skipping" in r.getMessage()}
    for name, reason in [("loop.png", "Too many levels of symbolic links"), ("ping.png", "symbolic links"),
                         ("pong.png", "symbolic links"), ("folder.png", "not a regular file")]:
        assert any(str(inbox / name) in line and reason in line for line in skipped), (name, skipped)
    for _ in range(3):  # polls go on: the loops are not counted again, the source does not reconnect
        assert src.read(0.2) is None
    assert src.counters.unreadable == 4 and src.counters.reconnects == 0
    (inbox / "late.png").write_bytes(files["good.png"])
    (inbox / "locked.png").write_bytes(files["good.png"])
    (inbox / "locked.png").chmod(0)
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = src.read(0.5)
    assert frame.origin == "late.png"
    if os.geteuid() != 0:  # root reads a file whatever its mode
        assert src.read(0.5) is None and src.counters.unreadable == 5
        assert any("locked.png: cannot read: Permission denied" in r.getMessage() for r in caplog.records)


@needs_gstreamer
@pytest.mark.parametrize("stream", ["mjpeg-avi", "png-files"])
def test_gstreamer_drops_frames_whose_headers_lie_and_plays_on(tmp_path, stream):
    """jpegdec cannot negotiate a frame declaring 50000x50000 and would stop the pipeline; the header is read
    before the decoder and the frame counted corrupt instead."""
    frames = grey_frames(12)
    if stream == "mjpeg-avi":
        video = write_video(tmp_path / "clip.avi", frames, fps=30)
        data = bytearray(video.read_bytes())
        starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
        for index in (4, 7):
            sof = data.index(b"\xff\xc0", starts[index])
            data[sof + 5 : sof + 9] = (50000).to_bytes(2, "big") * 2  # same length: the container stays valid
        video.write_bytes(bytes(data))
        head = f"filesrc location={video} ! decodebin"
    else:
        for index, frame in enumerate(frames):
            (tmp_path / f"{index:03d}.png").write_bytes(lying_png() if index in (4, 7) else encode(frame, ".png"))
        head = (f'multifilesrc location={tmp_path}/%03d.png stop-index=11 caps="image/png,framerate=30/1" '
                "! pngdec")
    src = source(kind="gstreamer", at_end="stop", pipeline=f"{head} ! videoconvert ! video/x-raw,format=BGR ! "
                 "appsink sync=false max-buffers=64")
    got = read_all(src)
    assert [grey_index(f) for f in got] == [0, 1, 2, 3, 5, 6, 8, 9, 10, 11]
    assert src.counters.corrupt == 2 and src.counters.lost == 0 and src.counters.reconnects == 0


def test_folder_source_remembers_inspected_files_across_restarts(tmp_path, monkeypatch):
    inbox, memory = tmp_path / "inbox", tmp_path / "state" / "cam1.inspected"
    inbox.mkdir()
    memory.parent.mkdir()
    frames = grey_frames(3)

    def drop(name: str, index: int) -> None:
        cv2.imwrite(str(inbox / name), frames[index])

    def take(src, count: int) -> list[str]:
        names, deadline = [], time.monotonic() + 20
        while len(names) < count and time.monotonic() < deadline:
            frame = src.read(0.3)
            if frame is not None:
                names.append(frame.origin)
        assert src.read(0.3) is None  # and nothing more
        return names

    def start():
        return open_source(SOURCE.validate_python({"kind": "folder", "path": str(inbox), "poll_interval_s": 0.05}),
                           memory=memory)

    for index, name in enumerate(["a.png", "b.png", "c.png"]):
        drop(name, index)
    assert sorted(take(start(), 3)) == ["a.png", "b.png", "c.png"]
    drop("d.png", 0)  # arrives while the daemon is down
    restarted = start()
    assert take(restarted, 1) == ["d.png"]  # a, b, c were inspected before the restart
    lines = memory.read_text().splitlines()
    assert json.loads(lines[0]) == {"folder": str(inbox.resolve())} and sorted(map(json.loads, lines[1:])) == [
        "a.png", "b.png", "c.png", "d.png"]

    # Bounded by what the folder holds: names of files gone are forgotten, the journal is compacted.
    monkeypatch.setattr(inspected_files, "COMPACT_SLACK", 2)
    for name in ["a.png", "b.png", "c.png"]:
        (inbox / name).unlink()
    for index in range(6):
        drop(f"e{index}.png", index % 3)
    assert len(take(restarted, 6)) == 6
    assert len(memory.read_text().splitlines()) == 1 + 10
    for index in range(6):
        (inbox / f"e{index}.png").unlink()
    assert take(restarted, 0) == []
    assert [json.loads(line) for line in memory.read_text().splitlines()[1:]] == ["d.png"]
    assert take(start(), 0) == []

    # A memory written for another folder is not taken for this one's.
    memory.write_text(json.dumps({"folder": "/elsewhere"}) + "\n" + json.dumps("d.png") + "\n")
    assert take(start(), 1) == ["d.png"]


@needs_gstreamer
def test_stalled_network_stream_is_detected_and_reconnected():
    """A real UDP/RTP stream whose sender freezes: a stall, reconnects, and no frame while it is frozen."""
    port = free_port()
    sender = subprocess.Popen(
        [shutil.which("gst-launch-1.0"), "-q", "videotestsrc", "is-live=true", "!",
         "video/x-raw,format=I420,width=64,height=48,framerate=20/1", "!", "jpegenc", "!", "rtpjpegpay", "!",
         "udpsink", "host=127.0.0.1", f"port={port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    src = source(kind="gstreamer", start_timeout_s=0.8, stall_timeout_s=0.8, reconnect_min_s=0.2, reconnect_max_s=0.4,
                 pipeline=f'udpsrc port={port} caps="application/x-rtp,media=video,encoding-name=JPEG,payload=26,'
                          'clock-rate=90000" ! rtpjpegdepay ! jpegdec')
    try:
        def frames_for(seconds: float) -> list:
            got, end = [], time.monotonic() + seconds
            while time.monotonic() < end:
                frame = src.read(0.2)
                if frame is not None:
                    got.append(frame)
            return got

        assert len(frames_for(1.5)) > 5
        sender.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        during = frames_for(3.0)
        sender.send_signal(signal.SIGCONT)
        thawed_at = time.monotonic()
        after = frames_for(3.0)
    finally:
        src.close()
        sender.kill()
        sender.wait()
    # Frames already in flight when the sender froze may land in its first moments; none later.
    assert all(f.monotonic < frozen_at + 0.3 for f in during)
    assert src.counters.stalls >= 1 and src.counters.reconnects >= 1
    assert len(after) > 5 and all(f.monotonic >= thawed_at for f in after)


@needs_gstreamer
def test_bad_pipeline_is_refused_at_start():
    with pytest.raises(SourceConfigError, match="nosuchelement"):
        source(kind="gstreamer", pipeline="nosuchelement ! fakesink")


def test_opencv_reads_a_file_and_says_when_it_lacks_gstreamer(tmp_path):
    video = write_video(tmp_path / "clip.avi", grey_frames(6), fps=10)
    src = source(kind="opencv", uri=str(video), at_end="stop")
    frames = read_all(src)
    assert [grey_index(f) for f in frames] == [0, 1, 2, 3, 4, 5]
    if opencv_has_gstreamer():
        pytest.skip("this OpenCV has GStreamer; the refusal cannot be shown")
    with pytest.raises(SourceConfigError, match="built without GStreamer"):
        source(kind="opencv", uri="videotestsrc ! appsink")


def test_reconnect_backoff_doubles_up_to_the_cap_even_after_days_of_failures():
    assert [reconnect_delay(n, 0.5, 30.0) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    # A camera down over a weekend fails thousands of times; 2**1024 used to raise OverflowError.
    assert [reconnect_delay(n, 0.5, 30.0) for n in (1023, 1024, 100_000)] == [30.0, 30.0, 30.0]


def test_opencv_live_reader_closes_and_reopens_cleanly(tmp_path):
    """A file:// URI takes the live path (reader thread, newest frame wins): each close ends its reader."""
    import threading

    video = write_video(tmp_path / "clip.avi", grey_frames(20), fps=10)
    src = source(kind="opencv", uri=f"file://{video}", at_end="reconnect")
    for _ in range(5):
        frame = None
        while frame is None:
            frame = src.read(2.0)
        assert 0 <= grey_index(frame) < 20
        src.close()
        assert not [t for t in threading.enumerate() if t.name == "opencv-reader"]
    assert src.counters.frames == 5


def test_folder_poll_lists_the_folder_only_when_it_changed_and_relists_every_few_seconds(tmp_path, monkeypatch):
    """An idle poll of a folder of inspected files looks at the folder's mtime only; a change of the folder is
    seen at the next poll; a file that arrives without changing the folder's mtime (a remote file system, a coarse
    clock: put back here with os.utime) is found by the listing the source makes every RELIST_S anyway."""
    monkeypatch.setattr(folder, "RELIST_S", 3.0)
    monkeypatch.setattr(folder, "CLOCK_SLACK_S", 0.2)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = cv2.imencode(".png", np.full((40, 60, 3), 128, np.uint8))[1].tobytes()
    (inbox / "a.png").write_bytes(image)
    time.sleep(0.3)  # older than the clock slack: the folder's mtime will be trusted
    src = source(kind="folder", path=str(inbox), poll_interval_s=0.05)

    def next_frame(timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (frame := src.read(0.1)) is not None:
                return frame
        return None

    assert next_frame(2).origin == "a.png"  # found by a listing the folder's mtime made trusted
    assert next_frame(0.5) is None  # and, taken, not taken again by the polls that only look at the folder
    (inbox / "b.png").write_bytes(image)  # the folder changes: found at once
    assert next_frame(2).origin == "b.png"
    time.sleep(0.3)
    assert next_frame(0.5) is None  # trusted and idle now: what was taken is not taken again
    before = os.stat(inbox)
    (inbox / "c.png").write_bytes(image)
    os.utime(inbox, ns=(before.st_atime_ns, before.st_mtime_ns))  # the folder says nothing changed
    started = time.monotonic()
    assert next_frame(1.0) is None  # idle polls do not list
    frame = next_frame(5)
    assert frame is not None and frame.origin == "c.png" and time.monotonic() - started < 5
