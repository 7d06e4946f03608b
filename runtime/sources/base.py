"""What every frame source shares: the frame, its counters, the backend interface and registry, the config
sections common to all backends, and ``FrameSource``.

A backend knows how to open a stream and pull one frame; ``FrameSource`` wraps it with
what every camera needs on a line that runs for months: a stall watchdog, reconnect with
backoff, the region of interest, and counters. A missing frame is never replaced by a
black or repeated one: ``read`` returns None and the daemon inspects nothing.
"""

from __future__ import annotations

import logging
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from patchline.runtime.config_section import Section
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.image_header import DEFAULT_MAX_PIXELS
from patchline.runtime.throttled_log import ThrottledLog

log = logging.getLogger("patchline.source")

CORRUPT_LOG_INTERVAL_S = 10.0  # a stream of garbage logs a line this often, naming what it folded in


class RoiConfig(Section):
    """Region of interest cropped from every frame before preprocessing, in source pixels."""

    x: int = Field(0, ge=0)
    y: int = Field(0, ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class SourceSection(Section):
    """The keys every source kind has; a backend's config class adds ``kind`` and its own."""

    roi: RoiConfig | None = None
    # Larger frames are counted corrupt and skipped; folder and GStreamer sources read the size from an image's
    # header and refuse it before decoding (a small file may declare gigapixels).
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # First frame after (re)opening; industrial cameras can take 40 s to start streaming. None: wait forever.
    start_timeout_s: float | None = Field(40.0, gt=0)
    # No frame for this long once frames flowed → a stall: counted, the source is reopened. None: never.
    stall_timeout_s: float | None = Field(10.0, gt=0)
    reconnect_min_s: float = Field(1.0, gt=0)  # backoff doubles from min to max between failed attempts
    reconnect_max_s: float = Field(30.0, gt=0)

    @model_validator(mode="after")
    def _backoff_range(self) -> SourceSection:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(f"reconnect_min_s ({self.reconnect_min_s:g}) is larger than reconnect_max_s "
                             f"({self.reconnect_max_s:g})")
        return self


class StreamSection(SourceSection):
    # What the end of the stream means: stop the run (a file), play it again (loop a file), or reconnect (a camera).
    at_end: Literal["stop", "loop", "reconnect"] = "reconnect"


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
    offset: tuple[int, int] = (0, 0)  # (x, y) of the image's top-left pixel in the source's frame: the ROI's corner

    def to_source(self, x: int, y: int) -> tuple[int, int]:
        """A point of ``image`` in the source's pixels (the camera's, before the ROI was cropped)."""
        return x + self.offset[0], y + self.offset[1]


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


@dataclass(frozen=True)
class SourceContext:
    """What the daemon lends a source besides its config."""

    memory: Path | None = None  # a file of the camera's state directory the source may keep across restarts
    disk: DiskWrites | None = None  # counts the writes to it that fail


Opener = Callable[[SourceSection, SourceContext], Backend]


@dataclass(frozen=True)
class Registration:
    config: type[SourceSection]  # with ``kind: Literal["<kind>"]``: the member of the config's SourceConfig union
    open: Opener


BACKENDS: dict[str, Registration] = {}


def register(config: type[SourceSection]) -> Callable[[Opener], Opener]:
    """Register the function that makes a backend from ``config``; its ``kind`` Literal names the source kind."""
    (kind,) = typing.get_args(config.model_fields["kind"].annotation)

    def add(opener: Opener) -> Opener:
        BACKENDS[kind] = Registration(config, opener)
        return opener

    return add


def crop(image: np.ndarray, roi: RoiConfig | None) -> tuple[np.ndarray, tuple[int, int]]:
    """The region of interest and its (x, y) offset in ``image``; CorruptFrame when the frame does not contain it
    (one odd file must not stop a line)."""
    if roi is None:
        return image, (0, 0)
    height, width = image.shape[:2]
    if roi.x + roi.width > width or roi.y + roi.height > height:
        raise CorruptFrame(f"roi x={roi.x} y={roi.y} {roi.width}x{roi.height} lies outside the {width}x{height} "
                           "frame (check source.roi)")
    return image[roi.y : roi.y + roi.height, roi.x : roi.x + roi.width], (roi.x, roi.y)


def reconnect_delay(failures: int, min_s: float, max_s: float) -> float:
    """The pause before the next attempt after ``failures`` failed ones: doubling from min_s, capped at max_s."""
    # 2.0**1024 overflows (after ~a weekend of outage); max_s is reached long before 2**64.
    return min(max_s, min_s * 2.0 ** min(failures, 64))


class FrameSource:
    """Stall watchdog, reconnect with backoff, ROI and counters around one backend."""

    def __init__(self, backend: Backend, config: SourceSection) -> None:
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
            image, offset = self._usable(raw.image)
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
        return Frame(image, index, captured, raw.monotonic, raw.origin, offset)

    def _usable(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
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

