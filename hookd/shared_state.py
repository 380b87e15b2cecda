"""Conversation records shared by every hookd replica, in Redis, behind a copy in each replica.

With `--state-url`, any replica serves any turn of any conversation with the same bytes. Per
conversation (its record key turned into an opaque name by `seal.Sealer.name`), Redis holds:

- `hookd:{name}:m`, a hash: `v`, a random version each write sets, and `m`, the sealed manifest
  (every message's digest, the token counts, the cache model, the generation, and for each message
  sent changed the id of its emitted bytes), or nothing once the conversation was forgotten;
- `hookd:{name}:b`, a hash of blob id -> sealed emitted bytes, where an id is a keyed digest of the
  bytes, so a blob never changes under its id.

Both keys of a conversation share a Redis Cluster slot (the braces) and expire together after
`--sticky-ttl` without a turn.

Each replica keeps the records it has seen in a local `sticky.Store`, with the version each was
read or written at. A lookup sends that version and gets back only the version when the copy is
still current (one round trip of a few bytes); otherwise it gets the manifest and fetches just the
blobs it lacks. A commit is a compare-and-set in one Lua script: it writes only if the manifest is
still at the version the turn read, so of two concurrent turns of a conversation on two replicas
the later one is refused (it was answered from what it read, and is not recorded), and a record
never mixes two writers.

When Redis fails, a replica serves from its copy as a single hookd would, and a turn it could not
write is written with the conversation's next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain

import orjson

from hookd import sticky
from hookd.cache_model import CacheState
from hookd.metrics import Metrics
from hookd.redis_link import Link, Unavailable, connect, redacted
from hookd.seal import Sealer, Unreadable
from hookd.settings import Settings

PREFIX = b"hookd:"
MIB = 1024 * 1024
VERSION_BYTES = 8
HEAD = struct.Struct(">I")
# Conversations whose record in Redis this replica found out of date for their request (edited,
# rewound, unreadable, evicted in part): a fresh record may replace that version, and only it.
MAX_STALE = 4096

# The version alone when the caller's copy is current; else the version and the sealed manifest.
LOOKUP = """
local v = redis.call('HGET', KEYS[1], 'v')
if not v then return false end
if v == ARGV[1] then return {v} end
return {v, redis.call('HGET', KEYS[1], 'm')}
"""

# ARGV: expected version ('' for none), new version, sealed manifest, ttl in ms, '1' to start the
# blobs afresh, the number of blob ids to drop, those ids, then id and sealed blob pairs to add.
COMMIT = """
if (redis.call('HGET', KEYS[1], 'v') or '') ~= ARGV[1] then return 0 end
if ARGV[5] == '1' then redis.call('DEL', KEYS[2]) end
local drops = tonumber(ARGV[6])
for i = 7, 6 + drops do redis.call('HDEL', KEYS[2], ARGV[i]) end
for i = 7 + drops, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'm', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# A forgotten conversation keeps an empty manifest until it expires, so a replica with a copy of
# its old record can tell "forgotten" (start afresh) from "lost by Redis" (carry on from the copy).
FORGET = """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'm', '')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
"""


@dataclass
class Fetched(sticky.Record):
    """A record as this replica knows it."""

    # The manifest version it was read at, or written as (b"": none in Redis).
    version: bytes = b""
    refs: dict[int, bytes] = field(default_factory=dict)  # index -> blob id of `emitted[index]`
    # False when Redis failed to take this turn's write: the next write sends every blob again.
    synced: bool = True


def _fetched(record: sticky.Record, version: bytes, refs: dict[int, bytes], synced: bool) -> Fetched:
    shared = {f.name: getattr(record, f.name) for f in dataclasses.fields(sticky.Record)}
    return Fetched(**shared, version=version, refs=refs, synced=synced)


def encode(record: sticky.Record, refs: dict[int, bytes]) -> bytes:
    head = orjson.dumps(
        {
            "g": record.generation,
            "t": [record.tokens_before, record.tokens_after],
            "c": record.cache.as_json(),
            "r": [[index, ref.hex()] for index, ref in sorted(refs.items())],
        }
    )
    return HEAD.pack(len(head)) + head + record.digests


