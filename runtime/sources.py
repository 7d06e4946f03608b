"""Frame sources: one interface over GStreamer, OpenCV and a watched folder.

A backend knows how to open a stream and pull one frame; ``FrameSource`` wraps it with
what every camera needs on a line that runs for months: a stall watchdog, reconnect with
backoff, the region of interest, and counters. A missing frame is never replaced by a
black or repeated one: ``read`` returns None and the daemon inspects nothing.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from patchline.runtime.config import (
    FolderSourceConfig,
    GStreamerSourceConfig,
    OpenCVSourceConfig,
    RoiConfig,
    SourceConfig,
)
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.image_header import HeaderError, image_size
from patchline.runtime.inspected_files import InspectedFiles
from patchline.runtime.throttled_log import ThrottledLog
from patchline.runtime.preprocess import IMAGE_SUFFIXES, ImageError, decode_image, to_rgb8

log = logging.getLogger("patchline.source")
HEADER_BYTES = 1 << 18  # of an encoded frame, read for its header: a JPEG's SOF may follow 64 kB of EXIF and ICC

RELIST_S = 5.0
CLOCK_SLACK_S = 1.0
CORRUPT_LOG_INTERVAL_S = 10.0  # a stream of garbage logs a line this often, naming what it folded in

class SourceConfigError(ValueError):
    """A source that can never work as configured (bad pipeline, missing plugin, ROI outside the frame)."""


class SourceError(RuntimeError):
    """The stream broke (device gone, network error); the source reconnects."""


class EndOfStream(Exception):
    """The stream ended (end of a file)."""


class CorruptFrame(Exception):
    """A frame arrived but cannot be used; it is counted and skipped. ``subject`` names it (a file) for the log."""

    def __init__(self, reason: str, subject: str | None = None) -> None:
        super().__init__(reason)
        self.subject = subject


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # RGB uint8 (H, W, 3), region of interest applied
    index: int  # frames delivered by this source so far, across reconnects
    captured: float  # wall-clock capture time (time.time() scale)
    monotonic: float  # the same instant on time.monotonic()'s scale, for ages and trigger matching
    origin: str = ""  # the file a folder frame came from


@dataclass
class SourceCounters:
    frames: int = 0  # delivered by read()
    skipped: int = 0  # arrived but replaced by a newer frame before they were read (newest wins)
    lost: int = 0  # gaps in the stream's timestamps: frames the decoder rejected or the network lost
    corrupt: int = 0  # arrived but undecodable (or refused by its header, size or the ROI); skipped
    unreadable: int = 0  # folder entries that cannot be stat'ed or opened (a symlink loop, no permission); skipped
    stalls: int = 0
    reconnects: int = 0


@dataclass
class RawFrame:
    image: np.ndarray  # RGB uint8
    monotonic: float  # capture time on time.monotonic()'s scale
    origin: str = ""


class Backend(Protocol):
    description: str
    counters: SourceCounters

    def open(self) -> None: ...

    def pull(self, timeout: float) -> RawFrame | None:
        """A frame, or None when none arrived within ``timeout``; raises EndOfStream, SourceError, CorruptFrame."""

    def close(self) -> None: ...


def crop(image: np.ndarray, roi: RoiConfig | None) -> np.ndarray:
    """The region of interest; CorruptFrame when the frame does not contain it (one odd file must not stop a line)."""
    if roi is None:
        return image
    height, width = image.shape[:2]
    if roi.x + roi.width > width or roi.y + roi.height > height:
        raise CorruptFrame(f"roi x={roi.x} y={roi.y} {roi.width}x{roi.height} lies outside the {width}x{height} "
                           "frame (check source.roi)")
    return image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width]


def reconnect_delay(failures: int, min_s: float, max_s: float) -> float:
    """The pause before the next attempt after ``failures`` failed ones: doubling from min_s, capped at max_s."""
    # 2.0**1024 overflows (after ~a weekend of outage); max_s is reached long before 2**64.
    return min(max_s, min_s * 2.0 ** min(failures, 64))


class FrameSource:
    """Stall watchdog, reconnect with backoff, ROI and counters around one backend."""

    def __init__(self, backend: Backend, config: SourceConfig) -> None:
        self.backend = backend
        self.config = config
        self.counters = backend.counters
        self.description = backend.description
        self.at_end = getattr(config, "at_end", "reconnect")
        self._is_open = False
        self._reconnecting = False  # the next open is an attempt to recover from a failure
        self._retry_at = 0.0
        self._failures = 0
        self._since = 0.0  # when the source opened or last delivered a frame
        self._flowing = False  # a frame arrived since the last open
        self._corrupt_log = ThrottledLog(log, CORRUPT_LOG_INTERVAL_S)

    @property
    def last_frame_age(self) -> float | None:
        return time.monotonic() - self._since if self._flowing else None

    def _reopen(self) -> None:
        if self._reconnecting:
            self.counters.reconnects += 1
        self._reconnecting = False
        try:
            self.backend.open()
        except SourceError:
            self.backend.close()
            raise
        self._is_open, self._flowing, self._since = True, False, time.monotonic()

    def _fail(self, reason: str) -> None:
        """Close, and schedule the next attempt after an exponentially growing pause."""
        self.close()
        self._reconnecting = True
        delay = reconnect_delay(self._failures, self.config.reconnect_min_s, self.config.reconnect_max_s)
        self._failures += 1
        self._retry_at = time.monotonic() + delay
        log.warning("source %s: %s; reconnecting in %.1f s", self.description, reason, delay)

    def _watchdog(self) -> None:
        limit = self.config.stall_timeout_s if self._flowing else self.config.start_timeout_s
        silent = time.monotonic() - self._since
        if limit is not None and silent > limit:
            self.counters.stalls += 1
            what = "stalled: no frame" if self._flowing else "no first frame"
            self._fail(f"{what} for {silent:.1f} s")

    def read(self, timeout: float) -> Frame | None:
        """The next frame, or None when there is none within ``timeout`` (reconnects happen in here).

        Raises EndOfStream when a file ended and ``at_end`` is "stop", SourceConfigError when the
        source can never work.
        """
        if not self._is_open:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, timeout))
                return None
            try:
                self._reopen()
            except SourceError as exc:
                self._fail(str(exc))
                return None
            log.info("source %s: opened", self.description)
        self._corrupt_log.flush()
        raw = None
        try:
            raw = self.backend.pull(timeout)
            if raw is None:
                self._watchdog()
                return None
            image = self._usable(raw.image)
        except CorruptFrame as exc:
            return self._corrupt(str(exc), exc.subject or (raw.origin if raw is not None else None))
        except EndOfStream:
            return self._ended()
        except SourceError as exc:
            self._fail(str(exc))
            return None
        except SourceConfigError:
            raise
        except Exception as exc:  # whatever a decoder raises (cv2.error, MemoryError …) costs this frame only
            return self._corrupt(f"{type(exc).__name__}: {exc}")
        if not self._flowing:
            log.info("source %s: frames flowing (%dx%d)", self.description, raw.image.shape[1], raw.image.shape[0])
        self._flowing, self._failures, self._since = True, 0, time.monotonic()
        index = self.counters.frames
        self.counters.frames += 1
        captured = time.time() - (time.monotonic() - raw.monotonic)
        return Frame(image, index, captured, raw.monotonic, raw.origin)

    def _usable(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if height * width > self.config.max_pixels:
            raise CorruptFrame(f"{width}x{height} frame has more than source.max_pixels ({self.config.max_pixels}) "
                               "pixels")
        return crop(image, self.config.roi)

    def _corrupt(self, reason: str, subject: str | None = None) -> None:
        self.counters.corrupt += 1
        self._corrupt_log(f"source {self.description}: corrupt frame skipped: {reason}", subject)
        self._watchdog()  # a stream of nothing but garbage is a stall too
        return None

    def _ended(self) -> None:
        if self.at_end == "stop":
            self.close()
            log.info("source %s: end of stream", self.description)
            raise EndOfStream(self.description)
        if self.at_end == "loop":
            self.close()
            self._retry_at = 0.0
            log.info("source %s: end of stream, playing it again", self.description)
        else:
            self._fail("end of stream")
        return None

    def close(self) -> None:
        if self._is_open:
            self.backend.close()
        self._is_open = False


# --- GStreamer -------------------------------------------------------------------------------

_GST_TAIL = "videoconvert ! video/x-raw,format=RGB ! appsink name=patchline drop=true max-buffers=1"
# Raw formats an appsink of the user's own may deliver: channels and the conversion to RGB.
_GST_FORMATS = {
    "RGB": (3, None),
    "BGR": (3, cv2.COLOR_BGR2RGB),
    "RGBx": (4, cv2.COLOR_RGBA2RGB),
    "RGBA": (4, cv2.COLOR_RGBA2RGB),
    "BGRx": (4, cv2.COLOR_BGRA2RGB),
    "BGRA": (4, cv2.COLOR_BGRA2RGB),
    "GRAY8": (1, cv2.COLOR_GRAY2RGB),
}


def _gst():
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstApp", "1.0")
        gi.require_version("GstVideo", "1.0")
        from gi.repository import GLib, Gst, GstApp, GstVideo
    except (ImportError, ValueError) as exc:
        raise SourceConfigError(
            f"GStreamer's Python bindings are not available ({exc}); install Debian's python3-gst-1.0 and "
            "gstreamer1.0-plugins-{base,good} and use a venv made with --system-site-packages"
        ) from None
    Gst.init(None)
    return GLib, Gst, GstApp, GstVideo


def gst_pipeline_text(pipeline: str) -> str:
    """The pipeline as run: the user's own appsink kept, otherwise RGB conversion and ours appended."""
    return pipeline if "appsink" in pipeline else f"{pipeline.rstrip().rstrip('!')} ! {_GST_TAIL}"


