"""A local mosquitto on a free loopback port, for the demo, the tests and the MQTT benchmarks."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

START_TIMEOUT_S = 10.0


def free_port() -> int:
    """A loopback port no one listens on now (another process may take it before it is used)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mosquitto:
    """mosquitto bound to 127.0.0.1:<port>, configured and logging in ``workdir``; stop() and start() again keep
    the port (a broker restart). ``extra_conf`` lines come last, so they override the defaults written here."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "") -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(binary).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto; `make system-deps` does it)")
        self.binary = binary
        self.port = port or free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir.resolve() / "mosquitto.log"
        self.conf.write_text(
            # Started as root, mosquitto drops to the `mosquitto` user, which cannot write in the caller's folders.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {self.log}\nlog_type all\n{extra_conf}"
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until it accepts connections; RuntimeError (with its log) when it does not."""
        self.process = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}; log: {self.log}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on port {self.port} within {START_TIMEOUT_S:g} s; log: {self.log}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


class Listener:
    """A paho subscriber that records every message on ``topics`` in arrival order (tests, benchmarks)."""

    def __init__(self, port: int, topics: list[str], protocol: str = "5", client_id: str = "",
                 persistent: bool = False) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        v5 = protocol == "5"
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
                                  clean_session=None if v5 else not persistent)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port, **({"clean_start": not persistent} if v5 else {}))
        self.client.loop_start()
        if not self._subscribed.wait(5):
            raise RuntimeError(f"subscriber to {topics} on port {port} got no SUBACK within 5 s")

    def _record(self, client: paho.Client, userdata: object, message: paho.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait(self, predicate: Callable[[list[paho.MQTTMessage]], bool], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self.messages), timeout)

    def on(self, topic: str) -> list[bytes]:
        with self._cond:
            return [m.payload for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
