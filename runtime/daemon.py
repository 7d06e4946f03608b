"""The edge daemon, ``patchline run``: one process for a line of cameras.

    camera thread:  source → SharedModel ─┐      (runtime/camera.py, one per camera)
    camera thread:  source → SharedModel ─┤ model thread: one batch, inspected once (runtime/batching.py)
                                          └→ each camera: decide → verdict → its sinks (and NG evidence)

Cameras whose config names the same artifact and engine settings share one loaded model, and their
frames are batched. The main thread supervises: it pings systemd's watchdog while every camera's loop
keeps turning (a hung inference or source stops the pings and systemd restarts us), says READY once
every camera has had a frame or reported its failure, and serves the metrics and health endpoint.

A camera whose source ends or can never work ends alone, saying so on its availability topic; the
others go on. A crash (a bug) in any camera ends the line with EX_SOFTWARE for systemd to restart it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from patchline.runtime.batching import SharedModel
from patchline.runtime.camera import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, Camera
from patchline.runtime.config import CameraConfig, LineConfig
from patchline.runtime.credentials import read_credential
from patchline.runtime.gpu_preflight import preflight
from patchline.runtime.model_updates import ModelUpdates, Slot, load_model
from patchline.runtime.metrics import LineCollector, MetricsServer, inference_histogram
from patchline.runtime.sinks import open_outputs
from patchline.runtime.systemd import Notifier

log = logging.getLogger("patchline.daemon")

SUPERVISE_S = 0.5
STATUS_INTERVAL_S = 5.0
FLUSH_TIMEOUT_S = 5.0
# A camera loop that has not turned for this long is hung (an inference or a source that never returns):
# the watchdog pings stop and systemd restarts the line (WatchdogSec=30 in the unit).
HUNG_AFTER_S = 20.0
JOIN_TIMEOUT_S = 30.0  # the frame in flight when stopping


class Daemon:
    """A line of cameras. Construction checks everything that can be checked before starting."""

    def __init__(self, config: LineConfig, notifier: Notifier | None = None) -> None:
        self.config = config
        for camera in config.cameras:
            preflight(camera)  # a GPU this process cannot open: the node and the fix, not CUDA's "no device"
        state = Path(config.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        self.notifier = notifier or Notifier()
        self.models: dict[tuple, SharedModel] = {}
        self.registry = CollectorRegistry()
        inference = inference_histogram(self.registry)
        groups: dict[tuple, list[CameraConfig]] = {}
        for camera in config.cameras:
            groups.setdefault(camera.model_key(), []).append(camera)
        slots = {}
        for key, group in groups.items():
            with self.notifier.extending_start("loading the engine (a first TensorRT build takes minutes)"):
                loaded = load_model(group[0].artifact, group[0], group, config.model_updates.self_test_tolerance,
                                    require_self_test=False)
            model_id = loaded.artifact.manifest.model_id
            name = model_id + (f"-{len(self.models)}" if any(m.name == model_id for m in self.models.values()) else "")
            self.models[key] = SharedModel(loaded, config.batching, name)
            slots[key] = Slot(self.models[key], group[0].artifact, group[0])
        self.outputs = open_outputs(config)
        self.cameras: list[Camera] = []
        for camera in config.cameras:
            evidence = state / "evidence" if len(config.cameras) == 1 else state / "evidence" / camera.camera
            self.cameras.append(Camera(camera, config, self.models[camera.model_key()], self.outputs, evidence,
                                       inference))
            slots[camera.model_key()].cameras.append(self.cameras[-1])
        key_name = config.model_updates.command_key_credential
        key = read_credential(key_name, "model_updates.command_key_credential").encode() if key_name else None
        self.updates = ModelUpdates(list(slots.values()), config.model_updates, key)
        for slot in slots.values():
            for camera in slot.cameras:
                camera.on_model_set = functools.partial(self.updates.command, slot, camera)
        self.registry.register(LineCollector([c.metrics for c in self.cameras],
                                             lambda: {m.name: (m.batches, m.frames) for m in self.models.values()}))
        self.stop_requested = threading.Event()
        self.server: MetricsServer | None = None
        self._last_status = -float("inf")

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, serve metrics, warm the models, start the cameras. Raises on a configuration problem."""
        cfg = self.config
        for camera in self.cameras:
            engine = camera.model.current.inspector.engine
            log.info("%s, engine %s (%s)", camera.describe(), camera.config.engine,
                     ", ".join(getattr(engine, "providers", [camera.config.device])))
        if len(self.cameras) > 1:
            log.info("line %s: %d cameras, %d models; batches of up to %d frames, waiting at most %g ms", cfg.line,
                     len(self.cameras), len(self.models), cfg.batching.max_batch, cfg.batching.max_wait_ms)
        for output in self.outputs:
            output.start()
        for camera in self.cameras:
            camera.connect()  # before the metrics are served: the spool's verdicts are counted from the first scrape
        if cfg.metrics.enabled:
            self.server = MetricsServer(self.registry, self.health, cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics, health on /healthz", cfg.metrics.host, self.server.port)
        started = time.perf_counter()
        with self.notifier.extending_start("warming up the engine"):
            for model in self.models.values():
                model.current.inspector.warm_up()
        log.info("engine warm in %.2f s; waiting for the first frame", time.perf_counter() - started)
        for camera in self.cameras:
            camera.start()

    def run(self) -> int:
        """Supervise the cameras until stopped (signal), every camera ended, or one crashed; then shut down.

        Returns the exit code: 0 for a stop on request or sources that ended; 78 when every camera ended on a
        problem a restart cannot fix (its source's pipeline, the broker refusing the login); 70 after a crash.
        """
        ready = False
        code = EXIT_OK
        while not self.stop_requested.wait(SUPERVISE_S):
            self._heartbeat()
            self.updates.poll(time.monotonic())
            if not ready and all(c.ready for c in self.cameras):
                ready = True
                self.notifier.ready(self.status())
                log.info("ready: every camera has had a frame or reported its failure")
            for camera in self.cameras:
                if not camera.running and not camera.closed:
                    camera.shutdown("stopped" if camera.exit_code == EXIT_OK else "offline", FLUSH_TIMEOUT_S)
            if any(c.exit_code == EXIT_CRASH for c in self.cameras):
                code = EXIT_CRASH
                log.critical("a camera crashed; ending the line with %d for systemd to restart it", EXIT_CRASH)
                break
            if all(c.closed for c in self.cameras):
                code = max(c.exit_code for c in self.cameras)
                log.info("every camera ended; stopping")
                break
        else:
            log.info("stop requested")
        self.shutdown("stopped" if code == EXIT_OK else "offline")
        return code

    def shutdown(self, availability: str = "offline") -> None:
        """Stop the cameras (each finishes its frame in flight), flush their verdicts, announce ``availability``."""
        self.notifier.stopping("stopping: flushing verdicts")
        for camera in self.cameras:
            camera.stop()
        for camera in self.cameras:
            camera.join(JOIN_TIMEOUT_S)
            if camera.running:
                log.error("camera %s: its loop did not end within %.0f s; stopping without it", camera.name,
                          JOIN_TIMEOUT_S)
        for camera in self.cameras:
            if not camera.closed:
                own = "stopped" if camera.exit_code in (None, EXIT_OK) else "offline"
                camera.shutdown(availability if availability == "offline" else own, FLUSH_TIMEOUT_S)
        for output in self.outputs:
            output.close(availability)
        self.updates.close()
        for model in self.models.values():
            model.close()  # GPU memory is freed here, in its context, not left to the interpreter's exit
        if self.server is not None:
            self.server.close()
        self.notifier.close()

    def request_stop(self, signum: int | None = None, _frame: object = None) -> None:
        """Signal handler: each camera finishes its frame in flight, then the line ends."""
        if signum is not None:
            log.info("signal %d received", signum)
        self.stop_requested.set()

    # -- state for systemd, metrics, health -------------------------------------------------------

    def status(self) -> str:
        return "; ".join(camera.status() for camera in self.cameras)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        hung = [c.name for c in self.cameras if c.running and now - c.alive_at > HUNG_AFTER_S]
        if hung:
            log.error("camera(s) %s: no turn of the frame loop for %.0f s; not pinging the watchdog",
                      ", ".join(hung), HUNG_AFTER_S)
        else:
            self.notifier.watchdog()
        if now - self._last_status >= STATUS_INTERVAL_S:
            self._last_status = now
            self.notifier.send(STATUS=self.status())

    def health(self) -> tuple[bool, dict]:
        max_age = self.config.metrics.health_max_frame_age_s
        cameras = {c.name: c.health(max_age) for c in self.cameras}
        return all(ok for ok, _ in cameras.values()), {"cameras": {n: d for n, (_, d) in cameras.items()}}