class GStreamerBackend:
    """A pipeline ending in an appsink, pulled with a timeout so that a stall is seen."""

    def __init__(self, config: GStreamerSourceConfig, counters: SourceCounters | None = None) -> None:
        self.GLib, self.Gst, self.GstApp, self.GstVideo = _gst()
        self.text = gst_pipeline_text(config.pipeline)
        self.description = f"gstreamer '{config.pipeline}'"
        self.counters = counters or SourceCounters()
        self.max_pixels = config.max_pixels
        self.pipeline = None
        self.sink = None
        self._arrivals: deque[int] = deque(maxlen=256)  # PTS of buffers that reached the appsink, not yet read
        self._last_pts: int | None = None
        self._refused = 0  # buffers dropped by _check_header since the last one reached the appsink
        self._header_log = ThrottledLog(log, CORRUPT_LOG_INTERVAL_S)
        self._lock = threading.Lock()
        self._build().set_state(self.Gst.State.NULL)  # fail at start, not at the first reconnect
        if not (self.sink.get_property("drop") and self.sink.get_property("max-buffers") == 1):
            log.warning("appsink without drop=true max-buffers=1: frames queue up behind a slow model")

    def _build(self):
        Gst = self.Gst
        try:
            pipeline = Gst.parse_launch(self.text)
        except self.GLib.Error as exc:
            raise SourceConfigError(f"GStreamer pipeline '{self.text}': {exc.message}") from None
        sinks = [e for e in _iterate(pipeline.iterate_sinks()) if isinstance(e, self.GstApp.AppSink)]
        if len(sinks) != 1:
            raise SourceConfigError(f"GStreamer pipeline '{self.text}': needs exactly one appsink, found {len(sinks)}")
        self.sink = sinks[0]
        return pipeline

    def open(self) -> None:
        Gst = self.Gst
        self.pipeline = self._build()
        self._arrivals.clear()
        self._last_pts = None
        self._refused = 0
        self.sink.get_static_pad("sink").add_probe(Gst.PadProbeType.BUFFER, self._on_buffer)
        # Decoders of the pipeline as written, and those decodebin adds once it knows the stream.
        for element in _iterate(self.pipeline.iterate_recurse()):
            self._watch_decoder(element)
        self.pipeline.connect("deep-element-added", lambda _pipeline, _bin, element: self._watch_decoder(element))
        if self.pipeline.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            raise SourceError(self._bus_error() or "pipeline failed to start")

    def _on_buffer(self, pad, info):
        # Streaming thread: note every buffer before the appsink may drop it, and gaps in the timestamps.
        buffer = info.get_buffer()
        pts, duration = buffer.pts, buffer.duration
        with self._lock:
            if _valid(pts):
                self._arrivals.append(pts)
                if self._last_pts is not None and _valid(duration) and duration > 0 and pts > self._last_pts:
                    gap = round((pts - self._last_pts) / duration) - 1
                    self.counters.lost += max(0, gap - self._refused)  # refused ones are counted as corrupt
                self._last_pts = pts
            self._refused = 0
        return self.Gst.PadProbeReturn.OK

    def _watch_decoder(self, element) -> None:
        factory = element.get_factory()
        pad = element.get_static_pad("sink")
        if factory is not None and "Decoder" in factory.get_klass() and pad is not None:
            pad.add_probe(self.Gst.PadProbeType.BUFFER, self._check_header)

    def _check_header(self, pad, info):
        """Streaming thread, before a decoder: drop an encoded image (JPEG, PNG …) whose header declares more
        than max_pixels, as the folder source does, instead of letting the decoder allocate for it or fail
        the pipeline (jpegdec cannot negotiate 50000x50000 and stops the stream)."""
        caps = pad.get_current_caps()
        if caps is None or not caps.get_structure(0).get_name().startswith("image/"):
            return self.Gst.PadProbeReturn.OK
        buffer = info.get_buffer()
        ok, mapped = buffer.map(self.Gst.MapFlags.READ)
        if not ok:
            return self.Gst.PadProbeReturn.OK
        try:
            kind, width, height = image_size(bytes(mapped.data[:HEADER_BYTES]))
        except HeaderError:
            return self.Gst.PadProbeReturn.OK  # the decoder decides about what we cannot read
        finally:
            buffer.unmap(mapped)
        if width * height <= self.max_pixels:
            return self.Gst.PadProbeReturn.OK
        with self._lock:
            self.counters.corrupt += 1
            self._refused += 1
        self._header_log(f"source {self.description}: corrupt frame skipped: its {kind} header declares "
                                 f"{width}x{height} pixels, more than source.max_pixels ({self.max_pixels})")
        return self.Gst.PadProbeReturn.DROP

    def _bus_error(self) -> str | None:
        """Drain the bus: warnings are logged, the first error is returned."""
        Gst = self.Gst
        bus = self.pipeline.get_bus()
        error = None
        while (message := bus.pop_filtered(Gst.MessageType.ERROR | Gst.MessageType.WARNING)) is not None:
            if message.type == Gst.MessageType.ERROR:
                err, debug = message.parse_error()
                error = error or f"{message.src.get_name()}: {err.message}"
                log.debug("gstreamer error detail: %s", debug)
            else:
                warn, _ = message.parse_warning()
                log.warning("gstreamer %s: %s", message.src.get_name(), warn.message)
        return error

    def pull(self, timeout: float) -> RawFrame | None:
        Gst = self.Gst
        self._header_log.flush()
        error = self._bus_error()
        if error:
            raise SourceError(error)
        sample = self.sink.try_pull_sample(int(timeout * Gst.SECOND))
        if sample is None:
            if self.sink.is_eos():
                raise EndOfStream()
            error = self._bus_error()
            if error:
                raise SourceError(error)
            return None
        buffer = sample.get_buffer()
        self._count_skipped(buffer.pts)
        return RawFrame(self._to_rgb(sample, buffer), self._capture_time(sample, buffer))

    def _count_skipped(self, pts: int) -> None:
        with self._lock:
            if pts in self._arrivals:
                while self._arrivals.popleft() != pts:
                    self.counters.skipped += 1

    def _capture_time(self, sample, buffer) -> float:
        """Capture time from the buffer's timestamp when the pipeline runs on the monotonic system clock."""
        Gst = self.Gst
        now = time.monotonic()
        clock = self.pipeline.get_clock()
        if not (_valid(buffer.pts) and isinstance(clock, Gst.SystemClock)
                and clock.props.clock_type == Gst.ClockType.MONOTONIC):
            return now
        running = sample.get_segment().to_running_time(Gst.Format.TIME, buffer.pts)
        if not _valid(running):
            return now
        return min(now, (self.pipeline.get_base_time() + running) / Gst.SECOND)

    def _to_rgb(self, sample, buffer) -> np.ndarray:
        info = self.GstVideo.VideoInfo.new_from_caps(sample.get_caps())
        name = self.GstVideo.VideoFormat.to_string(info.finfo.format)
        if name not in _GST_FORMATS:
            raise SourceConfigError(f"appsink delivers {name}; use one of {', '.join(_GST_FORMATS)}")
        channels, conversion = _GST_FORMATS[name]
        width, height, stride = info.width, info.height, info.stride[0]
        ok, mapped = buffer.map(self.Gst.MapFlags.READ)
        if not ok:
            raise CorruptFrame("buffer cannot be mapped")
        try:
            data = np.frombuffer(mapped.data, np.uint8)
            if data.size < stride * (height - 1) + width * channels:
                raise CorruptFrame(f"{data.size} bytes for a {width}x{height} {name} frame")
            rows = np.lib.stride_tricks.as_strided(data, (height, width * channels), (stride, 1))
            image = rows.reshape(height, width, channels).copy()
        finally:
            buffer.unmap(mapped)
        if conversion is None:
            return image
        return cv2.cvtColor(image, conversion)

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.set_state(self.Gst.State.NULL)
        self.pipeline = None


