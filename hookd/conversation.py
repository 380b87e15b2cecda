"""One turn of a conversation: what was sent before, what the history policy makes of it, and
what is remembered afterwards.

`begin` finds the conversation's record and renders its history exactly as it was sent last turn
(with this request's own breakpoints). `rewrite` asks the history policy whether to replace some
of that history now, and applies its plan: new forms for the messages from the cut on, and a
breakpoint where the unchanged prefix can still be read from the provider's cache. `end` records
what went upstream, feeds the cache model, and says whether a new rewrite candidate should be
made once the answer is out. In `plain` mode there is no record and none of this runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from hookd import cache_model, history, protocol, rewrites, sticky
from hookd.compressor import Compressor, Job
from hookd.config import Store
from hookd.ledger import Facts
from hookd.prices import Prices, resolve
from hookd.summary import Record as Summary

log = logging.getLogger("hookd")
MIB = 1024 * 1024


@dataclass
class Turn:
    key: bytes  # the conversation's record
    session: bytes  # its worker affinity key
    digests: bytes
    sizes: list[int]  # each original message's size as the cache sees it
    previous: sticky.Record | None
    prefix: list[Any]  # the history as it goes upstream this turn
    mode: str
    now: float
    prices: Prices
    plan: history.Plan | None = None
    facts: Facts | None = None  # set by `end`: what this request's bill should show

    @property
    def strong(self) -> bool:
        """The history policy's modes compress new messages with the strong pipeline."""
        return self.mode in ("auto", "clear")


