"""The in-process floor: headroom's compress() in a loop, with no HTTP and no IPC in the timing.

This module owns the spawned child that holds a `worker.engine.Engine` (the exact compression a
hookd worker runs: the marker-free pipeline and offline token counting) and the parent's handle on
it. The child is set up and warmed the way `worker/main.py` does it; each call decodes the messages
outside the clock and times only `Engine.compress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import sys
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import orjson

READY_TIMEOUT_S = 180.0


def child(conn: Connection) -> None:
    """Child main: prepare the offline environment, import and warm the engine, then serve calls."""
    # The parent's stdout carries progress and reports; headroom's prints go to stderr, as in a worker.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="bench floor: %(name)s: %(message)s")
    from worker import offline

    offline.prepare()
    from worker.engine import Engine

    engine = Engine()
    engine.warm()
    conn.send({"headroom_version": engine.version})
    while (request := conn.recv()) is not None:
        conn.send(compress(engine, *request))


def compress(engine: Any, payload: bytes, model: str) -> dict[str, Any]:
    messages = orjson.loads(payload)
    started = time.perf_counter()
    reply = engine.compress(messages, model, {})
    elapsed_ms = (time.perf_counter() - started) * 1000
    return {"ms": elapsed_ms, "messages": orjson.dumps(output_messages(messages, reply))}


def output_messages(messages: list[Any], reply: dict[str, Any]) -> list[Any]:
    """What the engine's reply means for the conversation: it only sends back what changed."""
    if "messages" in reply:
        return list(reply["messages"])
    out = list(messages)
    for index, message in reply["changed"]:
        out[index] = message
    return out


class Floor:
    """The parent's handle on the child; one call at a time, answered over a pipe."""

    def __init__(self) -> None:
        spawn = multiprocessing.get_context("spawn")
        self.conn, theirs = spawn.Pipe()
        self.proc = spawn.Process(target=child, args=(theirs,), daemon=True)
        self.proc.start()
        theirs.close()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def wait_ready(self) -> dict[str, Any]:
        if not self.conn.poll(READY_TIMEOUT_S):
            raise TimeoutError("in-process engine not warm in time")
        return dict(self.conn.recv())

    def call(self, messages: bytes, model: str) -> dict[str, Any]:
        self.conn.send((messages, model))
        return dict(self.conn.recv())

    async def acall(self, messages: bytes, model: str) -> dict[str, Any]:
        # Off the event loop, so the RSS sampler and progress keep running meanwhile.
        return await asyncio.to_thread(self.call, messages, model)

    def close(self) -> None:
        close_child(self.conn, self.proc)


def close_child(conn: Connection, proc: BaseProcess) -> None:
    """Ask a child serving over `conn` to leave its loop (None), and kill it if it does not."""
    if proc.is_alive():
        # A child that already died has no pipe left to send on.
        with contextlib.suppress(OSError):
            conn.send(None)
        proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