def _iterate(iterator) -> list:
    items = []
    iterator.foreach(items.append)
    return items


def _valid(value: int) -> bool:
    return value is not None and 0 <= value < 0xFFFFFFFFFFFFFFFF  # GST_CLOCK_TIME_NONE is all ones


# --- OpenCV ----------------------------------------------------------------------------------

_CV_APIS = {"auto": cv2.CAP_ANY, "ffmpeg": cv2.CAP_FFMPEG, "gstreamer": cv2.CAP_GSTREAMER, "v4l2": cv2.CAP_V4L2}


def opencv_has_gstreamer() -> bool:
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return line.split(":", 1)[1].strip().upper().startswith("YES")
    return False


class OpenCVBackend:
    """cv2.VideoCapture. Files are read frame by frame; live streams by a reader thread, newest frame wins."""

    def __init__(self, config: OpenCVSourceConfig, counters: SourceCounters | None = None) -> None:
        self.config = config
        self.counters = counters or SourceCounters()
        self.description = f"opencv '{config.uri}'"
        is_pipeline = " ! " in config.uri
        self.api = _CV_APIS[config.backend]
        if is_pipeline and config.backend == "auto":
            self.api = cv2.CAP_GSTREAMER
        if self.api == cv2.CAP_GSTREAMER and not opencv_has_gstreamer():
            raise SourceConfigError(
                f"source uri '{config.uri}' is a GStreamer pipeline, but this OpenCV ({cv2.__version__}) was built "
                "without GStreamer (cv2.getBuildInformation() says 'GStreamer: NO'; the PyPI wheels are). "
                "Use source.kind: gstreamer, or an OpenCV built with GStreamer"
            )
        self.is_file = not is_pipeline and Path(config.uri).is_file()
        self.capture = None  # files only; a live stream's capture belongs to its reader thread
        self._reader: threading.Thread | None = None
        self._stop: threading.Event | None = None  # the current reader's; each reader has its own
        self._latest: RawFrame | None = None
        self._error: Exception | None = None
        self._cond = threading.Condition()

    def open(self) -> None:
        uri = self.config.uri
        target = int(uri) if uri.isdigit() else uri
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.config.open_timeout_s * 1000),
                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.config.read_timeout_s * 1000)]
        capture = cv2.VideoCapture(target, self.api, params)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"cannot open {uri}")
        self._position = 0
        if self.is_file:
            self.capture = capture
            return
        # A reader that close() could not wait for may still sit in read() on its own capture; it releases
        # that capture itself and, its stop event set, never touches the state of the new one.
        with self._cond:
            self._latest, self._error = None, None
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read_live, args=(capture, self._stop), name="opencv-reader",
                                        daemon=True)
        self._reader.start()

    def _grab(self, capture: cv2.VideoCapture) -> RawFrame:
        ok, image = capture.read()
        now = time.monotonic()
        if not ok or image is None:
            if self.is_file:
                total = capture.get(cv2.CAP_PROP_FRAME_COUNT)
                self._position += 1
                if total > 0 and self._position < total:
                    raise CorruptFrame(f"frame {self._position - 1} of {self.config.uri} cannot be decoded")
                raise EndOfStream()
            raise SourceError(f"read from {self.config.uri} failed")
        self._position += 1
        try:
            return RawFrame(to_rgb8(image, self.config.uri), now)
        except ImageError as exc:
            raise CorruptFrame(exc.reason) from None

    def _read_live(self, capture: cv2.VideoCapture, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    frame = self._grab(capture)
                except (SourceError, EndOfStream) as exc:
                    with self._cond:
                        if not stop.is_set():
                            self._error = exc
                            self._cond.notify_all()
                    return
                except Exception as exc:  # CorruptFrame, or whatever the decoder raised: this frame only
                    with self._cond:
                        self.counters.corrupt += not stop.is_set()
                    log.debug("opencv corrupt frame: %s", exc)
                    continue
                with self._cond:
                    if stop.is_set():  # closed while this read was in flight: the frame belongs to no one
                        return
                    self.counters.skipped += self._latest is not None
                    self._latest = frame
                    self._cond.notify_all()
        finally:
            capture.release()

    def pull(self, timeout: float) -> RawFrame | None:
        if self.is_file:
            return self._grab(self.capture)
        with self._cond:
            self._cond.wait_for(lambda: self._latest is not None or self._error is not None, timeout)
            frame, self._latest = self._latest, None
            if frame is None and self._error is not None:
                raise self._error
            return frame

    def close(self) -> None:
        if self._reader is not None:
            with self._cond:
                self._stop.set()
            self._reader.join(self.config.read_timeout_s + 1)
            if self._reader.is_alive():
                log.warning("opencv reader of %s still in read(); it releases its capture when that returns",
                            self.config.uri)
            self._reader = self._stop = None
        if self.capture is not None:
            self.capture.release()
        self.capture = None


# --- Folder ----------------------------------------------------------------------------------


class FolderBackend:
    """New image files in a folder, each once, oldest first.

    A file is taken once its size and mtime held still between two polls, so a writer may
    copy in place; writing to a hidden name (".x.png") and renaming is faster still. With a
    ``memory`` file (the daemon's state directory) the names of inspected files outlive a
    restart (runtime/inspected_files.py). Entries that cannot be stat'ed or read (a symlink
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


_BACKENDS = {"gstreamer": GStreamerBackend, "opencv": OpenCVBackend}


def open_source(config: SourceConfig, memory: Path | None = None, disk: DiskWrites | None = None) -> FrameSource:
    """The configured source, checked (raises SourceConfigError) but not yet opened.

    ``memory``: where a folder source remembers the files it inspected (the daemon's state directory);
    ``disk`` counts the writes to it that fail.
    """
    if config.kind == "folder":
        backend = FolderBackend(config, memory=memory, disk=disk)
    else:
        backend = _BACKENDS[config.kind](config)
    return FrameSource(backend, config)
