"""The OpenCV source: cv2.VideoCapture on a file, an RTSP URL or a V4L2 device."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from patchline.runtime.preprocess import ImageError, to_rgb8
from patchline.runtime.sources.base import (CorruptFrame, EndOfStream, RawFrame, SourceConfigError, SourceContext,
                                            SourceCounters, SourceError, StreamSection, register)

log = logging.getLogger("patchline.source")


class OpenCVSourceConfig(StreamSection):
    kind: Literal["opencv"]
    uri: str = Field(min_length=1)  # file, rtsp://…, /dev/videoN or a device index, or a GStreamer pipeline
    backend: Literal["auto", "ffmpeg", "gstreamer", "v4l2"] = "auto"
    open_timeout_s: float = Field(10.0, gt=0)
    read_timeout_s: float = Field(5.0, gt=0)


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


@register(OpenCVSourceConfig)
def open_opencv(config: OpenCVSourceConfig, context: SourceContext) -> OpenCVBackend:
    return OpenCVBackend(config)
