"""The GStreamer source: a pipeline up to an appsink (RTSP, V4L2, files, test sources)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from patchline.runtime.image_header import HeaderError, image_size
from patchline.runtime.sources.base import (CORRUPT_LOG_INTERVAL_S, CorruptFrame, EndOfStream, RawFrame,
                                            SourceConfigError, SourceContext, SourceCounters, SourceError,
                                            StreamSection, register)
from patchline.runtime.throttled_log import ThrottledLog

log = logging.getLogger("patchline.source")
HEADER_BYTES = 1 << 18  # of an encoded frame, read for its header: a JPEG's SOF may follow 64 kB of EXIF and ICC


class GStreamerSourceConfig(StreamSection):
    kind: Literal["gstreamer"]
    # Everything up to the appsink, e.g. "filesrc location=x.avi ! decodebin"; the daemon appends
    # "! videoconvert ! video/x-raw,format=RGB ! appsink drop=true max-buffers=1". A pipeline with its
    # own appsink is used as written.
    pipeline: str = Field(min_length=1)


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


@register(GStreamerSourceConfig)
def open_gstreamer(config: GStreamerSourceConfig, context: SourceContext) -> GStreamerBackend:
    return GStreamerBackend(config)
