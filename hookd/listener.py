"""hookd's listening sockets: where they come from, and how they close without refusing anyone.

They come from systemd when it passes them (socket activation, the sd_listen_fds protocol): the
socket then outlives hookd, and connections that arrive during a restart wait in its queue for
the next process. Otherwise hookd opens its own on --listen, with SO_REUSEPORT, so a second hookd
can take the same port before the first one drains (a rolling restart without systemd).

Closing a listening socket resets every connection still waiting in its queue, so `close()`
first accepts all of them and hands them back to be served.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import MutableMapping
from dataclasses import dataclass

from hookd.auth import is_loopback_host
from hookd.settings import Settings

log = logging.getLogger("hookd")

# sd_listen_fds(3): the passed sockets are the file descriptors from 3 on.
LISTEN_FDS_START = 3
# Connections that may wait to be accepted: a restart's second or two at a busy gateway's rate.
# The event loop listen()s again with it on every socket, systemd's too (hookd.socket says the same).
BACKLOG = 1024


class ListenError(Exception):
    """The sockets systemd passed cannot be served, or may not be served without a token."""


@dataclass
class Listener:
    sockets: list[socket.socket]
    # Passed by systemd: --listen is not used, and the socket stays open when hookd exits.
    activated: bool = False
    # Our own socket, on a port another process (the hookd being replaced) already serves: it
    # should only start taking connections once our workers are warm.
    shared: bool = False

    def urls(self) -> list[str]:
        return [_url(sock) for sock in self.sockets]

    def origin(self) -> str:
        if self.activated:
            return "socket from systemd; --listen not used"
        return "own socket, SO_REUSEPORT"

    def close(self) -> list[socket.socket]:
        """Accepts every connection waiting in the queues, then closes the sockets, in one
        synchronous step: only a connection that arrives after it can find the socket gone (and
        with systemd's socket none does: systemd keeps it open for the next hookd)."""
        accepted: list[socket.socket] = []
        for sock in self.sockets:
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                accepted += _accept_waiting(sock)
            sock.close()
        return accepted


def open_listener(settings: Settings, env: MutableMapping[str, str] = os.environ) -> Listener:
    passed = from_systemd(env)
    if not passed:
        sock, shared = own_socket(settings.host, settings.port)
        return Listener([sock], shared=shared)
    exposed = [_url(sock) for sock in passed if not _is_local(sock)]
    if exposed and settings.hook_token is None and not settings.allow_unauthenticated:
        raise ListenError(
            f"refusing to serve systemd's socket on {', '.join(exposed)}, which is not loopback, without "
            "--token-file: a hook sees whole conversations (or give --allow-unauthenticated)"
        )
    return Listener(passed, activated=True)


def from_systemd(env: MutableMapping[str, str]) -> list[socket.socket]:
    """The listening sockets systemd passed to this process, or none. The variables are removed
    either way, so the workers we start never take the sockets for theirs."""
    count, pid = env.pop("LISTEN_FDS", ""), env.pop("LISTEN_PID", "")
    env.pop("LISTEN_FDNAMES", None)
    if not count or pid != str(os.getpid()):
        return []
    try:
        fds = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    except ValueError:
        raise ListenError(f"LISTEN_FDS={count!r} is not a number") from None
    sockets = []
    for fd in fds:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenError(f"systemd passed fd {fd}, which is not a listening stream socket (ListenStream=)")
        sockets.append(sock)
    return sockets


def own_socket(host: str, port: int) -> tuple[socket.socket, bool]:
    """A socket bound to host:port with SO_REUSEPORT, not yet listening, and whether another
    process already holds that port."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = found[0]
    shared = port != 0 and _port_taken(family, address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock, shared


def _port_taken(family: int, address: tuple[str, int]) -> bool:
    # A bind without SO_REUSEPORT fails on a port anyone listens on, SO_REUSEPORT or not.
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def _accept_waiting(sock: socket.socket) -> list[socket.socket]:
    sock.setblocking(False)
    accepted = []
    while True:
        try:
            connection, _ = sock.accept()
        except BlockingIOError:
            return accepted
        except OSError as exc:
            # Out of file descriptors, most likely: the rest cannot be saved.
            log.warning("could not accept a waiting connection: %s", exc)
            return accepted
        connection.setblocking(False)
        accepted.append(connection)


def _is_local(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX or is_loopback_host(sock.getsockname()[0])


def _url(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if sock.family == socket.AF_INET6 else f"http://{host}:{port}/"
