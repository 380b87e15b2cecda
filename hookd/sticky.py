"""What each conversation was sent last turn, and sending it again byte for byte.

A provider caches a conversation's prefix by content. Plain per-turn compression rewrites old
messages differently as the conversation grows (a tool result compresses once it leaves the
protected recent window, a search result is re-ranked against the newest question), so the next
turn misses the cache and pays full price for history it had cached. So every mode but `plain`
compresses each message once, when it first arrives, and every later turn sends exactly what was
sent before for the history and compresses only what is new (headroom's `frozen_message_count`
keeps its hands off the history); only the history policy (`hookd.history`) may change it, and
the record then holds what it sent instead.

The state lives here, in the front end, because every request of a conversation passes through
it whichever worker serves the turn. A record holds a 16-byte digest per message, the emitted
bytes of the messages compression changed and the conversation's cache model (`hookd.cache_model`),
in memory only, bounded by bytes and age.
"""

from __future__ import annotations

import copy
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from hookd.cache_model import CacheState

DIGEST = 16
# What a record costs beyond its emitted bytes and digests (measured with tracemalloc): the
# record and its cache model, each message it keeps (a dict slot, an int, a bytes header), and
# each cache entry it models.
RECORD_OVERHEAD = 512
EMITTED_OVERHEAD = 120
ENTRY_OVERHEAD = 160
CACHE_CONTROL = "cache_control"


def strip_cache_control(value: Any) -> Any:
    """`value` without cache breakpoints; the same object when it has none."""
    if isinstance(value, dict):
        if CACHE_CONTROL not in value and not any(isinstance(v, dict | list) for v in value.values()):
            return value
        return {k: strip_cache_control(v) for k, v in value.items() if k != CACHE_CONTROL}
    if isinstance(value, list):
        return [strip_cache_control(v) for v in value]
    return value


def canonical(message: Any) -> bytes:
    """The message as the provider's cache sees it. Clients move breakpoints every turn (Claude
    Code marks the last two messages) and write a marked message's text as a one-block list, so
    both markers and that wrapping are taken out before comparing turns."""
    message = strip_cache_control(message)
    if isinstance(message, dict):
        content = message.get("content")
        if isinstance(content, list) and len(content) == 1 and _plain_text_block(content[0]):
            message = {**message, "content": content[0]["text"]}
    return orjson.dumps(message, option=orjson.OPT_SORT_KEYS)


def _plain_text_block(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and set(block) == {"type", "text"}


def kept(encoded: bytes) -> bytes:
    """`encoded` in a bytes object of its own size, for keeping. orjson returns its output in the
    buffer it wrote it to, at least 8 KiB whatever the length: kept as it is, every small message
    remembered would cost 8 KiB (measured: ~10x what the records counted)."""
    return bytes(memoryview(encoded))


def digests(messages: list[Any]) -> bytes:
    return fingerprint(messages)[0]


def fingerprint(messages: list[Any]) -> tuple[bytes, list[int]]:
    """Every message's digest, and its size as the provider's cache sees it."""
    parts = [canonical(m) for m in messages]
    return b"".join(hashlib.blake2b(p, digest_size=DIGEST).digest() for p in parts), [len(p) for p in parts]


def record_key(session: bytes, all_digests: bytes) -> bytes:
    """One record per conversation and first message: sub-agents share their parent's session id
    but start from their own first message, and must not overwrite each other's record."""
    return hashlib.blake2b(session + all_digests[:DIGEST], digest_size=DIGEST).digest()


@dataclass
class Record:
    digests: bytes
    # Index -> what was sent for that message, when it differs from the original; without
    # cache breakpoints, which are the request's own each turn.
    emitted: dict[int, bytes] = field(default_factory=dict)
    tokens_before: int = 0
    tokens_after: int = 0
    used: float = 0.0
    cache: CacheState = field(default_factory=CacheState)
    # How many times the history policy has replaced this conversation's history.
    generation: int = 0

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST

    @property
    def size(self) -> int:
        kept = sum(len(b) + EMITTED_OVERHEAD for b in self.emitted.values())
        return len(self.digests) + kept + RECORD_OVERHEAD + ENTRY_OVERHEAD * len(self.cache.entries)


class Store:
    """Records by conversation, least recently used first; bounded by total bytes and idle age."""

    def __init__(self, max_bytes: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.records: OrderedDict[bytes, Record] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.records)

    def lookup(self, key: bytes, current: bytes) -> Record | None:
        """The record whose messages start this request's, or None (and the record is dropped
        when the history no longer matches: an edit, a rewind, a branch)."""
        self._expire()
        record = self.records.get(key)
        if record is None:
            return None
        if not current.startswith(record.digests):
            self._drop(key)
            return None
        record.used = self.clock()
        self.records.move_to_end(key)
        return record

    def commit(self, key: bytes, record: Record) -> None:
        self._drop(key)
        record.used = self.clock()
        if record.size > self.max_bytes:
            return
        self.records[key] = record
        self.bytes += record.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.records)))

    def forget(self, key: bytes) -> None:
        self._drop(key)

    def _drop(self, key: bytes) -> None:
        record = self.records.pop(key, None)
        if record is not None:
            self.bytes -= record.size

    def _expire(self) -> None:
        horizon = self.clock() - self.ttl
        while self.records:
            key, oldest = next(iter(self.records.items()))
            if oldest.used >= horizon:
                break
            self._drop(key)


