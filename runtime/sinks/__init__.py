"""Where verdicts go: the interface the daemon depends on, and the sinks by config key.

A sink is one protocol's output for one camera (MQTT today; OPC UA, Sparkplug B, Modbus TCP to come). It may
also be a trigger input: the triggers it receives go to the ``on_trigger`` callback it was made with, parsed
by ``runtime.triggers.parse_trigger``. A new sink is a module (or package) here, a line in ``SINKS`` and its
config section, a ``LineConfig`` field of the same name (shared by the line's cameras, each its own sink); the daemon, metrics and CLI stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import Metric

from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.sinks.mqtt.sink import MqttSink
from patchline.runtime.triggers import Trigger

if TYPE_CHECKING:
    from patchline.runtime.config import LineConfig


class Sink(Protocol):
    """What the daemon needs of a sink. Configuration problems raise ``ConfigError`` (when made, or at ``start``).

    Made as ``factory(section, camera, state_dir, on_trigger=..., disk=..., on_command=...)``: its section of the run config,
    where it may keep state, the daemon's callback for the triggers it receives (run on the sink's own thread:
    it returns quickly), and the daemon's count of the writes the disk refused.
    """

    def start(self) -> None:
        """Begin working (connect in the background); never waits for a peer."""

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        """Hand over a verdict (from ``make_verdict``; in order, after the ones before it); never blocks."""

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        """Report ``payload`` (``error``: a short code, ``detail``, ...), and to the trigger's requester if any."""

    def publish_model(self, state: dict) -> None:
        """Announce the model that judges the camera's frames from now on (``model_id``, ``artifact``,
        ``artifact_checksum``, ``threshold``, ``since``), kept where the protocol keeps state."""

    def stop(self, flush_timeout: float, availability: str) -> None:
        """Deliver what is pending within ``flush_timeout`` s, then announce ``availability``: "stopped" for a stop
        on request or the end of a file source, "offline" when the daemon ends on an error or a crash."""

    @property
    def fatal_error(self) -> str | None:
        """Why the sink cannot work and a restart would not help, naming the sink; None while usable."""

    def health(self) -> dict[str, object]:
        """The sink's fields of ``/healthz``'s JSON."""

    def status(self) -> str:
        """A few words for systemd's STATUS line, e.g. "broker connected, queue 0"."""

    def collect(self, camera: str) -> Iterable[Metric]:
        """The sink's Prometheus metric families, each labelled with ``camera``."""


SINKS: dict[str, Callable[..., Sink]] = {"mqtt": MqttSink}


def open_sinks(line: LineConfig, camera: str, on_trigger: Callable[[Trigger], None], disk: DiskWrites,
               on_command: Callable[[str, dict], None]) -> list[Sink]:
    """``camera``'s sink for each entry of ``SINKS`` whose section the line's config has (``mqtt``'s, with its
    defaults, always). ``on_command`` gets the commands a sink receives (``"model/set"``, a JSON object)."""
    return [factory(section, camera, line.state_dir, on_trigger=on_trigger, disk=disk, on_command=on_command)
            for key, factory in SINKS.items() if (section := getattr(line, key)) is not None]
