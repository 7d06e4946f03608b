"""``ModbusOutput``: the line's Modbus TCP server (pymodbus), a unit id per camera, each with registers.py's map.

Thread model: pymodbus runs on the output's own thread, in its own asyncio loop, and so does everything that reads
or changes a camera's registers: a ``ModbusSink``'s ``publish_*`` calls come from the camera's thread and only hand
over to that loop (``call_soon_threadsafe``), in order. The registers a PLC reads are the sink's ``words``: the
device's ``action`` (pymodbus calls it before each access) copies them into pymodbus's block on a read, and checks
and applies a write; a read of several registers is therefore one consistent snapshot.

The handshake (README): the PLC writes the part id and sets ``TRIGGER`` (a 0 → 1 edge; writing the value it
already holds does nothing, so a PLC that writes its output image every cycle is fine) → ``BUSY``, the trigger goes
to the camera; its answer (the verdict or error for *that* ``Trigger``) → the trigger result, then ``DONE`` (in that
order, on one thread: a PLC that sees ``DONE`` reads the result it belongs to); the PLC clears ``TRIGGER`` →
``DONE`` goes back to 0. An edge while ``BUSY`` (the PLC cleared the trigger early and set it again) is refused:
``concurrent_trigger`` in the trigger result and ``DONE``, so the PLC is not left waiting; the earlier answer,
when it comes, updates only the latest result.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from patchline.runtime.config import ConfigError, LineConfig
from patchline.runtime.disk_writes import DiskWrites
from patchline.runtime.metrics import per_camera
from patchline.runtime.sinks.modbus import registers as r
from patchline.runtime.sinks.modbus.config import ModbusConfig
from patchline.runtime.throttled_log import ThrottledLog
from patchline.runtime.triggers import Trigger, check_part_id

log = logging.getLogger(__name__)

LISTEN_TIMEOUT_S = 10.0
COIL_WRITES = (5, 15)  # write single / multiple coils: the bits of the registers


class ModbusSink:
    """One camera's unit id: its registers, its handshake, and its triggers in."""

    def __init__(self, output: ModbusOutput, camera: str, unit: int, on_trigger: Callable[[Trigger], None]) -> None:
        self.output = output
        self.camera = camera
        self.unit = unit
        self.on_trigger = on_trigger
        # Loop thread only, from here on.
        self.words = [0] * r.REGISTERS
        self.words[r.TRIGGER_RESULT:r.TRIGGER_RESULT + r.RESULT_REGISTERS] = r.error_result("ok", None)[0]
        self.words[r.LATEST_RESULT:r.LATEST_RESULT + r.RESULT_REGISTERS] = r.error_result("ok", None)[0]
        self.running = False
        self._pending: Trigger | None = None  # the trigger this unit owes an answer to (BUSY)
        self._shown: Trigger | None = None  # the one whose answer the trigger result will show
        self.triggers = 0
        self.triggers_refused = 0
        self.writes_refused = 0
        self._refusals = ThrottledLog(log)

    # -- sink interface (camera's thread) --------------------------------------------------------

    def start(self) -> None:
        self.output.call(self._set_state, "online")

    def publish_verdict(self, verdict: dict, trigger: Trigger | None = None) -> None:
        self.output.call(self._verdict, verdict, trigger)

    def publish_error(self, payload: dict, trigger: Trigger | None = None) -> None:
        if trigger is not None:  # the registers answer only triggers; the rest is MQTT's error topic
            self.output.call(self._error, payload, trigger)

    def publish_model(self, state: dict) -> None:
        self.output.call(self._model, state)

    def stop(self, flush_timeout: float, availability: str) -> None:
        """Apply what was handed over before, answer a trigger still owed with ``stopping``, and show
        ``availability`` in the camera state register."""
        if not self.output.listening:  # never served (another output refused the line's start): nothing to show
            return
        if not self.output.call_and_wait(self._stop, flush_timeout, availability):
            log.warning("Modbus: camera %s: the server's thread did not apply its last values within %.1f s",
                        self.camera, flush_timeout)

    @property
    def fatal_error(self) -> str | None:
        return None  # a server that listens keeps working; one that cannot refuses the start (ConfigError)

    def health(self) -> dict[str, object]:
        return {"modbus_listening": self.output.listening, "modbus_clients": self.output.clients}

    def status(self) -> str:
        return f"modbus unit {self.unit}, {self.output.clients} client(s)"

    def collect(self, camera: str) -> Iterator[Metric]:
        yield from per_camera(CounterMetricFamily, camera, {
            "patchline_modbus_triggers": ("Triggers a PLC set over Modbus and the camera was asked to answer",
                                          self.triggers),
            "patchline_modbus_triggers_refused": ("Triggers set while an answer was owed (concurrent_trigger)",
                                                  self.triggers_refused),
            "patchline_modbus_writes_refused": ("Modbus writes refused with an exception (out of range, read-only, "
                                                "part id 0)", self.writes_refused),
        })
        yield from per_camera(GaugeMetricFamily, camera, {
            "patchline_modbus_clients": ("Clients connected to the line's Modbus server", self.output.clients),
            "patchline_modbus_listening": ("1 while the line's Modbus server listens", float(self.output.listening)),
        })

    # -- on the loop -----------------------------------------------------------------------------

    def _put(self, address: int, words: list[int]) -> None:
        self.words[address:address + len(words)] = words

    def _set_state(self, availability: str) -> None:
        self.running = availability == "online"
        self.words[r.CAMERA_STATE] = r.STATES[availability]

    def _verdict(self, verdict: dict, trigger: Trigger | None) -> None:
        words = r.result(verdict)
        self._answer(trigger, words)
        self._put(r.LATEST_RESULT, words)

    def _error(self, payload: dict, trigger: Trigger) -> None:
        code = str(payload.get("error"))
        words, known = r.error_result(code, payload.get("part_id"))
        if trigger is self._pending and not known:
            log.warning("Modbus: camera %s: error %r has no code of its own in the register map; shown as %d (other)",
                        self.camera, code, r.ERRORS["other"])
        self._answer(trigger, words)

    def _answer(self, trigger: Trigger | None, words: list[int]) -> None:
        """``words`` answer ``trigger`` if it is the one this unit owes: the trigger result, then DONE."""
        if trigger is None or trigger is not self._pending:
            return
        self._pending = None
        self.words[r.BUSY] = 0
        if self._shown is trigger:
            self._shown = None
            self._put(r.TRIGGER_RESULT, words)
            # A PLC that cleared its trigger early waits for nothing: the result lands, DONE stays 0.
            self.words[r.DONE] = self.words[r.TRIGGER]

    def _model(self, state: dict) -> None:
        self._put(r.MODEL_HASH, r.u32(r.checksum_hash(state.get("artifact_checksum"))))
        self._put(r.MODEL_ID, r.ascii_registers(str(state.get("model_id", "")), r.MODEL_ID_REGISTERS))

    def _stop(self, availability: str) -> None:
        if self._pending is not None:
            self._answer(self._pending, r.error_result("stopping", self._pending.part_id)[0])
        self._set_state(availability)
        self._refusals.flush(force=True)

    def heartbeat(self) -> None:
        if self.running:
            self.words[r.HEARTBEAT] = (self.words[r.HEARTBEAT] + 1) & 0xFFFF
        self._refusals.flush()

    async def access(self, function_code: int, start_address: int, address: int, count: int,
                     registers: list[int], values: list[int] | list[bool] | None) -> ExcCodes | None:
        """pymodbus's ``action``: before a read, the registers as they are; a write checked, then applied."""
        if values is None:
            registers[:r.REGISTERS] = self.words  # index 0 is start_address, 0 here
            return None
        return self._write(function_code, address, list(values))

    def _write(self, function_code: int, address: int, values: list) -> ExcCodes | None:
        if function_code in COIL_WRITES:
            if address != 16 * r.TRIGGER or len(values) != 1:
                return self._refuse("read_only", ExcCodes.ILLEGAL_ADDRESS,
                                    f"coils {address}..{address + len(values) - 1}: only the trigger's, coil "
                                    f"{16 * r.TRIGGER}, takes writes")
            address, values = r.TRIGGER, [int(bool(values[0]))]
        end = address + len(values)
        if address < r.WRITABLE.start or end > r.WRITABLE.stop:
            return self._refuse("read_only", ExcCodes.ILLEGAL_ADDRESS,
                                f"registers {address}..{end - 1}: the PLC writes only {r.WRITABLE.start}.."
                                f"{r.WRITABLE.stop - 1} (trigger, part id)")
        after = self.words[:r.WRITABLE.stop]
        after[address:end] = values
        trigger = after[r.TRIGGER]
        if trigger not in (0, 1):
            return self._refuse("out_of_range", ExcCodes.ILLEGAL_VALUE, f"trigger = {trigger}: only 0 and 1")
        before = self.words[r.TRIGGER]
        part_id = r.decode_u32(after[r.PART_ID:r.PART_ID + 2])
        if trigger > before and part_id == 0:
            return self._refuse("invalid_part_id", ExcCodes.ILLEGAL_VALUE,
                                "trigger set while the part id registers hold 0: write the part id (1..4294967295) "
                                "first or in the same request")
        self._put(address, values)
        if trigger > before:
            self._triggered(part_id)
        elif trigger < before:
            self.words[r.DONE] = 0
        return None

    def _refuse(self, code: str, exception: ExcCodes, detail: str) -> ExcCodes:
        self.writes_refused += 1
        self.words[r.WRITE_ERROR] = r.ERRORS[code]
        self.words[r.WRITES_REFUSED] = (self.words[r.WRITES_REFUSED] + 1) & 0xFFFF
        self._refusals(f"Modbus: camera {self.camera} (unit {self.unit}): write refused ({code}): {detail}", code)
        return exception

    def _triggered(self, number: int) -> None:
        trigger = Trigger(part_id=check_part_id(number), received=time.time())
        if self._pending is not None:
            self.triggers_refused += 1
            self._refusals(f"Modbus: camera {self.camera} (unit {self.unit}): trigger for part {number} refused: "
                           f"the answer to part {self._pending.part_id} is still owed (concurrent_trigger)",
                           "concurrent_trigger")
            self._shown = None
            self._put(r.TRIGGER_RESULT, r.error_result("concurrent_trigger", trigger.part_id)[0])
            self.words[r.DONE] = 1
            return
        self._pending = self._shown = trigger
        self.words[r.DONE] = 0
        self._put(r.TRIGGER_RESULT, [0] * r.RESULT_REGISTERS)
        self.words[r.BUSY] = 1
        if not self.running:
            self._answer(trigger, r.error_result("stopping", trigger.part_id)[0])
            return
        self.triggers += 1
        try:
            self.on_trigger(trigger)
        except Exception:  # the camera's bug must not leave the PLC waiting on BUSY, nor end the server
            log.exception("Modbus: camera %s: trigger %r failed", self.camera, trigger.part_id)
            self._answer(trigger, r.error_result("other", trigger.part_id)[0])


