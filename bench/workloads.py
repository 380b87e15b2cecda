"""The requests every contender is sent, built once from the shared corpus.

This module owns the three workloads and their request bodies, serialised (and encoded) before any
clock starts:

- replay: the largest corpus session, turn by turn;
- interleaved: several sessions, each a sequence of turns, for clients at a fixed concurrency;
- sizes: one body per size class (10 KB, 100 KB, 1 MB, 5 MB), for repeats in identity, gzip, zstd.

Only Anthropic-shaped sessions are used: their models count tokens with o200k_base offline in every
contender, whereas DeepSeek names make plain `headroom.compress()` fail and would flatter whoever
fails fastest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson

from tests import client, corpus

CODINGS = ("identity", "gzip", "zstd")
SIZE_CLASSES = {"10 KB": 10_000, "100 KB": 100_000, "1 MB": 1_000_000, "5 MB": 5_000_000}


@dataclass(frozen=True)
class Call:
    """One request, as each kind of contender takes it."""

    session: str
    turn: int
    session_id: str
    model: str
    hook_body: bytes  # Aperture's hook call, for hookd
    api_body: bytes  # {"messages", "model"}, for headroom's proxy and the naive server
    messages: bytes  # the messages alone, for the in-process floor

    @property
    def size(self) -> int:
        return len(self.hook_body)


def make_call(hook_call: dict[str, Any], session: str, turn: int, session_id: str) -> Call:
    model = hook_call["metadata"]["model"]
    messages = hook_call["request_body"]["messages"]
    hook = {**hook_call, "metadata": {**hook_call["metadata"], "session_id": session_id}}
    return Call(
        session=session,
        turn=turn,
        session_id=session_id,
        model=model,
        hook_body=orjson.dumps(hook),
        api_body=orjson.dumps({"messages": messages, "model": model}),
        messages=orjson.dumps(messages),
    )


def encoded(body: bytes, coding: str) -> bytes:
    return client.encode_body(body, None if coding == "identity" else coding)


def anthropic_rows() -> list[dict[str, Any]]:
    """Manifest rows of Anthropic sessions, one per session id (its largest), largest first."""
    rows = orjson.loads((corpus.corpus_dir() / "manifest.json").read_bytes())["sessions"]
    rows = sorted((r for r in rows if r["provider"] == "anthropic"), key=lambda r: -r["final_request_bytes"])
    seen: set[str] = set()
    unique = []
    for row in rows:
        # Subagents share their parent's session id; two of them would be one conversation to hookd.
        if row["session_id"] not in seen:
            seen.add(row["session_id"])
            unique.append(row)
    return unique


def largest_session() -> str:
    return str(anthropic_rows()[0]["name"])


@functools.cache
def hook_calls(name: str) -> tuple[dict[str, Any], ...]:
    # Loaded once: every phase and concurrency re-serialises the same turns under new session ids.
    (raw,) = corpus.sessions({name})
    return tuple(corpus.hook_calls(raw))


def session_calls(name: str, tag: str, max_turns: int | None = None) -> list[Call]:
    """A session's turns under a fresh session id, so no contender has seen it under this name."""
    return [make_call(c, name, turn, f"{tag}-{name}") for turn, c in enumerate(hook_calls(name)[:max_turns])]


def interleaved_names(count: int) -> list[str]:
    """The largest session first (its latency is the affinity figure), then the next largest."""
    return [str(row["name"]) for row in anthropic_rows()[:count]]


def size_calls(classes: list[str], tag: str) -> dict[str, Call]:
    """Per class, the corpus turn nearest in size; the largest is several conversations end to end."""
    rows = anthropic_rows()
    finals = {str(r["name"]): hook_calls(r["name"]) for r in rows}
    calls = {}
    for label in classes:
        target = SIZE_CLASSES[label]
        hook_call = concatenated(finals, target) if target > rows[0]["final_request_bytes"] else nearest(finals, target)
        calls[label] = make_call(hook_call, label, 0, f"{tag}-size-{label.replace(' ', '')}")
    return calls


def nearest(finals: dict[str, tuple[dict[str, Any], ...]], target: int) -> dict[str, Any]:
    candidates = [c for calls in finals.values() for c in calls]
    return min(candidates, key=lambda c: abs(len(orjson.dumps(c)) - target))


def concatenated(finals: dict[str, tuple[dict[str, Any], ...]], target: int) -> dict[str, Any]:
    """Final conversations one after another until the body passes `target` bytes.

    Tool ids differ between sessions, so pairing survives; the result has consecutive user turns,
    which compress() and hookd's validation accept though a provider would not.
    """
    base = next(iter(finals.values()))[-1]
    messages: list[Any] = []
    for calls in finals.values():
        messages += calls[-1]["request_body"]["messages"]
        if len(orjson.dumps(messages)) >= target:
            break
    return {**base, "request_body": {**base["request_body"], "messages": messages}}
