"""Prometheus metrics and the health endpoint of a running daemon.

Counters that the source and the sinks keep themselves are read at scrape time (a collector;
each sink contributes its own families), so there is one count of each thing, not a copy that could drift.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from patchline.runtime.config import ConfigError
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.evidence import EvidenceStore
from patchline.runtime.sources.base import FrameSource

if TYPE_CHECKING:
    from patchline.runtime.sinks import Sink

# Inference on a CPU edge box takes 20 ms to a few seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Rate:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self) -> None:
        with self._lock:
            self._times.append(time.monotonic())

    def per_second(self) -> float:
        with self._lock:
            now = time.monotonic()
            while self._times and self._times[0] < now - self.window_s:
                self._times.popleft()
            if len(self._times) < 2:
                return 0.0
            # Over the span actually seen, so that the first seconds after a start are not underestimated.
            return (len(self._times) - 1) / max(now - self._times[0], 1e-9)


def inference_histogram(registry: CollectorRegistry) -> Histogram:
    """The one inference-time histogram of a line's registry; each camera observes its own ``camera=`` child."""
    return Histogram("patchline_inference_seconds", "Time to score one frame (preprocess to score; a batch's time "
                     "for each of its frames)", ["camera"], buckets=LATENCY_BUCKETS, registry=registry)


class Metrics:
    """All metrics of one camera (labels ``camera=``); a line's ``LineCollector`` serves them with the others'."""

    def __init__(self, camera: str, source: FrameSource, sink: Sink, evidence: EvidenceStore | None,
                 disk: DiskWrites, inference: Histogram) -> None:
        self.camera = camera
        self.started = time.monotonic()
        self.fps = Rate()
        self.verdicts = {"OK": 0, "NG": 0}
        self.trigger_errors: dict[str, int] = {}
        self.inspection_errors: dict[str, int] = {}
        self.inference = inference.labels(camera)
        self.collected = _Collected(self, source, sink, evidence, disk)

    def inspected(self, seconds: float, verdict: str) -> None:
        self.fps.tick()
        self.inference.observe(seconds)
        self.verdicts[verdict] += 1

    def trigger_error(self, reason: str) -> None:
        self.trigger_errors[reason] = self.trigger_errors.get(reason, 0) + 1

    def inspection_error(self, reason: str) -> None:
        self.inspection_errors[reason] = self.inspection_errors.get(reason, 0) + 1


def per_camera(family: type[CounterMetricFamily | GaugeMetricFamily], camera: str,
               values: dict[str, tuple[str, float]]) -> Iterator[Metric]:
    """A family of ``family``'s type for each ``name: (help, value)``, its one sample labelled with ``camera``."""
    for name, (text, value) in values.items():
        metric = family(name, text, labels=["camera"])
        metric.add_metric([camera], value)
        yield metric


class _Collected(Collector):
    def __init__(self, metrics: Metrics, source: FrameSource, sink: Sink, evidence: EvidenceStore | None,
                 disk: DiskWrites) -> None:
        self.metrics, self.source, self.sink, self.evidence, self.disk = metrics, source, sink, evidence, disk

    def collect(self) -> Iterator[Metric]:
        camera = self.metrics.camera
        c = self.source.counters
        yield from per_camera(CounterMetricFamily, camera, {
            "patchline_frames": ("Frames delivered by the source", c.frames),
            "patchline_frames_skipped": ("Frames replaced by a newer one before inspection (newest wins)", c.skipped),
            "patchline_frames_lost": ("Frames missing from the stream: rejected by the decoder or lost in transport",
                                      c.lost),
            "patchline_frames_corrupt": ("Frames that arrived undecodable (or over max_pixels, or smaller than the "
                                         "roi) and were skipped", c.corrupt),
            "patchline_source_unreadable": ("Folder entries skipped because they cannot be stat'ed or opened",
                                            c.unreadable),
            "patchline_source_stalls": ("Times the source delivered no frame within its timeout", c.stalls),
            "patchline_source_reconnects": ("Times the source was reopened after a failure", c.reconnects),
        })
        by_label = {
            "patchline_verdicts": ("Verdicts made, by result (each handed to the sinks the moment it is counted; "
                                   "made + recovered = a sink's delivered + dropped + queue depth)", "result",
                                   self.metrics.verdicts),
            "patchline_trigger_errors": ("Triggers answered on the error topic, by reason", "reason",
                                         self.metrics.trigger_errors),
            "patchline_inspection_errors": ("Frames that got no verdict, reported on the error topic, by reason",
                                            "reason", self.metrics.inspection_errors),
        }
        if self.evidence is not None:
            store = self.evidence
            by_label["patchline_evidence"] = ("NG evidence folders, by outcome", "outcome",
                                              {"saved": store.saved, "dropped": store.dropped, "failed": store.failed,
                                               "no_space": store.no_space})
        for name, (text, label, values) in by_label.items():
            family = CounterMetricFamily(name, text, labels=["camera", label])
            for key, value in dict(values).items():
                family.add_metric([camera, key], value)
            yield family
        family = CounterMetricFamily("patchline_disk_write_failures", "Writes the disk refused, by what was written "
                                     "(seq_counter, spool, evidence, inspected_files) and error",
                                     labels=["camera", "what", "error"])
        for (what, error), value in self.disk.counts.items():
            family.add_metric([camera, what, error], value)
        yield family
        age = self.source.last_frame_age
        yield from per_camera(GaugeMetricFamily, camera, {
            "patchline_fps": ("Frames inspected per second over the last 10 s", self.metrics.fps.per_second()),
            "patchline_uptime_seconds": ("Seconds since the daemon started", time.monotonic() - self.metrics.started),
            "patchline_last_frame_age_seconds": ("Seconds since the last frame (NaN before the first)",
                                                 float("nan") if age is None else age),
        })
        yield from self.sink.collect(camera)


class LineCollector(Collector):
    """The line's one collector: the cameras' families merged by name (one family, a sample per camera), since
    an exposition must not name a family twice."""

    def __init__(self, cameras: list[Metrics], models: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self.cameras = cameras
        self.models = models  # model name → (batches, frames) inspected so far, read at scrape time

    def collect(self) -> Iterator[Metric]:
        for name, text, index in (("patchline_model_batches", "Inferences run by each shared model", 0),
                                  ("patchline_model_frames", "Frames inspected by each shared model (frames per "
                                   "batch = frames / batches)", 1)):
            family = CounterMetricFamily(name, text, labels=["model"])
            for model, counts in self.models().items():
                family.add_metric([model], counts[index])
            yield family
        families: dict[str, Metric] = {}
        for camera in self.cameras:
            for family in camera.collected.collect():
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
        yield from families.values()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes every few seconds are not events
        pass


class MetricsServer:
    """``/metrics`` (Prometheus) and ``/healthz`` (200 while frames flow, else 503) on one port."""

    def __init__(self, registry: CollectorRegistry, health: Callable[[], tuple[bool, dict]], host: str,
                 port: int) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/healthz":
                healthy, detail = health()
                start_response("200 OK" if healthy else "503 Service Unavailable",
                               [("Content-Type", "application/json")])
                return [json.dumps({"healthy": healthy, **detail}).encode()]
            return metrics_app(environ, start_response)

        try:
            self.server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_Quiet)
        except OSError as exc:  # busy port, unknown host: say which setting
            raise ConfigError(f"metrics.host/port {host}:{port}: cannot listen: {exc.strerror or exc}") from exc
        self.port = self.server.server_port
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
