"""The provider's bill for a conversation, request by request, under its real caching rules.

Anthropic (`Prices.breakpoints`): a cache entry exists only where an earlier request put a
`cache_control` breakpoint, keyed by the exact bytes of everything before it (tools, system,
messages, in that order). A request reads the longest live entry found at one of its breakpoints or
at most `LOOKBACK` content blocks before one; it writes everything from there to its last
breakpoint (1.25x, or 2x up to a `"ttl": "1h"` breakpoint) and pays 1x for what follows. Entries
live 5 minutes (or an hour) from their last write or read. At most 4 breakpoints per request; a
prefix shorter than `min_tokens` is not cached at all.

OpenAI, DeepSeek and other automatic caches: every request's prefix is cached; the next request
reads the longest prefix it shares with a live earlier one, in 128-token steps from `min_tokens`,
at the model's read price; there is no write premium. Entries are evicted after `ttl` idle.

Tokens are counted with o200k_base (headroom's vocabulary for Claude and GPT models, from
litellm's copy, offline) on the text of each block (its strings, as the model reads them: not the
JSON they travel in, whose escapes would add an eighth), while cache entries are keyed by the
block's exact JSON with its breakpoint taken out; a string content counts as the one text block it
stands for.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from hookd.history import strings
from hookd.prices import Prices, Usage
from worker import offline

LOOKBACK = 20
MAX_BREAKPOINTS = 4
STEP = 128


class Meter:
    """Token counts of request pieces, each piece tokenised once."""

    def __init__(self) -> None:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(offline.litellm_tiktoken_dir()))
        import tiktoken

        self.encoding = tiktoken.get_encoding("o200k_base")
        self.cache: dict[bytes, list[int]] = {}

    def tokens(self, piece: bytes) -> list[int]:
        if piece not in self.cache:
            self.cache[piece] = self.encoding.encode(piece.decode(), disallowed_special=())
        return self.cache[piece]

    def count(self, piece: bytes) -> int:
        return len(self.tokens(piece))


@dataclass(frozen=True)
class Block:
    piece: bytes  # what the cache matches: the block's JSON
    text: bytes  # what is tokenised: its strings
    ttl: str | None  # "5m" or "1h" where the block carries a breakpoint


def _block(value: Any, role: str | None) -> Block:
    if isinstance(value, str):
        value = {"type": "text", "text": value}
    ttl = None
    if isinstance(value, dict) and isinstance(value.get("cache_control"), dict):
        ttl = "1h" if value["cache_control"].get("ttl") == "1h" else "5m"
        value = {k: v for k, v in value.items() if k != "cache_control"}
    piece = orjson.dumps([role, value] if role else value, option=orjson.OPT_SORT_KEYS)
    return Block(piece, "\n".join(strings(value)).encode(), ttl)


def blocks(body: dict[str, Any], messages: list[Any]) -> list[Block]:
    """The request as the cache sees it: tools, system, then every content block of every message."""
    out = [_block(tool, None) for tool in body.get("tools") or []]
    system = body.get("system")
    if isinstance(system, list):
        out += [_block(item, "system") for item in system]
    elif system:
        out.append(_block(system, "system"))
    for message in messages:
        if not isinstance(message, dict):
            out.append(_block(message, None))
            continue
        role = message.get("role")
        content = message.get("content")
        rest = {k: v for k, v in message.items() if k != "content"}
        if isinstance(content, list) and content:
            out += [_block(item, role) for item in content]
        elif content is not None:
            out.append(_block(content, role))
        if set(rest) - {"role"}:
            # OpenAI tool calls and ids, DeepSeek's reasoning: part of the prefix too.
            out.append(_block(rest, role))
    return out


@dataclass
class Provider:
    """One conversation's cache at the provider, fed the requests as they went upstream."""

    prices: Prices
    meter: Meter
    entries: dict[bytes, tuple[float, float]] = field(default_factory=dict)  # prefix -> (expires, ttl)
    recent: list[tuple[list[Block], float]] = field(default_factory=list)  # (request, expires)

    def bill(self, body: dict[str, Any], messages: list[Any], now: float) -> Usage:
        request = blocks(body, messages)
        if self.prices.breakpoints:
            return self._explicit(request, now)
        return self._automatic(request, now)

    def _explicit(self, request: list[Block], now: float) -> Usage:
        sizes = [self.meter.count(b.text) for b in request]
        ends = _running(sizes)
        marks = [i for i, b in enumerate(request) if b.ttl]
        if len(marks) > MAX_BREAKPOINTS:
            raise ValueError(f"{len(marks)} cache breakpoints; the provider refuses more than {MAX_BREAKPOINTS}")
        if not marks or ends[marks[-1]] < self.prices.min_tokens:
            return Usage(input=ends[-1] if ends else 0)
        keys = _chain(request)
        hit = -1
        for mark in marks:
            for index in range(mark, max(-1, mark - LOOKBACK - 1), -1):
                entry = self.entries.get(keys[index])
                if entry and entry[0] >= now:
                    hit = max(hit, index)
                    break
        if hit >= 0:
            self.entries[keys[hit]] = (now + self.entries[keys[hit]][1], self.entries[keys[hit]][1])
        usage = Usage(cache_read=ends[hit] if hit >= 0 else 0, input=ends[-1] - ends[marks[-1]])
        start = ends[hit] if hit >= 0 else 0
        for mark in marks:
            ttl = self.prices.ttl_long if request[mark].ttl == "1h" else self.prices.ttl
            if ends[mark] > start:
                written = ends[mark] - start
                if request[mark].ttl == "1h":
                    usage.cache_write_long += written
                else:
                    usage.cache_write += written
                start = ends[mark]
            if ends[mark] >= self.prices.min_tokens:
                self.entries[keys[mark]] = (now + ttl, ttl)
        return usage

    def _automatic(self, request: list[Block], now: float) -> Usage:
        total = sum(self.meter.count(b.text) for b in request)
        self.recent = [r for r in self.recent if r[1] >= now]
        shared = max((_common(self.meter, old, request) for old, _ in self.recent), default=0)
        cached = shared // STEP * STEP if shared >= self.prices.min_tokens else 0
        self.recent = [*self.recent[-3:], (request, now + self.prices.ttl)]
        return Usage(cache_read=cached, input=total - cached)


def _running(sizes: list[int]) -> list[int]:
    ends, total = [], 0
    for size in sizes:
        total += size
        ends.append(total)
    return ends


def _chain(request: list[Block]) -> list[bytes]:
    """Each block's key: a digest of every block up to and including it."""
    keys, digest = [], b""
    for block in request:
        digest = hashlib.blake2b(digest + block.piece, digest_size=16).digest()
        keys.append(digest)
    return keys


def _common(meter: Meter, before: list[Block], after: list[Block]) -> int:
    count = 0
    for old, new in zip(before, after, strict=False):
        if old.piece == new.piece:
            count += meter.count(old.text)
            continue
        for a, b in zip(meter.tokens(old.text), meter.tokens(new.text), strict=False):
            if a != b:
                break
            count += 1
        break
    return count