class Conversations:
    def __init__(
        self, store: Store, compressor: Compressor, records: sticky.Records, max_bytes: int, clock: Callable[[], float]
    ) -> None:
        self.store = store
        self.compressor = compressor
        self.clock = clock
        self.records = records
        # Candidates hold at most half as much again as the records they belong to.
        self.candidates = rewrites.Candidates(max_bytes // 2)

    async def begin(self, session: bytes, call: protocol.HookCall) -> Turn | None:
        mode = self.store.values["history"]
        if mode == "plain":
            return None
        current, sizes = sticky.fingerprint(call.messages)
        key = sticky.record_key(session, current)
        previous = await self.records.lookup(key, current)
        prefix: list[Any] = []
        if previous is not None:
            for index in range(previous.count):
                stored = previous.emitted.get(index)
                original = call.messages[index]
                prefix.append(original if stored is None else sticky.render(stored, original))
        prices = resolve(self.store.price_table(), call.provider, call.model)
        return Turn(key, session, current, sizes, previous, prefix, mode, self.clock(), prices)

    async def rewrite(self, turn: Turn, call: protocol.HookCall, job_for: Callable[[list[Any]], Job]) -> None:
        """Apply the history policy to this turn's history (modes auto and clear)."""
        previous = turn.previous
        if not turn.strong or previous is None or not previous.count:
            return
        cold = cache_model.cold(previous.cache, turn.prices, turn.now)
        candidate = self.candidates.get(turn.key, previous)
        if candidate is None and not cold:
            return
        knobs = self.store.history_knobs()
        if candidate is not None and not candidate.forms and knobs.mode != "clear":
            return
        sizes = history.sent_sizes(previous.emitted, turn.sizes, previous.count)
        sent = [sticky.strip_cache_control(m) for m in turn.prefix]
        if candidate is not None:
            forms, saved = candidate.decoded(), candidate.saved
        else:
            # Nothing made ahead of time, and the provider writes everything again anyway: this
            # is the one time a rewrite is free, worth a worker's time inside the request.
            forms, saved = await self._candidate_now(job_for(sent), sent)
        pointing = {i for i, stored in previous.emitted.items() if history.POINTS in stored}
        chosen = history.choose(knobs, forms, sent, sizes, call.messages, pointing)
        if cold:
            plan = history.plan_cold(knobs, chosen, sizes)
        else:
            plan = history.plan_batch(knobs, chosen, sizes, previous.cache, turn.prices, turn.now)
        if plan is not None:
            plan.counted(saved, sizes)
            self._apply(turn, call, plan)

    async def _candidate_now(self, job: Job, sent: list[Any]) -> tuple[dict[int, Any], dict[int, int]]:
        """Forms for the history, and the tokens each takes out."""
        try:
            result = await self.compressor.compress(job)
        except Exception as exc:
            log.info("no cold rewrite this turn: %s", exc)
            return {}, {}
        if result.tokens_before <= 0 or len(result.messages) != len(sent):
            return {}, {}
        forms = {i: form for i, form in enumerate(result.messages) if form is not sent[i]}
        return forms, {i: before - after for i, (before, after) in result.counts.items()}

    def _apply(self, turn: Turn, call: protocol.HookCall, plan: history.Plan) -> None:
        count = len(turn.prefix)
        messages = [*turn.prefix, *call.messages[count:]]
        for index, form in plan.forms.items():
            messages[index] = sticky.mark(_copy(form), call.messages[index])
        if plan.reason == "batch" and turn.prices.breakpoints and cache_model.has_breakpoints(call.body, messages):
            entries = turn.previous.cache.entries if turn.previous else []
            long = any(e.long for e in entries if e.boundary == plan.read_point)
            head = len(cache_model.marks(call.body, []))
            if not cache_model.place_breakpoint(messages, plan.read_point, long, head):
                log.info("no room for a breakpoint at message %d; the rewrite waits", plan.read_point)
                return
        turn.prefix = messages[:count]
        # A breakpoint that gave way was the client's, on a new message: the new messages carry
        # the request's breakpoints as they are now.
        call.messages[count:] = messages[count:]
        turn.plan = plan

    async def end(
        self, turn: Turn, call: protocol.HookCall, sent: list[Any] | None, counts: tuple[int, int], rec: Summary
    ) -> Callable[[], Awaitable[None]] | None:
        """Record what went upstream (`sent`; None when the history could not be sent as
        recorded, which forgets the conversation). Returns the background work to do once the
        answer is out: a new rewrite candidate, when one is due."""
        if sent is None:
            await self.records.forget(turn.key)
            return None
        start = turn.plan.start if turn.plan is not None else None
        record = sticky.remember(turn.previous, turn.digests, call.messages, sent, start)
        record.tokens_before, record.tokens_after = counts
        unchanged = turn.plan.start if turn.plan is not None else (turn.previous.count if turn.previous else 0)
        marks = cache_model.marks(call.body, sent)
        sizes = history.sent_sizes(record.emitted, turn.sizes, record.count)
        turn.facts = self.facts(turn, call, record, sizes, marks, unchanged)
        cache_model.observe(record.cache, turn.prices, turn.now, marks, unchanged)
        if turn.plan is not None:
            record.generation += 1
            record.cache.last_rewrite = record.cache.requests
            rec.rewrite, rec.rewrite_msgs, rec.rewrite_tokens = (
                turn.plan.reason,
                len(turn.plan.forms),
                turn.plan.saved_tokens,
            )
        if not await self.records.commit(turn.key, record, turn.previous):
            # Another turn of this conversation was recorded meanwhile (another replica): this
            # one was answered from what it read, and the record stays theirs.
            return None
        if not turn.strong or not self.candidates.due(turn.key, record, sum(sizes)):
            return None
        messages = [sticky.strip_cache_control(m) for m in sent]
        job = Job(messages=messages, model=call.model, key=turn.session, knobs=self.knobs(), strong=True, count=True)
        return lambda: self.candidates.refresh(self.compressor, turn.key, job, record)

    def facts(
        self,
        turn: Turn,
        call: protocol.HookCall,
        record: sticky.Record,
        sizes: list[int],
        marks: list[tuple[int, bool]],
        unchanged: int,
    ) -> Facts:
        """What this request's bill should show, with hookd and without it (see hookd.ledger)."""
        previous = turn.previous
        state = previous.cache if previous is not None else cache_model.CacheState()
        warm = previous is not None and not cache_model.cold(state, turn.prices, turn.now, margin=0.0)
        removed_before = previous.tokens_before - previous.tokens_after if previous is not None else 0
        removed = record.tokens_before - record.tokens_after
        rewritten = 0
        if turn.plan is not None and turn.plan.reason == "batch":
            tail = history.sent_sizes(record.emitted, turn.sizes, previous.count if previous else 0)
            rewritten = round(sum(tail[turn.plan.read_point :]) / history.BYTES_PER_TOKEN)
            # What a warm batch took out of history would have been read, not written.
            removed_before += turn.plan.saved_tokens
        head = _tokens(len(orjson.dumps([call.body.get("tools"), call.body.get("system")])))
        sent_tokens = [_tokens(size) for size in sizes]
        original_tokens = [_tokens(size) for size in turn.sizes]
        originally = previous.count if previous is not None else 0
        return Facts(
            provider=call.provider,
            model=call.model,
            user=call.user,
            tokens_before=record.tokens_before,
            tokens_after=record.tokens_after,
            removed_cached=removed_before if warm else 0,
            removed_new=removed - (removed_before if warm else 0),
            rewritten=rewritten,
            modelled=cache_model.estimate(state, turn.prices, turn.now, head, sent_tokens, marks, unchanged),
            modelled_without=cache_model.estimate(
                state,
                turn.prices,
                turn.now,
                head,
                original_tokens,
                cache_model.marks(call.body, call.messages),
                originally,
            ),
            read_price=turn.prices.read,
            write_price=turn.prices.write,
        )

    def knobs(self) -> dict[str, Any]:
        """headroom's knobs for the history policy's jobs: file reads are protected by kind (see
        worker.offline), so recent output need not wait to leave a protected window."""
        return {**self.store.compress_knobs(), "protect_recent": 0}


def _tokens(size: int) -> int:
    return round(size / history.BYTES_PER_TOKEN)


def _copy(form: Any) -> Any:
    """A fresh copy: sticky.mark writes breakpoints into the message it is given."""
    return orjson.loads(orjson.dumps(form))