class ModbusOutput:
    """The ``modbus`` output: one Modbus TCP server for the line, a unit id per camera."""

    def __init__(self, config: ModbusConfig, line: LineConfig) -> None:
        self.config = config
        names = [c.camera for c in line.cameras]
        self.units = config.unit_ids or {name: i for i, name in enumerate(names, start=1)}
        missing, unknown = set(names) - set(self.units), set(self.units) - set(names)
        if missing or unknown:
            raise ConfigError(f"modbus.unit_ids must name each camera of the line once: "
                              f"{'missing ' + ', '.join(sorted(missing)) if missing else ''}"
                              f"{'; ' if missing and unknown else ''}"
                              f"{'no camera named ' + ', '.join(sorted(unknown)) if unknown else ''}")
        self.sinks: dict[str, ModbusSink] = {}
        self.clients = 0
        self.listening = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="modbus", daemon=True)
        self._server: ModbusTcpServer | None = None
        self._heartbeat: asyncio.Task | None = None
        self._unknown_units = ThrottledLog(log)

    def sink(self, camera: str, on_trigger: Callable[[Trigger], None], on_command: Callable[[str, dict], None],
             disk: DiskWrites) -> ModbusSink:
        self.sinks[camera] = ModbusSink(self, camera, self.units[camera], on_trigger)
        return self.sinks[camera]

    # -- handing over to the loop ----------------------------------------------------------------

    def call(self, callback: Callable[..., None], *args: object) -> None:
        """Run ``callback(*args)`` on the loop, after what was handed over before; never blocks."""
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: the output has closed, nobody can read the registers
            pass

    def call_and_wait(self, callback: Callable[..., None], timeout: float, *args: object) -> bool:
        """``call``, then wait up to ``timeout`` s for it to have run; False when it did not."""
        done = threading.Event()

        def run() -> None:
            try:
                callback(*args)
            finally:
                done.set()

        self.call(run)
        return done.wait(timeout) if self._thread.is_alive() else False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on host:port; ConfigError when that is impossible (the port taken, not permitted)."""
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._open(), self._loop)
        try:
            future.result(LISTEN_TIMEOUT_S)
        except RuntimeError:
            self._stop_loop()
            raise ConfigError(f"modbus: cannot listen on {self.config.host}:{self.config.port}: "
                              f"{_why_not(self.config.host, self.config.port)}") from None
        units = ", ".join(f"{camera}={unit}" for camera, unit in self.units.items())
        log.info("Modbus: serving on %s:%d, unit ids %s", self.config.host, self.config.port, units)

    async def _open(self) -> None:
        devices = [SimDevice(sink.unit, simdata=[SimData(0, count=r.REGISTERS, datatype=DataType.REGISTERS)],
                             use_bit_addressing=True, action=sink.access) for sink in self.sinks.values()]
        # Unit id 0 stands for every id no camera has: its requests are refused as a gateway refuses an absent unit.
        devices.append(SimDevice(0, simdata=[SimData(0, count=r.REGISTERS, datatype=DataType.REGISTERS)],
                                 use_bit_addressing=True, action=self._unknown_unit))
        self._server = ModbusTcpServer(devices, address=(self.config.host, self.config.port),
                                       trace_connect=self._connected)
        await self._server.serve_forever(background=True)
        self.listening = True
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    def _connected(self, connected: bool) -> None:
        self.clients += 1 if connected else -1

    async def _unknown_unit(self, *access: object) -> ExcCodes:
        units = ", ".join(f"{camera}={unit}" for camera, unit in self.units.items())
        self._unknown_units(f"Modbus: a request for a unit id no camera has (answered: gateway target failed to "
                            f"respond); the cameras' unit ids: {units}")
        return ExcCodes.GATEWAY_NO_RESPONSE

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            for sink in self.sinks.values():
                sink.heartbeat()
            self._unknown_units.flush()

    def close(self, availability: str) -> None:
        """Stop serving (every camera's sink has stopped and shown its state) and end the thread."""
        if not self._thread.is_alive():  # never started, or its start failed
            if not self._loop.is_closed():
                self._loop.close()
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(LISTEN_TIMEOUT_S)
        self._stop_loop()
        log.info("Modbus: stopped serving on %s:%d", self.config.host, self.config.port)

    async def _close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._server is not None:
            await self._server.shutdown()
        self.listening = False

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(LISTEN_TIMEOUT_S)
        self._loop.close()


def _why_not(host: str, port: int) -> str:
    """Why ``host:port`` cannot be bound, in words (pymodbus only logs its reason)."""
    try:
        with socket.create_server((host, port)):
            return "the Modbus server did not start (see the log above)"
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"the port is in use by another program ({exc.strerror}); set modbus.port"
        if exc.errno == errno.EACCES:
            return (f"not permitted ({exc.strerror}): a port below 1024 needs CAP_NET_BIND_SERVICE "
                    "(AmbientCapabilities= in the service) or root; or set modbus.port above 1023")
        return f"{exc.strerror or exc} (modbus.host {host!r})"
