"""A worker process: prepare the environment, import and warm headroom, then serve frames.

Started by `hookd.pool` through multiprocessing's spawn context with one end of a socket pair.
It serves one request at a time and exits when the front end closes its end.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from worker import frames, offline


def run(sock: socket.socket, slot: int, options: dict[str, Any] | None = None) -> None:
    """`options`: "ml" (`worker.ml.Options` fields) and "model_cache" (an HF hub cache directory);
    see `hookd.settings.Settings.worker_options`."""
    options = options or {}
    # stdout belongs to the front end's -v lines; anything headroom prints goes to stderr.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Ctrl-C reaches the whole process group; the front end decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format=f"hookd worker {slot}: %(name)s: %(message)s")
    offline.prepare(model_cache=options.get("model_cache"))
    try:
        # Kompress first: its imports must happen in this thread before headroom starts any.
        from worker import ml

        ml_facts = ml.load(ml.Options(**options.get("ml", {})))
        from worker.engine import Engine

        engine = Engine(ml_facts)
        warmup_ms = engine.warm()
    except Exception as exc:
        traceback.print_exc()
        frames.send(sock, {"ready": False, "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    # headroom's modules, tables and warm caches live as long as the worker: freezing them keeps
    # full collections (150-200 ms over that heap, seen as latency spikes) out of request time.
    gc.collect()
    gc.freeze()
    frames.send(sock, {"ready": True, "pid": os.getpid(), "warmup_ms": warmup_ms, **engine.facts()})
    serve(sock, engine)


def serve(sock: socket.socket, engine: Any) -> None:
    while (request := frames.receive(sock)) is not None:
        frames.send(sock, handle(engine, request))


def handle(engine: Any, request: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        knobs = request.get("knobs") or {}
        reply = engine.compress(
            request["messages"],
            request.get("model") or "",
            knobs,
            frozen=int(request.get("frozen") or 0),
            strong=bool(request.get("strong")),
            offset=int(request.get("offset") or 0),
            session=str(request.get("session") or ""),
            count=bool(request.get("count")),
        )
    except Exception as exc:
        # compress() swallows its own errors; this is for ours (a knob headroom refused, say).
        # The worker is still healthy, so it answers and stays.
        reply = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "worker_ms": (time.perf_counter() - started) * 1000,
        }
    reply["id"] = request.get("id")
    return reply
