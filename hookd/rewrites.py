"""Rewrite candidates: each conversation's history in its most compressed form, made ahead of time.

The history policy needs to know how small history could be before it can decide whether
replacing it pays. Compressing a whole conversation again costs a worker hundreds of
milliseconds on a large one, too much to spend inside a request, so it is done after a turn has
been answered, while the agent is busy with the reply: the history exactly as it was sent goes to
the conversation's own worker, when that worker is idle and no request is waiting, through the
strong pipeline. The forms that came back smaller wait here for a later turn to use or ignore.

Computing from what was sent (rather than from the originals) keeps every form consistent with
the prefix the provider holds: a dedup pointer in a candidate names text that is in that prefix.

A candidate belongs to one record generation: once history is rewritten it is stale and made
again. Candidates live only in this process, bounded by bytes, least recently used first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import orjson

from hookd import sticky, validate
from hookd.compressor import Compressor, CompressorError, Job

log = logging.getLogger("hookd.rewrites")

# A candidate is made again after this many requests: new history may have made older reads stale.
EVERY = 2
# Conversations smaller than this cannot gain enough from a rewrite to be worth a worker's time.
MIN_HISTORY_BYTES = 16 * 1024


@dataclass
class Candidate:
    generation: int
    digests: bytes  # the original messages it covers (a prefix of the record's)
    made_at: int  # the record's request count when it was made
    forms: dict[int, bytes]  # index -> compressed form, where smaller than what was sent
    saved: dict[int, int] = field(default_factory=dict)  # index -> tokens the form takes out

    @property
    def count(self) -> int:
        return len(self.digests) // sticky.DIGEST

    @property
    def size(self) -> int:
        return len(self.digests) + sum(len(b) for b in self.forms.values()) + sticky.RECORD_OVERHEAD

    def decoded(self) -> dict[int, Any]:
        return {i: orjson.loads(b) for i, b in self.forms.items()}


class Candidates:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: OrderedDict[bytes, Candidate] = OrderedDict()
        self.bytes = 0
        self.running: set[bytes] = set()

    def get(self, key: bytes, record: sticky.Record) -> Candidate | None:
        """The candidate for this record as it stands, if one is ready."""
        candidate = self.items.get(key)
        if candidate is None:
            return None
        if candidate.generation != record.generation or not record.digests.startswith(candidate.digests):
            self._drop(key)
            return None
        self.items.move_to_end(key)
        return candidate

    def due(self, key: bytes, record: sticky.Record, history_bytes: int) -> bool:
        if key in self.running or history_bytes < MIN_HISTORY_BYTES:
            return False
        candidate = self.get(key, record)
        return candidate is None or record.cache.requests - candidate.made_at >= EVERY

    def put(self, key: bytes, candidate: Candidate) -> None:
        self._drop(key)
        if candidate.size > self.max_bytes:
            return
        self.items[key] = candidate
        self.bytes += candidate.size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.items)))

    def _drop(self, key: bytes) -> None:
        candidate = self.items.pop(key, None)
        if candidate is not None:
            self.bytes -= candidate.size

    async def refresh(self, compressor: Compressor, key: bytes, job: Job, record: sticky.Record) -> None:
        """Make the candidate of record `key` from `job` (the history as sent, unmarked, whole),
        if a worker is free for it. Failures only mean no candidate: the policy then leaves
        history as it is."""
        self.running.add(key)
        try:
            result = await compressor.compress_idle(job)
        except CompressorError as exc:
            log.info("no rewrite candidate this time: %s", exc)
            return
        finally:
            self.running.discard(key)
        if result is None or result.tokens_before <= 0:
            return
        try:
            validate.check(job.messages, result.messages)
        except validate.InvalidOutput as exc:
            log.warning("rewrite candidate failed validation: %s", exc)
            return
        forms = {}
        for index, (sent, form) in enumerate(zip(job.messages, result.messages, strict=True)):
            if form is not sent:
                encoded = orjson.dumps(form)
                if len(encoded) < len(orjson.dumps(sent)):
                    forms[index] = sticky.kept(encoded)
        saved = {i: before - after for i, (before, after) in result.counts.items() if i in forms}
        covered = record.digests[: len(job.messages) * sticky.DIGEST]
        self.put(key, Candidate(record.generation, covered, record.cache.requests, forms, saved))
