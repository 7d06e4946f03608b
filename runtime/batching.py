"""One model shared by the cameras that use it: their frames gathered into batches, inspected once.

Each camera's thread calls ``SharedModel.inspect(image, urgent)`` and blocks until its result is back. A
worker thread takes the first waiting frame, waits at most ``max_wait_ms`` for frames of other cameras (never
longer: a camera alone is not slowed down by more than that), runs them as one batch of up to ``max_batch``,
and hands each camera its own result. Frames of trigger cameras (``urgent``) go into a batch before those of
continuous ones, so a continuous camera never makes a trigger wait for more than the batch in flight.

A new model (runtime/model_updates.py) is swapped in between two batches: the batch in flight finishes on
the old one, every frame after it is judged by the new one, and each result names the model that made it.

Batching pays where the engine's cost per frame falls with the batch (a GPU above all) and because the bank
search of the whole batch is one matrix product; with N separate processes the cores are shared by N models
instead (docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from patchline.runtime.artifact import Artifact
from patchline.runtime.config import BatchingConfig
from patchline.runtime.search.distance import NonFiniteError
from patchline.runtime.inspector import Inspection, Inspector

log = logging.getLogger("patchline.batching")


@dataclass(frozen=True)
class LoadedModel:
    """A model as it judges frames: its artifact (model id, calibration, checksums) and the engine running it."""

    artifact: Artifact
    inspector: Inspector


class SharedModel:
    """A model serving several cameras; ``inspect`` may be called from any thread."""

    def __init__(self, model: LoadedModel, batching: BatchingConfig, name: str) -> None:
        self.current = model
        self.max_batch = min(batching.max_batch, getattr(model.inspector.engine, "max_batch", batching.max_batch))
        self.max_wait_s = batching.max_wait_ms / 1000.0
        self.name = name
        self.batches = 0
        self.frames = 0
        self._cond = threading.Condition()
        self._waiting: list[tuple[bool, np.ndarray, Future]] = []  # (urgent, image, its result)
        self._next: tuple[LoadedModel, threading.Event] | None = None  # a swap the worker has not made yet
        self._closed = False
        self._worker = threading.Thread(target=self._serve, name=f"model-{name}", daemon=True)
        self._worker.start()

    def inspect(self, image: np.ndarray, urgent: bool = False) -> tuple[Inspection, LoadedModel]:
        """The image's inspection and the model that made it, run in a batch with other cameras' frames; raises
        what inspecting it raised."""
        result: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.name} is closed")
            self._waiting.append((urgent, image, result))
            self._cond.notify_all()
        return result.result()

    def swap(self, model: LoadedModel, timeout: float = 60.0) -> bool:
        """Judge every frame after the batch in flight with ``model``; the old model is closed. Returns once the
        swap is made (True), or False when it was not made within ``timeout``: then it is still to come."""
        done = threading.Event()
        with self._cond:
            if self._closed:
                raise RuntimeError(f"model {self.name} is closed")
            self._next = model, done
            self._cond.notify_all()
        return done.wait(timeout)

    def close(self) -> None:
        """Finish the batch in flight, refuse new frames, free the model."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join()
        self.current.inspector.close()
        if self._next is not None:  # a swap that came too late
            self._next[0].inspector.close()

    def _serve(self) -> None:
        while True:
            batch, retired = self._gather()
            if retired is not None:
                retired.inspector.close()  # after the batch it ran: no frame is left half-judged by it
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _gather(self) -> tuple[list[tuple[bool, np.ndarray, Future]] | None, LoadedModel | None]:
        """The next batch ([] when there is only a swap to make, None when closed), and the model a swap retired."""
        with self._cond:
            self._cond.wait_for(lambda: self._waiting or self._closed or self._next is not None)
            if self._next is not None and not self._closed:
                retired, (self.current, done) = self.current, self._next
                self._next = None
                done.set()
                return [], retired
            if not self._waiting:
                return None, None
            deadline = time.monotonic() + self.max_wait_s
            while len(self._waiting) < self.max_batch and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self._waiting.sort(key=lambda item: not item[0])  # stable: urgent first, each kind in arrival order
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            return batch, None

    def _run(self, batch: list[tuple[bool, np.ndarray, Future]]) -> None:
        model = self.current
        try:
            results = model.inspector.inspect_batch([image for _, image, _ in batch])
        except NonFiniteError as exc:
            if len(batch) == 1:
                batch[0][2].set_exception(exc)
                return
            # One camera's bad frame must not cost the others theirs: each alone tells whose it was.
            for item in batch:
                self._run([item])
            return
        except BaseException as exc:  # a bug or a broken engine: every camera waiting is told, none hangs
            for _, _, result in batch:
                result.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        self.batches += 1
        self.frames += len(batch)
        for (_, _, result), inspection in zip(batch, results):
            result.set_result((inspection, model))
