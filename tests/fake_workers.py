"""Worker processes that misbehave on request, for pool tests.

Each request's `knobs["behaviour"]` picks what the worker does with it; the pool cannot tell
these from real workers, since they speak the same frames over the same socket.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any

from worker import frames


def run(sock: socket.socket, slot: int, options: dict[str, Any] | None = None) -> None:
    frames.send(sock, {"ready": True, "pid": os.getpid(), "headroom_version": "fake", "warmup_ms": 0})
    while (request := frames.receive(sock)) is not None:
        behave(sock, request)


def behave(sock: socket.socket, request: dict[str, Any]) -> None:
    behaviour = request["knobs"].get("behaviour", "ok")
    if behaviour == "crash":
        os._exit(3)
    if behaviour == "hang":
        time.sleep(3600)
    if behaviour == "garbage":
        sock.sendall(frames.header_for(b"\xff\xfe not json") + b"\xff\xfe not json")
        return
    if behaviour == "close":
        sock.close()
        os._exit(0)
    if behaviour.startswith("slow:"):
        time.sleep(float(behaviour.split(":")[1]))
    reply: dict[str, Any] = {
        "ok": behaviour != "error",
        "error": "headroom refused a knob",
        "changed": [[0, {"role": "user", "content": "short"}]],
        "tokens_before": 100,
        "tokens_after": 10,
        "model_limit": 200000,
        "worker_ms": 1.0,
        "rss_mb": 5000.0 if behaviour == "bloat" else 50.0,
    }
    reply["id"] = request["id"] + (1 if behaviour == "wrong-id" else 0)
    frames.send(sock, reply)


def fail_warmup(sock: socket.socket, slot: int, options: dict[str, Any] | None = None) -> None:
    """A worker that dies while warming up, and leaves a mark each time it is started."""
    marks = Path(os.environ["HOOKD_TEST_MARKS"])
    with marks.open("a") as out:
        out.write(f"{time.monotonic()}\n")
    os._exit(1)
