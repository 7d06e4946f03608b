"""systemd's notify protocol (sd_notify): READY, WATCHDOG and STATUS datagrams to $NOTIFY_SOCKET.

The protocol is a few lines, so it is written here instead of pulling in a library: newline-
separated KEY=VALUE pairs in one datagram on the unix socket systemd names in NOTIFY_SOCKET
("@" at the start means the abstract namespace). Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("patchline.systemd")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket: socket.socket | None = None
        if self.address:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # WATCHDOG_PID names the process systemd watches; a child that inherited the variables must stay quiet.
        pid = env.get("WATCHDOG_PID")
        usec = env.get("WATCHDOG_USEC")
        watched = usec is not None and (pid is None or pid == str(os.getpid()))
        self.watchdog_s = int(usec) / 1e6 if watched else None
        self._last_ping = -float("inf")

    def send(self, **fields: object) -> None:
        if self.socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self.socket.sendto(message, self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status)

    def watchdog(self) -> None:
        """Ping the watchdog, at most every quarter of its interval (systemd advises under half)."""
        if self.watchdog_s is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_s / 4:
            self._last_ping = now
            self.send(WATCHDOG=1)

    @contextmanager
    def extending_start(self, status: str, step_s: float = 60.0, limit_s: float = 3600.0) -> Iterator[None]:
        """While the block runs (a first TensorRT engine build can take many minutes), keep pushing systemd's
        start timeout (TimeoutStartSec) out by ``step_s`` at a time, for at most ``limit_s`` in all, so a
        slow but progressing start is not killed; a hang is still killed once the extensions stop."""
        if self.socket is None:
            yield
            return
        done = threading.Event()

        def extend() -> None:
            deadline = time.monotonic() + limit_s
            while time.monotonic() < deadline:
                self.send(EXTEND_TIMEOUT_USEC=int(step_s * 1e6), STATUS=status)
                if done.wait(step_s / 2):
                    return

        thread = threading.Thread(target=extend, name="systemd-extend", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def stopping(self, status: str) -> None:
        self.send(STOPPING=1, STATUS=status)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