@dataclass
class Manifest:
    digests: bytes
    refs: dict[int, bytes]
    tokens: tuple[int, int]
    cache: CacheState
    generation: int


def decode(plain: bytes) -> Manifest:
    """Unreadable when it is not one of ours."""
    try:
        (size,) = HEAD.unpack_from(plain)
        head = orjson.loads(plain[HEAD.size : HEAD.size + size])
        manifest = Manifest(
            digests=plain[HEAD.size + size :],
            refs={int(index): bytes.fromhex(ref) for index, ref in head["r"]},
            tokens=(int(head["t"][0]), int(head["t"][1])),
            cache=CacheState.from_json(head["c"]),
            generation=int(head["g"]),
        )
    except (struct.error, orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise Unreadable(f"not a manifest: {exc}") from None
    if len(manifest.digests) % sticky.DIGEST:
        raise Unreadable("not a manifest: torn digests")
    return manifest


class Shared:
    """`sticky.Records` in Redis, shared by every replica that has the same key file."""

    def __init__(self, link: Link, sealer: Sealer, local: sticky.Store, ttl: float, metrics: Metrics) -> None:
        self.link = link
        self.sealer = sealer
        self.local = local
        self.ttl_ms = int(ttl * 1000)
        self.metrics = metrics
        self.stale: OrderedDict[bytes, bytes] = OrderedDict()
        self.lookup_script = link.client.register_script(LOOKUP)
        self.commit_script = link.client.register_script(COMMIT)
        self.forget_script = link.client.register_script(FORGET)
        # The start-up check, held so that it runs to its end.
        self.checked: asyncio.Future[None] | None = None

    def keys(self, key: bytes) -> tuple[bytes, bytes]:
        """The conversation's manifest and blobs keys in Redis."""
        name = b"{" + self.sealer.name(key).hex().encode() + b"}"
        return PREFIX + name + b":m", PREFIX + name + b":b"

    async def lookup(self, key: bytes, current: bytes) -> sticky.Record | None:
        self.link.begin_turn()
        local = self.local.lookup(key, current)
        assert local is None or isinstance(local, Fetched)
        manifest_key = self.keys(key)[0]
        try:
            found = await self.link.call(
                "lookup", lambda: self.lookup_script(keys=[manifest_key], args=[local.version if local else b""])
            )
        except Unavailable:
            self.metrics.state_lookups.labels("unavailable").inc()
            return local
        if found is None:
            if local is None:
                self.metrics.state_lookups.labels("none").inc()
                return None
            # Redis lost it (restarted empty, evicted it) or never took it: what this replica sent
            # last is still the conversation's history, and goes to Redis whole with this turn.
            local.version, local.synced = b"", False
            self.metrics.state_lookups.labels("local").inc()
            return local
        version = found[0]
        if local is not None and version == local.version:
            self.metrics.state_lookups.labels("local").inc()
            return local
        # An empty manifest marks a forgotten conversation.
        sealed = found[1] if len(found) > 1 and found[1] else b""
        self.metrics.state_fetched_bytes.inc(len(sealed))
        record = await self._fetch(key, current, version, sealed, local)
        self.metrics.state_lookups.labels("shared" if record is not None else "none").inc()
        return record

    async def _fetch(
        self, key: bytes, current: bytes, version: bytes, sealed: bytes, local: Fetched | None
    ) -> sticky.Record | None:
        """The record from its manifest and the blobs this replica lacks; None when it does not
        start this request's messages or cannot be read whole (and a fresh record may replace it)."""
        manifest_key, blobs_key = self.keys(key)
        if not sealed:
            # Forgotten by the replica that served the last turn: a fresh record replaces it.
            self._stale(key, version)
            return None
        try:
            manifest = decode(self.sealer.open(sealed, manifest_key))
        except Unreadable:
            self.metrics.state_errors.labels("unreadable").inc()
            self._stale(key, version)
            return None
        if not current.startswith(manifest.digests):
            self._stale(key, version)
            return None
        refs = manifest.refs
        have = {ref: local.emitted[index] for index, ref in local.refs.items()} if local else {}
        wanted = sorted({ref for ref in refs.values() if ref not in have})
        if wanted:
            try:
                blobs = await self.link.call("fetch", lambda: self.link.client.hmget(blobs_key, wanted))
            except Unavailable:
                # What this replica had is still a history it sent; whether it may be recorded
                # on is the commit's to find out.
                return local
            self.metrics.state_fetched_bytes.inc(sum(len(b) for b in blobs if b))
            if any(blob is None for blob in blobs):
                # Evicted under memory pressure: the record cannot be read whole.
                self._stale(key, version)
                return None
            try:
                for ref, blob in zip(wanted, blobs, strict=True):
                    have[ref] = self.sealer.open(blob, blobs_key + b":" + ref)
            except Unreadable:
                self.metrics.state_errors.labels("unreadable").inc()
                self._stale(key, version)
                return None
        record = Fetched(
            digests=manifest.digests,
            emitted={index: have[ref] for index, ref in refs.items()},
            tokens_before=manifest.tokens[0],
            tokens_after=manifest.tokens[1],
            cache=manifest.cache,
            generation=manifest.generation,
            version=version,
            refs=refs,
        )
        self.local.commit(key, record)
        return record

    def _stale(self, key: bytes, version: bytes) -> None:
        self.local.forget(key)
        self.stale[key] = version
        self.stale.move_to_end(key)
        while len(self.stale) > MAX_STALE:
            self.stale.popitem(last=False)

    async def commit(self, key: bytes, record: sticky.Record, previous: sticky.Record | None) -> bool:
        manifest_key, blobs_key = self.keys(key)
        read = previous if isinstance(previous, Fetched) else None
        expected = read.version if read is not None else self.stale.pop(key, b"")
        known = read.refs if read is not None and read.synced else {}
        # A message carried over from the record read keeps its blob; only new bytes are named.
        unchanged = {i for i, blob in record.emitted.items() if i in known and read and read.emitted.get(i) is blob}
        refs = {i: known[i] if i in unchanged else self.sealer.name(blob) for i, blob in record.emitted.items()}
        kept = set(known.values())
        added = {ref: record.emitted[index] for index, ref in refs.items() if ref not in kept}
        dropped = kept - set(refs.values())
        version = os.urandom(VERSION_BYTES)
        args: list[bytes | int] = [
            expected,
            version,
            self.sealer.seal(encode(record, refs), manifest_key),
            self.ttl_ms,
            b"1" if read is None or not read.synced else b"0",
            len(dropped),
            *dropped,
            *chain.from_iterable((ref, self.sealer.seal(blob, blobs_key + b":" + ref)) for ref, blob in added.items()),
        ]
        try:
            stored = await self.link.call(
                "commit", lambda: self.commit_script(keys=[manifest_key, blobs_key], args=args)
            )
        except Unavailable:
            # Served as a single hookd would, from this replica's memory; Redis gets it next turn.
            self.local.commit(key, _fetched(record, expected, refs, synced=False))
            return True
        if not stored:
            self.metrics.state_conflicts.inc()
            self.local.forget(key)
            return False
        self.local.commit(key, _fetched(record, version, refs, synced=True))
        return True

    async def forget(self, key: bytes) -> None:
        self.local.forget(key)
        self.stale.pop(key, None)
        with contextlib.suppress(Unavailable):
            await self.link.call(
                "forget", lambda: self.forget_script(keys=self.keys(key), args=[os.urandom(VERSION_BYTES), self.ttl_ms])
            )

    @property
    def bytes(self) -> int:
        return self.local.bytes

    def __len__(self) -> int:
        return len(self.local)

    async def close(self) -> None:
        await self.link.close()


async def open_records(settings: Settings, metrics: Metrics) -> sticky.Records | None:
    """Records in Redis when `--state-url` is set; None (this process's memory) otherwise."""
    if settings.state_url is None:
        return None
    if settings.state_key is None:
        raise ValueError("shared state needs a key file")
    where = redacted(settings.state_url)
    link = Link(connect(settings.state_url, settings.state_password), settings.state_timeout, metrics, where)
    local = sticky.Store(settings.sticky_max_mb * MIB, settings.sticky_ttl)
    shared = Shared(link, Sealer(settings.state_key), local, settings.sticky_ttl, metrics)
    shared.checked = asyncio.ensure_future(link.check())
    return shared
