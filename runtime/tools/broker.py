"""A local mosquitto on a free loopback port, for the demo, the tests and the MQTT benchmarks."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

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
