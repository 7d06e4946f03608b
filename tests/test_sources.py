"""Frame sources against real GStreamer pipelines, real video files and a real folder."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import cv2
import numpy as np
import pytest
from pydantic import TypeAdapter

from patchline.runtime.config import SourceConfig
from patchline.runtime.sources import (EndOfStream, SourceConfigError, open_source, opencv_has_gstreamer,
                                       reconnect_delay)
from tests.broker import free_port
from tests.conftest import needs_gstreamer
from tests.video import corrupt_frames, grey_frames, write_video

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
    assert src.counters.corrupt == 1 and not (inbox / "broken.png").exists()
    assert sorted(p.name for p in inbox.iterdir()) == ["notes.txt"]

    assert src.read(0.3) is None  # nothing new: no frame, no substitute
    cv2.imwrite(str(inbox / "late.png"), frames[2])
    frame = None
    while frame is None and time.monotonic() < deadline:
        frame = src.read(0.5)
    assert frame.origin == "late.png" and frame.index == 3


def test_roi_crops_and_refuses_a_region_outside_the_frame(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), np.uint8)
    cv2.imwrite(str(inbox / "x.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    src = source(kind="folder", path=str(inbox), poll_interval_s=0.05, roi={"x": 10, "y": 20, "width": 64, "height": 48})
    frame = None
    while frame is None:
        frame = src.read(1.0)
    assert np.array_equal(frame.image, image[20:68, 10:74])

    cv2.imwrite(str(inbox / "y.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    outside = source(kind="folder", path=str(inbox), poll_interval_s=0.05,
                     roi={"x": 100, "y": 0, "width": 64, "height": 48})
    with pytest.raises(SourceConfigError, match="outside the 160x120 frame"):
        for _ in range(40):
            outside.read(0.5)


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