class Records(Protocol):
    """Where conversation records live: this process's memory (`Memory`), or a store shared by
    every hookd replica. Whatever goes wrong inside a shared store, these calls do not raise:
    a record that cannot be read is None (the turn is compressed as a new conversation) and one
    that cannot be written is not recorded."""

    async def lookup(self, key: bytes, current: bytes) -> Record | None: ...

    async def commit(self, key: bytes, record: Record, previous: Record | None) -> bool:
        """Store `record`, read as `previous`, unless another turn of the conversation was
        recorded since and `record` does not extend it. False when it was not stored."""
        ...

    async def forget(self, key: bytes) -> None: ...

    @property
    def bytes(self) -> int:
        """Memory this process holds for records."""
        ...

    def __len__(self) -> int: ...


class Memory:
    """Records in this process's memory only: one hookd, the default."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def lookup(self, key: bytes, current: bytes) -> Record | None:
        return self.store.lookup(key, current)

    async def commit(self, key: bytes, record: Record, previous: Record | None) -> bool:
        self.store.commit(key, record)
        return True

    async def forget(self, key: bytes) -> None:
        self.store.forget(key)

    @property
    def bytes(self) -> int:
        return self.store.bytes

    def __len__(self) -> int:
        return len(self.store)


def render(stored: bytes, current: dict[str, Any]) -> Any:
    """A message as sent before, carrying this request's own cache breakpoints."""
    return mark(orjson.loads(stored), current)


def mark(message: Any, current: Any) -> Any:
    """`message` (compressed, unmarked) with the cache breakpoints `current` carries, block for
    block; a lone text string becomes a one-block list again when the client marked it so."""
    if not isinstance(message, dict) or not isinstance(current, dict):
        return message
    now = current.get("content")
    then = message.get("content")
    if not isinstance(now, list):
        return message
    if isinstance(then, str) and len(now) == 1 and isinstance(now[0], dict) and now[0].get("type") == "text":
        message = {**message, "content": [{"type": "text", "text": then}]}
        then = message["content"]
    if isinstance(then, list) and len(then) == len(now):
        for block, marked in zip(then, now, strict=True):
            if isinstance(marked, dict) and CACHE_CONTROL in marked and isinstance(block, dict):
                block[CACHE_CONTROL] = marked[CACHE_CONTROL]
    return message


def remember(
    previous: Record | None, current: bytes, originals: list[Any], sent: list[Any], start: int | None = None
) -> Record:
    """The record after this turn: the old one with what was sent from `start` on (by default
    the new messages only; earlier when the history policy rewrote history)."""
    if start is None:
        start = previous.count if previous else 0
    emitted = {i: b for i, b in previous.emitted.items() if i < start} if previous else {}
    for index in range(start, len(originals)):
        if sent[index] is not originals[index]:
            stored = orjson.dumps(strip_cache_control(sent[index]))
            if stored != orjson.dumps(strip_cache_control(originals[index])):
                emitted[index] = kept(stored)
    return Record(
        digests=current,
        emitted=emitted,
        tokens_before=previous.tokens_before if previous else 0,
        tokens_after=previous.tokens_after if previous else 0,
        cache=copy.deepcopy(previous.cache) if previous else CacheState(),
        generation=previous.generation if previous else 0,
    )
