"""Models swapped without a restart: a new export or a recalibration goes live between two frames.

What starts an update: SIGHUP (reload every model's configured artifact path), the artifact path
changing under a running model — a folder whose manifest is replaced, or a symlink swapped atomically
to a new folder (``ln -sfn v2 current.new && mv -T current.new current``), noticed within
``model_updates.watch_interval_s`` —, or a signed command on ``…/<camera>/model/set``:
``{"artifact": PATH, "checksum": ARTIFACT_CHECKSUM, "signature": HEX}``, the signature being
HMAC-SHA256 over ``PATH + "\n" + ARTIFACT_CHECKSUM`` with the secret ``model_updates.command_key_credential``
names (the broker's ACL should also limit who may publish there). The checksum is the one verdicts carry
(``artifact_checksum``): the candidate must have it. The commanded path is followed from then on, until a
restart goes back to the configured one.

A candidate is loaded beside the running model, on a thread of its own, and must pass everything a
start would check — schema and checksums, the cameras' threshold or its calibration, the engine built
and loaded — and score the artifact's self-test images (runtime/self_test.py) within
``model_updates.self_test_tolerance``; that also warms it up. Only then does the shared model swap it in
between two batches (runtime/batching.py): no frame is dropped or judged by a half-loaded model, and each
verdict names the model that judged it (``model_id``, ``artifact_checksum``). A candidate that fails is
refused, the reason logged and published on each of its cameras' error topic (``model_refused``), and
the running model keeps going; the same files are not tried again until they change. Each camera's
retained ``…/model`` topic says which model judges its frames, from the start and after every swap.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from patchline.runtime.artifact import MANIFEST, ArtifactError, load_artifact
from patchline.runtime.batching import LoadedModel, SharedModel
from patchline.runtime.camera import Camera
from patchline.runtime.config import CameraConfig, ConfigError, ModelUpdatesConfig
from patchline.runtime.search.cuda_device import GpuUnavailable
from patchline.runtime.inspector import Inspector
from patchline.runtime.self_test import SELF_TEST_KEY, check

log = logging.getLogger("patchline.models")

Fingerprint = tuple  # what identifies the files behind an artifact path: a change means an update


def fingerprint(path: str) -> Fingerprint | None:
    """The artifact folder a path leads to (through symlinks) and its manifest's identity; None when unreadable."""
    folder = os.path.realpath(path)
    try:
        info = os.stat(Path(folder) / MANIFEST)
    except OSError:
        return None
    return folder, info.st_ino, info.st_mtime_ns, info.st_size


def load_model(path: str | Path, settings: CameraConfig, cameras: list[CameraConfig], self_test_tolerance: float,
               require_self_test: bool) -> LoadedModel:
    """An artifact loaded and checked: schema, checksums, a threshold for each camera (its own or the calibration),
    the engine, and its self-test images' scores — which a model loaded into a running line must have (a start
    takes an artifact without them: an older export, an anomalib import)."""
    artifact = load_artifact(path)
    for camera in cameras:
        if artifact.manifest.calibration is None and camera.threshold is None:
            raise ConfigError(f"camera {camera.camera}: {path}: the artifact is not calibrated and the config sets no "
                              "threshold; run `patchline calibrate` on it or set `threshold:`")
    inspector = Inspector(artifact, engine=settings.engine, distance=settings.distance, precision=settings.precision,
                          device=settings.device, threads=settings.threads, tensorrt=settings.tensorrt)
    try:
        if require_self_test or SELF_TEST_KEY in artifact.manifest.extra_files:
            check(artifact, inspector, self_test_tolerance)
    except BaseException:
        inspector.close()
        raise
    return LoadedModel(artifact, inspector)


@dataclass
class Slot:
    """One shared model and what it was configured with."""

    model: SharedModel
    path: str  # as the cameras' config names it: a symlink is followed anew at each update
    settings: CameraConfig  # engine settings (shared by its cameras)
    cameras: list[Camera] = field(default_factory=list)
    seen: Fingerprint | None = None  # the files last loaded or refused


def command_signature(key: bytes, artifact: str, checksum: str) -> str:
    """What signs a ``model/set`` command: HMAC-SHA256 over the artifact path and its checksum."""
    return hmac.new(key, f"{artifact}\n{checksum}".encode(), hashlib.sha256).hexdigest()


