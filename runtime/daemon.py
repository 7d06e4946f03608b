"""The edge daemon, ``patchline run``: frames in, verdicts out.

    source → Inspector → decide → make_verdict → MqttSink (and NG evidence)

The frame loop runs on the main thread and is the only one that inspects; it also pings
systemd's watchdog, so a hung inference or source stops the pings and systemd restarts us.
MQTT delivery, evidence writing and the metrics server run on threads of their own and
never hold up a frame.

Modes: ``continuous`` inspects the newest frame whenever the model is free (older frames
are dropped by the source and counted); ``trigger`` inspects, per PLC trigger, the first
frame captured at or after the trigger arrived (runtime/triggers.py keeps it while the model
is busy).

Nothing the disk does stops the loop: a verdict whose seq cannot be recorded is not published
(SeqCounter), the spool falls back to memory, evidence is skipped and the verdict says why;
each failed write is counted and logged (runtime/disk_writes.py).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from patchline.runtime.artifact import load_artifact
from patchline.runtime.config import ConfigError, RunConfig
from patchline.runtime.decision import decide
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.distance import NonFiniteError
from patchline.runtime.evidence import DISABLED, NOT_WRITTEN, EvidenceStore, InOrder
from patchline.runtime.gpu_preflight import preflight
from patchline.runtime.inspector import Inspection, Inspector
from patchline.runtime.metrics import Metrics, MetricsServer
from patchline.runtime.sinks import open_sinks
from patchline.runtime.sources import EndOfStream, Frame, SourceConfigError, open_source
from patchline.runtime.systemd import Notifier
from patchline.runtime.triggers import Trigger, TriggeredFrames
from patchline.runtime.verdict import SeqCounter, make_verdict

log = logging.getLogger("patchline.daemon")

EXIT_OK = 0
EXIT_CONFIG = 78  # sysexits' EX_CONFIG: a restart cannot help; the unit says RestartPreventExitStatus=78
EXIT_CRASH = 70  # sysexits' EX_SOFTWARE: a bug; systemd restarts the unit (Restart=on-failure)
READ_TIMEOUT_S = 0.5  # the longest the loop waits for a frame before it checks stop, triggers, watchdog
STATUS_INTERVAL_S = 5.0
FLUSH_TIMEOUT_S = 5.0


class Daemon:
    """One camera. Construction checks everything that can be checked before starting."""

    def __init__(self, config: RunConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        preflight(config)  # a GPU this process cannot open: the node and the fix, not CUDA's "no device"
        self.artifact = load_artifact(config.artifact)
        self.calibration = self.artifact.manifest.calibration
        if self.calibration is None and config.threshold is None:
            raise ConfigError(f"{config.artifact}: the artifact is not calibrated and the run config sets no "
                              "threshold; run `patchline calibrate` on it or set `threshold:` in the config")
        roi = config.source.roi
        self.roi_offset = (roi.x, roi.y) if roi else (0, 0)
        state = Path(config.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.disk = DiskWrites()
        self.source = open_source(config.source, memory=state / f"{config.camera}.inspected", disk=self.disk)
        self.notifier = notifier or Notifier()
        with self.notifier.extending_start("loading the engine (a first TensorRT build takes minutes)"):
            self.inspector = Inspector(self.artifact, engine=config.engine, distance=config.distance,
                                       precision=config.precision, device=config.device, threads=config.threads,
                                       tensorrt=config.tensorrt)
        self.seq = SeqCounter(state / f"{config.camera}.seq")
        (self.sink,) = open_sinks(config, self._on_trigger, self.disk)  # MQTT's, the one sink today
        self.publisher = InOrder(self.sink.publish_verdict)
        evidence = config.evidence
        self.evidence = (EvidenceStore(evidence.dir or state / "evidence", evidence.quota_mb, evidence.format,
                                       evidence.min_free_mb, self.disk) if evidence.enabled else None)
        self.metrics = Metrics(config.camera, self.source, [self.sink], self.evidence, self.disk)
        self.frames = (TriggeredFrames(self.source, config.trigger.timeout_s, config.trigger.max_pending)
                       if config.mode == "trigger" else None)
        self.stop_requested = threading.Event()
        self.server: MetricsServer | None = None
        self._last: tuple[Frame, Inspection] | None = None  # triggers answered by one frame share its inspection
        self._last_status = -float("inf")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect (in the background), serve metrics, warm the engine. Raises on a configuration problem."""
        cfg = self.config
        threshold = (f"threshold {cfg.threshold} (config)" if cfg.threshold is not None
                     else f"calibrated threshold {self.calibration.image_threshold:.6g}")
        devices = ", ".join(getattr(self.inspector.engine, "providers", [cfg.device]))
        log.info("camera %s: model %s, %s, engine %s (%s), %s mode, source %s", cfg.camera,
                 self.artifact.manifest.model_id, threshold, cfg.engine, devices, cfg.mode, self.source.description)
        self.sink.start()
        if cfg.metrics.enabled:
            self.server = MetricsServer(self.metrics.registry, self.health, cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics, health on /healthz", cfg.metrics.host, self.server.port)
        started = time.perf_counter()
        with self.notifier.extending_start("warming up the engine"):
            self.inspector.warm_up()
        log.info("engine warm in %.2f s; waiting for the first frame", time.perf_counter() - started)

    def run(self) -> int:
        """The frame loop, until stopped (signal, end of a file source); then shut down. Returns the exit code.

        Only a stop on request or the end of a file source is a clean stop (availability "stopped"); the loop
        ending on an error or a crash says "offline", as the will would, and the exit code tells systemd which.
        """
        try:
            code = self._loop()
        except SourceConfigError as exc:  # e.g. the pipeline's appsink delivers a pixel format we cannot convert
            log.error("source: %s; exiting", exc)
            code = EXIT_CONFIG
        except Exception as exc:
            log.critical("crashed: %s: %s; exiting with %d for systemd to restart the service", type(exc).__name__,
                         exc, EXIT_CRASH, exc_info=True)
            code = EXIT_CRASH
        self.shutdown("stopped" if code == EXIT_OK else "offline")
        return code

    def _loop(self) -> int:
        if self.frames is not None:
            self.frames.start()
        ready = False
        while not self.stop_requested.is_set():
            if self.sink.fatal_error:
                log.error("%s; exiting", self.sink.fatal_error)
                return EXIT_CONFIG
            try:
                if self.frames is None:
                    frame = self.source.read(READ_TIMEOUT_S)
                    waiting = None
                else:
                    waiting, given_up = self.frames.take(READ_TIMEOUT_S)
                    for late, reason, detail in given_up:
                        self._trigger_error(late.trigger, reason, detail)
            except EndOfStream:
                log.info("source ended; stopping")
                return EXIT_OK
            self._heartbeat()
            if not ready and self.source.counters.frames:
                ready = True
                self.notifier.ready(self.status())
                log.info("ready: frames flowing")
            if waiting is not None:
                self.process(waiting.frame, waiting.trigger, waiting.arrived)
            elif self.frames is None and frame is not None:
                self.process(frame)
        log.info("stop requested")
        return EXIT_OK

    def shutdown(self, availability: str = "offline") -> None:
        """Answer waiting triggers, write queued evidence, flush verdicts, announce ``availability`` (retained)."""
        self.notifier.stopping("stopping: flushing verdicts")
        for waiting in self.frames.stop() if self.frames is not None else []:
            self._trigger_error(waiting.trigger, "stopping", "the daemon is stopping; trigger not inspected")
        self.source.close()
        self.inspector.close()  # GPU memory is freed here, in its context, not left to the interpreter's exit
        if self.evidence is not None:
            self.evidence.close()
        self.publisher.release(NOT_WRITTEN)  # verdicts whose evidence the writer did not get to
        self.sink.stop(FLUSH_TIMEOUT_S, availability)
        self.seq.close()
        c, counts = self.source.counters, self.metrics.verdicts
        log.info("%s after %.0f s: %d frames, %d OK + %d NG verdicts, %d without a verdict (errors), %d skipped, %d lost, "
                 "%d corrupt, %d stalls, %d source reconnects",
                 "stopped" if availability == "stopped" else "ended", time.monotonic() - self.metrics.started, c.frames, counts["OK"], counts["NG"],
                 sum(self.metrics.inspection_errors.values()), c.skipped, c.lost, c.corrupt, c.stalls, c.reconnects)
        if self.server is not None:
            self.server.close()
        self.notifier.close()

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: the frame in flight is finished, then the loop ends."""
        if signum is not None:
            log.info("signal %d received", signum)
        self.stop_requested.set()

    # -- one frame -------------------------------------------------------------------------------

    def process(self, frame: Frame, trigger: Trigger | None = None, trigger_at: float | None = None) -> dict | None:
        """Inspect one frame and publish its verdict (an NG one once its evidence is settled); the verdict, or
        None when the frame gets none: NaN/inf in the model's output (published on the error topic and counted
        instead), or a seq that could not be recorded (nothing is published, rather than risk a repeated seq)."""
        started = time.monotonic()
        try:
            inspection = self._inspect(frame)
            decision = decide(inspection.score, self.calibration, self.config.threshold)
        except NonFiniteError as exc:
            log.warning("frame %d: %s", frame.index, exc)
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
            camera=self.config.camera, seq=seq, timestamp=frame.captured, frame_age_s=done - frame.monotonic,
            decision=decision, location=(x + self.roi_offset[0], y + self.roi_offset[1]), latency_ms=latency,
            model_id=self.artifact.manifest.model_id, artifact_checksum=self.inspector.checksum,
            part_id=trigger.part_id if trigger else None,
            evidence_error=DISABLED if ng and self.evidence is None else None,
        )
        self.metrics.inspected(inspection.timings_ms["total"] / 1000.0, decision.verdict)  # before a subscriber sees it
        if ng and self.evidence is not None:
            self.evidence.submit(seq, frame.captured, frame.image, inspection.anomaly_map,
                                 self.publisher.hold(verdict, trigger))
        else:
            self.publisher.publish(verdict, trigger)
        log.debug("seq %d %s score %.4f frame %d %s", seq, decision.verdict, decision.score, frame.index, frame.origin)
        return verdict

    def _inspect(self, frame: Frame) -> Inspection:
        """The frame's inspection; triggers answered by the same frame (a burst) share one."""
        if self._last is not None and self._last[0] is frame:
            return self._last[1]
        inspection = self.inspector.inspect(frame.image)
        self._last = frame, inspection
        return inspection

    # -- triggers --------------------------------------------------------------------------------

    def _on_trigger(self, trigger: Trigger) -> None:
        # paho's network thread: note the arrival on the monotonic clock the frames use, and return.
        arrived = time.monotonic()
        if self.frames is None:
            refused = ("not_in_trigger_mode", f"the daemon runs in {self.config.mode} mode and inspects without "
                       "triggers; set `mode: trigger` in the run config to inspect per trigger")
        else:
            refused = self.frames.add(trigger, arrived)
        if refused is not None:
            self._trigger_error(trigger, *refused)

    def _trigger_error(self, trigger: Trigger, reason: str, detail: str) -> None:
        log.warning("trigger %r not answered: %s", trigger.part_id, detail)
        self.metrics.trigger_error(reason)
        self.sink.publish_error({"error": reason, "detail": detail, "part_id": trigger.part_id}, trigger)

    # -- state for systemd, metrics, health -------------------------------------------------------

    def status(self) -> str:
        counts = self.metrics.verdicts
        return f"{self.metrics.fps.per_second():.1f} fps, {self.sink.status()}, {counts['OK']} OK / {counts['NG']} NG"

    def _heartbeat(self) -> None:
        self.notifier.watchdog()
        self.disk.flush()
        now = time.monotonic()
        if now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            self.notifier.send(STATUS=self.status())

    def health(self) -> tuple[bool, dict]:
        age = self.source.last_frame_age
        healthy = age is not None and age < self.config.metrics.health_max_frame_age_s
        return healthy, {"last_frame_age_s": None if age is None else round(age, 3), **self.sink.health()}
