"""How requests reach the contenders: start-up probes, alternating single requests, concurrent clients.

This module owns the measuring loops. Single requests (the replay and the size classes) go to every
contender in a fresh random order per request, so noise from other work on the shared machine hits
all of them alike; CPU time is read from each contender's process tree around its own request.
Concurrent clients (the interleaved sessions) run against one contender at a time.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import aiohttp
import orjson

from bench import procs
from bench.billing import Meter
from bench.contenders import Answer, Contender, HookdContender, has_marker
from bench.progress import Progress
from bench.replay import attach_lines
from bench.workloads import Call

# The headroom proxy runs uvicorn, which closes a keep-alive connection after 5 idle seconds; one
# closed just as the client reuses it fails the request ("Server disconnected"). Idle connections are
# dropped on the client's side first, well before any contender's own idle timeout.
CLIENT_IDLE_S = 2.0


def client() -> aiohttp.ClientSession:
    """The HTTP client every contender is measured through."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(keepalive_timeout=CLIENT_IDLE_S))


class Tokens:
    """o200k_base tokens of a conversation, counted per message and cached by content.

    One tokenizer for every contender's output, so savings compare; headroom and the proxy each
    report their own counts, which differ in what they include.
    """

    def __init__(self) -> None:
        self.encoding = Meter().encoding
        self.counts: dict[bytes, int] = {}

    def count(self, messages: Sequence[Any]) -> int:
        return sum(self._one(orjson.dumps(m)) for m in messages)

    def _one(self, text: bytes) -> int:
        key = hashlib.blake2b(text, digest_size=16).digest()
        if key not in self.counts:
            self.counts[key] = len(self.encoding.encode(text.decode(), disallowed_special=()))
        return self.counts[key]


async def start_measured(contender: Contender, probe: Call, http: aiohttp.ClientSession) -> dict[str, Any]:
    """Start-up until the first answer to a probe, and the probe once more to show how warm it was."""
    started = time.monotonic()
    contender.start()
    ready_s = time.monotonic() - started
    first = await contender.send(http, probe)
    served_s = time.monotonic() - started
    second = await contender.send(http, probe)
    await contender.server_lines(2)
    return {"ready_s": ready_s, "first_answer_s": served_s, "first_ms": first.ms, "second_ms": second.ms}


async def one_request(
    contender: Contender, call: Call, coding: str, http: aiohttp.ClientSession, tokens: Tokens | None
) -> dict[str, Any]:
    cpu_before = procs.cpu_seconds(contender.pid)
    answer = await contender.send(http, call, coding)
    cpu_ms = (procs.cpu_seconds(contender.pid) - cpu_before) * 1000
    lines = await contender.server_lines(1)
    row = {
        "contender": contender.key,
        "session": call.session,
        "turn": call.turn,
        "request_bytes": call.size,
        "coding": coding,
        "ms": answer.ms,
        "ok": answer.ok,
        "cpu_ms": cpu_ms,
        "markers": has_marker(answer.body),
        "server": lines[0] if lines else {},
    }
    if tokens is not None and answer.ok:
        row |= token_counts(contender, call, answer, tokens)
    return row


def token_counts(contender: Contender, call: Call, answer: Answer, tokens: Tokens) -> dict[str, int]:
    return {
        "tokens_before": tokens.count(orjson.loads(call.messages)),
        "tokens_after": tokens.count(contender.sent_messages(call, answer)),
    }


async def alternate(
    contenders: Sequence[Contender],
    requests: Sequence[tuple[Call, str, int]],
    http: aiohttp.ClientSession,
    progress: Progress,
    rng: random.Random,
    tokens: Tokens | None = None,
) -> list[dict[str, Any]]:
    """Each (call, coding, repeat) to every contender that takes it, in a fresh random order."""
    rows = []
    for call, coding, repeat in requests:
        takers = [c for c in contenders if coding == "identity" or c.takes_codings]
        for contender in rng.sample(takers, len(takers)):
            row = await one_request(contender, call, coding, http, tokens)
            rows.append(row | {"repeat": repeat})
        progress.advance(1)
    return rows


async def concurrent(
    contender: Contender,
    sessions: Sequence[Sequence[Call]],
    concurrency: int,
    http: aiohttp.ClientSession,
    progress: Progress,
) -> dict[str, Any]:
    """`concurrency` clients, each replaying one session at a time turn by turn, until none is left."""
    queue = deque(sessions)
    rows: list[dict[str, Any]] = []

    async def client() -> None:
        while queue:
            for call in queue.popleft():
                answer = await contender.send(http, call)
                rows.append(
                    {"session": call.session, "turn": call.turn, "request_bytes": call.size}
                    | {"ms": answer.ms, "ok": answer.ok}
                )
                progress.advance(1)

    cpu_before = procs.cpu_seconds(contender.pid)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s = time.perf_counter() - started
    cpu_s = procs.cpu_seconds(contender.pid) - cpu_before
    if isinstance(contender, HookdContender):
        rows = attach_lines(rows, await contender.server_lines(len(rows)))
    return {
        "concurrency": concurrency,
        "wall_s": wall_s,
        "requests": len(rows),
        "errors": sum(not r["ok"] for r in rows),
        "throughput_rps": len(rows) / wall_s,
        "cpu_ms_per_request": cpu_s * 1000 / len(rows),
        "rows": rows,
    }