class ModelUpdates:
    """Watches the slots' artifact paths, loads candidates on a thread of its own, swaps the good ones in."""

    def __init__(self, slots: list[Slot], config: ModelUpdatesConfig, command_key: bytes | None) -> None:
        self.slots = slots
        self.config = config
        self.command_key = command_key
        self.reload_requested = threading.Event()
        self._requests: queue.Queue[tuple[Slot, str, str, str | None] | None] = queue.Queue()
        self._last_watch = 0.0
        for slot in slots:
            slot.seen = fingerprint(slot.path)
        self._worker = threading.Thread(target=self._serve, name="model-updates", daemon=True)
        self._worker.start()

    def request_reload(self, signum: int | None = None, _frame: object = None) -> None:
        """SIGHUP handler: reload every model from its configured path."""
        self.reload_requested.set()

    def poll(self, now: float) -> None:
        """From the line's supervising loop: act on SIGHUP, and look at the paths every watch interval."""
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            log.info("SIGHUP: reloading %d model(s)", len(self.slots))
            for slot in self.slots:
                slot.seen = fingerprint(slot.path)
                self._requests.put((slot, "reload requested (SIGHUP)", slot.path, None))
        if not self.config.watch or now - self._last_watch < self.config.watch_interval_s:
            return
        self._last_watch = now
        for slot in self.slots:
            current = fingerprint(slot.path)
            if current is not None and current != slot.seen:
                slot.seen = current
                self._requests.put((slot, f"{slot.path} changed", slot.path, None))

    def command(self, slot: Slot, camera: Camera, payload: dict) -> None:
        """A ``model/set`` command received by ``camera`` (paho's thread: checked here, loaded on the worker)."""
        artifact, checksum, signature = (payload.get(k) for k in ("artifact", "checksum", "signature"))
        if self.command_key is None:
            problem = "model commands are off: set model_updates.command_key_credential to take them"
        elif not all(isinstance(v, str) for v in (artifact, checksum, signature)):
            problem = "the command needs artifact, checksum and signature, each a string"
        elif not re.fullmatch(r"[0-9a-f]{64}", checksum):
            problem = "checksum must be the artifact_checksum of the artifact (64 hex digits)"
        elif not hmac.compare_digest(signature, command_signature(self.command_key, artifact, checksum)):
            problem = "the signature does not match (HMAC-SHA256 over artifact + newline + checksum)"
        else:
            self._requests.put((slot, f"commanded on {camera.name}'s model/set", artifact, checksum))
            return
        log.warning("camera %s: model/set refused: %s", camera.name, problem)
        camera.sink.publish_error({"error": "model_command_refused", "detail": problem,
                                   "artifact": artifact if isinstance(artifact, str) else None})

    def close(self) -> None:
        self._requests.put(None)
        self._worker.join()

    def _serve(self) -> None:
        while (request := self._requests.get()) is not None:
            slot, reason, path, checksum = request
            try:
                self._update(slot, reason, path, checksum)
            except Exception:  # never let the updater die: the next change is tried again
                log.exception("model %s: unexpected error while loading %s", slot.model.name, slot.path)

    def _update(self, slot: Slot, reason: str, path: str, checksum: str | None) -> None:
        running = slot.model.current
        log.info("model %s: loading %s (%s) beside %s", slot.model.name, path, reason,
                 running.artifact.manifest.model_id)
        try:
            candidate = load_model(path, slot.settings, [c.config for c in slot.cameras],
                                   self.config.self_test_tolerance, require_self_test=True)
            if checksum is not None and candidate.inspector.checksum != checksum:
                candidate.inspector.close()
                raise ArtifactError(f"{path}: its artifact_checksum is {candidate.inspector.checksum}, the command "
                                    f"says {checksum}")
        except (ArtifactError, ConfigError, GpuUnavailable, OSError, ValueError, MemoryError) as exc:
            detail = f"{path}: {exc}" if str(path) not in str(exc) else str(exc)
            log.error("model %s: refused, %s keeps running: %s", slot.model.name,
                      running.artifact.manifest.model_id, detail)
            for camera in slot.cameras:
                camera.sink.publish_error({"error": "model_refused", "detail": detail, "artifact": path})
            return
        if path != slot.path:  # a commanded artifact: watched from now on
            slot.path, slot.seen = path, fingerprint(path)
        same = (candidate.inspector.checksum == running.inspector.checksum
                and candidate.artifact.manifest.calibration == running.artifact.manifest.calibration)
        if same:
            candidate.inspector.close()
            log.info("model %s: %s is what runs already; nothing to swap", slot.model.name, slot.path)
            return
        slot.model.swap(candidate)
        for camera in slot.cameras:
            camera.announce_model(candidate)
        log.info("model %s: swapped in %s (%s), was %s; cameras %s", slot.model.name,
                 candidate.artifact.manifest.model_id, candidate.artifact.folder, running.artifact.manifest.model_id,
                 ", ".join(c.name for c in slot.cameras))
