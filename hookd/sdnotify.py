"""systemd's readiness and watchdog protocol, spoken over $NOTIFY_SOCKET.

The protocol is one datagram of `KEY=value` lines to a unix socket; written here (a dozen lines)
rather than taken from a library because the maintained ones wrap exactly this and nothing more.
Without $NOTIFY_SOCKET (not run by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("hookd.sdnotify")


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        # A leading "@" names a socket in the abstract namespace.
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *fields: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            # systemd going away must not take the hook down with it.
            log.warning("could not notify systemd: %s", exc)

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alives: half the watchdog timeout, as systemd recommends."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None


def _watchdog_usec(env: Mapping[str, str]) -> int:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0  # the watchdog is meant for another process
    try:
        return max(0, int(env.get("WATCHDOG_USEC", "0")))
    except ValueError:
        return 0
