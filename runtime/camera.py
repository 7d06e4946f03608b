"""One camera of a line: frames in, verdicts out, on a thread of its own.

    source → SharedModel (batched with the other cameras of its model) → decide → make_verdict → its sink(s)
                                                                                  (and NG evidence)

Modes: ``continuous`` inspects the newest frame whenever the model is free (older frames are dropped by
the source and counted); ``trigger`` inspects, per PLC trigger, the first frame captured at or after the
trigger arrived (runtime/triggers.py keeps it while the model is busy).

Everything a camera owns is its own — source, seq counter, sinks (its MQTT connection with its topics and will,
its spool; its part of each other output), evidence, metrics labelled ``camera=`` — so one camera's stall, bad frames or unreachable broker never
stop the others. Nothing the disk does stops the loop: a verdict whose seq cannot be recorded is not
published (SeqCounter), the spool falls back to memory, evidence is skipped and the verdict says why;
each failed write is counted and logged (runtime/disk_writes.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Histogram

from patchline.runtime.batching import LoadedModel, SharedModel
from patchline.runtime.config import CameraConfig, LineConfig
from patchline.runtime.decision import decide
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.search.distance import NonFiniteError
from patchline.runtime.evidence import DISABLED, NOT_WRITTEN, EvidenceStore, InOrder
from patchline.runtime.inspector import Inspection
from patchline.runtime.metrics import Metrics
from patchline.runtime.sinks import Output, Sinks
from patchline.runtime.sources import open_source
from patchline.runtime.sources.base import EndOfStream, Frame, SourceConfigError
from patchline.runtime.triggers import Trigger, TriggeredFrames
from patchline.runtime.verdict import SeqCounter, iso_utc, make_verdict

log = logging.getLogger("patchline.camera")

READ_TIMEOUT_S = 0.5  # the longest the loop waits for a frame before it checks stop, triggers, its heartbeat
EXIT_OK = 0
EXIT_CONFIG = 78  # sysexits' EX_CONFIG: a restart cannot help; the unit says RestartPreventExitStatus=78
EXIT_CRASH = 70  # sysexits' EX_SOFTWARE: a bug; systemd restarts the unit (Restart=on-failure)


class Camera:
    """One camera's pipeline; ``start()`` runs it on its own thread until ``stop()`` or its source ends."""

    def __init__(self, config: CameraConfig, line: LineConfig, model: SharedModel, outputs: list[Output],
                 evidence_dir: Path, inference: Histogram) -> None:
        self.config = config
        self.name = config.camera
        self.model = model
        state = Path(line.state_dir)
        self.disk = DiskWrites()
        self.source = open_source(config.source, memory=state / f"{self.name}.inspected", disk=self.disk)
        self.seq = SeqCounter(state / f"{self.name}.seq")
        # The line sets this: a "model/set" command goes to the model updates of this camera's model.
        self.on_model_set: Callable[[dict], None] | None = None
        self.sink = Sinks([output.sink(self.name, self._on_trigger, self._on_command, self.disk) for output in outputs])
        self.publisher = InOrder(self.sink.publish_verdict)
        evidence = config.evidence
        self.evidence = (EvidenceStore(evidence.dir or evidence_dir, evidence.quota_mb, evidence.format,
                                       evidence.min_free_mb, self.disk) if evidence.enabled else None)
        self.metrics = Metrics(self.name, self.source, self.sink, self.evidence, self.disk, inference)
        self.frames = (TriggeredFrames(self.source, config.trigger.timeout_s, config.trigger.max_pending)
                       if config.mode == "trigger" else None)
        self.stop_requested = threading.Event()
        self.ended: str | None = None  # why the loop ended: "stopped", "source ended", or the problem
        self.exit_code: int | None = None  # what the loop's end means for the process (EXIT_*); None: running
        self.closed = False  # shutdown() done: verdicts flushed, availability announced
        self.alive_at = time.monotonic()  # the loop's last turn, for the line's watchdog
        self._thread: threading.Thread | None = None
        self._last: tuple[Frame, Inspection, LoadedModel] | None = None  # a burst of triggers shares one frame

    # -- lifecycle -------------------------------------------------------------------------------

    def describe(self) -> str:
        manifest = self.model.current.artifact.manifest
        threshold = (f"threshold {self.config.threshold} (config)" if self.config.threshold is not None
                     else f"calibrated threshold {manifest.calibration.image_threshold:.6g}")
        return (f"camera {self.name}: model {manifest.model_id}, {threshold}, {self.config.mode} mode, "
                f"source {self.source.description}")

    def connect(self) -> None:
        """Start the sinks (recover the MQTT spool, connect in the background); ConfigError on an unusable config."""
        self.sink.start()
        self.announce_model(self.model.current)

    def announce_model(self, model: LoadedModel) -> None:
        """Tell the line (retained ``…/model``) which model judges this camera's frames from now on."""
        manifest = model.artifact.manifest
        threshold = self.config.threshold if self.config.threshold is not None else manifest.calibration.image_threshold
        self.sink.publish_model({"model_id": manifest.model_id, "artifact": str(model.artifact.folder.resolve()),
                                 "artifact_checksum": model.inspector.checksum, "threshold": threshold,
                                 "since": iso_utc(time.time())})

    def start(self) -> None:
        """Start the frame loop's thread."""
        if self.frames is not None:
            self.frames.start()
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        """A frame came, or the source reported its failure (no first frame in time, could not open)."""
        c = self.source.counters
        return bool(c.frames or c.stalls or c.reconnects) or self.ended is not None

    def _run(self) -> None:
        try:
            self.ended, code = self._loop()
        except SourceConfigError as exc:  # e.g. the pipeline's appsink delivers a pixel format we cannot convert
            self.ended, code = f"source: {exc}", EXIT_CONFIG
            log.error("camera %s: source: %s; this camera stops", self.name, exc)
        except Exception as exc:  # a bug: the line ends and systemd restarts it
            self.ended, code = f"crashed: {type(exc).__name__}: {exc}", EXIT_CRASH
            log.critical("camera %s crashed: %s: %s", self.name, type(exc).__name__, exc, exc_info=True)
        self.exit_code = code

    def _loop(self) -> tuple[str, int]:
        while not self.stop_requested.is_set():
            self.alive_at = time.monotonic()
            if self.sink.fatal_error:
                log.error("camera %s: %s; this camera stops", self.name, self.sink.fatal_error)
                return self.sink.fatal_error, EXIT_CONFIG
            try:
                if self.frames is None:
                    frame = self.source.read(READ_TIMEOUT_S)
                    waiting = None
                else:
                    waiting, given_up = self.frames.take(READ_TIMEOUT_S)
                    for late, reason, detail in given_up:
                        self._trigger_error(late.trigger, reason, detail)
            except EndOfStream:
                log.info("camera %s: source ended", self.name)
                return "source ended", EXIT_OK
            self.disk.flush()
            if waiting is not None:
                self.process(waiting.frame, waiting.trigger, waiting.arrived)
            elif self.frames is None and frame is not None:
                self.process(frame)
        return "stopped", EXIT_OK

    def stop(self) -> None:
        """Ask the loop to end after the frame in flight."""
        self.stop_requested.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def shutdown(self, availability: str, flush_timeout: float) -> None:
        """Answer waiting triggers, write queued evidence, flush verdicts, announce ``availability`` (retained)."""
        self.closed = True
        for waiting in self.frames.stop() if self.frames is not None else []:
            self._trigger_error(waiting.trigger, "stopping", "the daemon is stopping; trigger not inspected")
        self.source.close()
        if self.evidence is not None:
            self.evidence.close()
        self.publisher.release(NOT_WRITTEN)  # verdicts whose evidence the writer did not get to
        self.sink.stop(flush_timeout, availability)
        self.seq.close()
        c, counts = self.source.counters, self.metrics.verdicts
        log.info("camera %s %s after %.0f s: %d frames, %d OK + %d NG verdicts, %d without a verdict (errors), "
                 "%d skipped, %d lost, %d corrupt, %d stalls, %d source reconnects", self.name,
                 "stopped" if availability == "stopped" else "ended", time.monotonic() - self.metrics.started,
                 c.frames, counts["OK"], counts["NG"], sum(self.metrics.inspection_errors.values()), c.skipped,
                 c.lost, c.corrupt, c.stalls, c.reconnects)

    # -- one frame -------------------------------------------------------------------------------

    def process(self, frame: Frame, trigger: Trigger | None = None, trigger_at: float | None = None) -> dict | None:
        """Inspect one frame and publish its verdict (an NG one once its evidence is settled); the verdict, or
        None when the frame gets none: NaN/inf in the model's output (published on the error topic and counted
        instead), or a seq that could not be recorded (nothing is published, rather than risk a repeated seq)."""
        started = time.monotonic()
        try:
            inspection, model = self._inspect(frame, urgent=trigger is not None)
            decision = decide(inspection.score, model.artifact.manifest.calibration, self.config.threshold)
        except NonFiniteError as exc:
            log.warning("camera %s frame %d: %s", self.name, frame.index, exc)
            self.metrics.inspection_error("non_finite_score")
            self.sink.publish_error({"error": "non_finite_score", "detail": str(exc),
                                     "part_id": trigger.part_id if trigger else None}, trigger)
            return None
        try:
            seq = self.seq.next()
        except OSError as exc:
            self.disk.failed("seq_counter", self.seq.path, exc, "verdict not published (a number that was not "
                             "recorded could come again after a restart)")
            if trigger is not None:
                self._trigger_error(trigger, "not_published", f"the sequence counter {self.seq.path} cannot be "
                                    f"written ({exc.strerror or exc}); verdict withheld rather than risk a repeated seq")
            return None
        self.disk.succeeded("seq_counter")
        done = time.monotonic()
        latency = {**inspection.timings_ms, "wait": (started - frame.monotonic) * 1000.0}
        if trigger_at is not None:
            latency["trigger_to_verdict"] = (done - trigger_at) * 1000.0
        x, y = inspection.location
        ng = decision.verdict == "NG"
        verdict = make_verdict(
            camera=self.name, seq=seq, timestamp=frame.captured, frame_age_s=done - frame.monotonic,
            decision=decision, location=frame.to_source(x, y), latency_ms=latency,
            model_id=model.artifact.manifest.model_id, artifact_checksum=model.inspector.checksum,
            part_id=trigger.part_id if trigger else None,
            evidence_error=DISABLED if ng and self.evidence is None else None,
        )
        self.metrics.inspected(inspection.timings_ms["total"] / 1000.0, decision.verdict)  # before a subscriber sees it
        if ng and self.evidence is not None:
            self.evidence.submit(seq, frame.captured, frame.image, inspection.anomaly_map,
                                 self.publisher.hold(verdict, trigger))
        else:
            self.publisher.publish(verdict, trigger)
        log.debug("camera %s seq %d %s score %.4f frame %d %s", self.name, seq, decision.verdict, decision.score,
                  frame.index, frame.origin)
        return verdict

    def _inspect(self, frame: Frame, urgent: bool) -> tuple[Inspection, LoadedModel]:
        """The frame's inspection and the model that made it; triggers answered by the same frame (a burst) share
        them."""
        if self._last is not None and self._last[0] is frame:
            return self._last[1:]
        inspection, model = self.model.inspect(frame.image, urgent)
        self._last = frame, inspection, model
        return inspection, model

    # -- triggers --------------------------------------------------------------------------------

    def _on_trigger(self, trigger: Trigger) -> None:
        # paho's network thread: note the arrival on the monotonic clock the frames use, and return.
        arrived = time.monotonic()
        if self.frames is None:
            refused = ("not_in_trigger_mode", f"camera {self.name} runs in {self.config.mode} mode and inspects "
                       "without triggers; set `mode: trigger` in its config to inspect per trigger")
        else:
            refused = self.frames.add(trigger, arrived)
        if refused is not None:
            self._trigger_error(trigger, *refused)

    def _on_command(self, name: str, payload: dict) -> None:
        if name == "model/set" and self.on_model_set is not None:
            self.on_model_set(payload)
        else:
            self.sink.publish_error({"error": "unknown_command", "detail": f"camera {self.name} takes no {name!r}"})

    def _trigger_error(self, trigger: Trigger, reason: str, detail: str) -> None:
        log.warning("camera %s: trigger %r not answered: %s", self.name, trigger.part_id, detail)
        self.metrics.trigger_error(reason)
        self.sink.publish_error({"error": reason, "detail": detail, "part_id": trigger.part_id}, trigger)

    # -- state for systemd, metrics, health -------------------------------------------------------

    def status(self) -> str:
        counts = self.metrics.verdicts
        return (f"{self.name} {self.metrics.fps.per_second():.1f} fps, {self.sink.status()}, "
                f"{counts['OK']} OK / {counts['NG']} NG")

    def health(self, max_frame_age_s: float) -> tuple[bool, dict]:
        age = self.source.last_frame_age
        healthy = age is not None and age < max_frame_age_s and not self.closed
        return healthy, {"last_frame_age_s": None if age is None else round(age, 3), **self.sink.health(),
                         **({"ended": self.ended} if self.ended else {})}
