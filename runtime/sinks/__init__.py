"""Where verdicts go: the interfaces the daemon depends on, and the outputs by config key.

An **output** is one protocol for the whole line, made once from its section of the run config: the MQTT
connections, an OPC UA server, a Sparkplug B edge node, a Modbus TCP server. It gives each camera a **sink**:
that camera's verdicts, errors, model and availability in the protocol's terms. A sink may also be a trigger
input: the triggers it receives go to the ``on_trigger`` callback it was made with (``Trigger``; payloads
parsed by ``runtime.triggers.parse_trigger`` where the protocol carries text), and commands to ``on_command``.
Every camera's verdicts go to every output that is on, the same verdicts with the same seq (``Sinks``).

A new output is a module (or package) here with its config class beside it (pydantic only, so that
runtime/config.py can import it), a line in ``OUTPUTS`` and a ``LineSettings`` field of the same name in
runtime/config.py (None: off). Its module is imported only when its section is set, so that an edge box
installs the libraries of the protocols it speaks (the pip extra named as the key) and no other.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client.core import Metric

from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.triggers import Trigger

if TYPE_CHECKING:
    from patchline.runtime.config import LineConfig


class Sink(Protocol):
    """What a camera needs of one protocol's output. Configuration problems raise ``ConfigError`` at ``start``."""

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
        on request or the end of a file source, "offline" when the camera ends on an error or a crash."""

    @property
    def fatal_error(self) -> str | None:
        """Why the sink cannot work and a restart would not help, naming the sink; None while usable."""

    def health(self) -> dict[str, object]:
        """The sink's fields of ``/healthz``'s JSON (named for the protocol: ``mqtt_connected``, …)."""

    def status(self) -> str:
        """A few words for systemd's STATUS line, e.g. "broker connected, queue 0"."""

    def collect(self, camera: str) -> Iterable[Metric]:
        """The sink's Prometheus metric families, each labelled with ``camera``."""


class Output(Protocol):
    """One protocol for the whole line. Made as ``factory(section, line)``: its section of the run config and the
    line's config (cameras, state_dir). The daemon calls ``sink`` for each camera, then ``start``; after every
    camera's sink has stopped, ``close``."""

    def sink(self, camera: str, on_trigger: Callable[[Trigger], None], on_command: Callable[[str, dict], None],
             disk: DiskWrites) -> Sink:
        """``camera``'s sink. ``on_trigger`` and ``on_command`` (``"model/set"``, a JSON object) run on the
        output's own thread and return quickly; ``disk`` counts the writes the disk refused."""

    def start(self) -> None:
        """Open what the line shares (a listening port, a connection) in the background; ``ConfigError`` when it
        cannot work (a port taken, a certificate that does not load): the line refuses to start."""

    def close(self, availability: str) -> None:
        """Announce ``availability`` for the line where the protocol has such a thing, and release everything."""


# key (the run config's section) → "module:factory", imported when the section is set.
OUTPUTS: dict[str, str] = {
    "mqtt": "patchline.runtime.sinks.mqtt.sink:MqttOutput",
    "opcua": "patchline.runtime.sinks.opcua.server:OpcUaOutput",
    "sparkplug": "patchline.runtime.sinks.sparkplug.node:SparkplugOutput",
    "modbus": "patchline.runtime.sinks.modbus.server:ModbusOutput",
}


def open_outputs(line: LineConfig) -> list[Output]:
    """An output for each entry of ``OUTPUTS`` whose section the line's config sets (``mqtt``: always).

    Raises ConfigError when the output's library is not installed."""
    # Imported here: runtime/config.py imports the outputs' config classes, and so this package, first.
    from patchline.runtime.config import ConfigError

    outputs = []
    for key, target in OUTPUTS.items():
        section = getattr(line, key)
        if section is None:
            continue
        module, _, name = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module), name)
        except ImportError as exc:
            raise ConfigError(f"{key}: this output needs {exc.name}, which is not installed: "
                              f"pip install 'patchline[{key}]'") from None  # each output's extra is named as its key
        outputs.append(factory(section, line))
    return outputs


class Sinks:
    """A camera's sinks as one: each verdict, error and model goes to every output, in the order given."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def start(self) -> None:
        for sink in self.sinks:
            sink.start()

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        for sink in self.sinks:
            sink.publish_verdict(verdict, trigger)

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        for sink in self.sinks:
            sink.publish_error(payload, trigger)

    def publish_model(self, state: dict) -> None:
        for sink in self.sinks:
            sink.publish_model(state)

    def stop(self, flush_timeout: float, availability: str) -> None:
        """Each sink in turn, within one ``flush_timeout`` for all (each gets at least a moment to announce)."""
        deadline = time.monotonic() + flush_timeout
        for sink in self.sinks:
            sink.stop(max(0.5, deadline - time.monotonic()), availability)

    @property
    def fatal_error(self) -> str | None:
        return next((error for sink in self.sinks if (error := sink.fatal_error)), None)

    def health(self) -> dict[str, object]:
        return {key: value for sink in self.sinks for key, value in sink.health().items()}

    def status(self) -> str:
        return ", ".join(sink.status() for sink in self.sinks)

    def collect(self, camera: str) -> Iterator[Metric]:
        for sink in self.sinks:
            yield from sink.collect(camera)
