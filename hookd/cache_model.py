"""What the provider's prompt cache holds for one conversation, and what a rewrite would cost.

hookd never sees the provider's bill for a request (that arrives after the hook), so it keeps a
model of the cache from what it sent: when each request went, where its breakpoints were (an
Anthropic entry exists only at a breakpoint; OpenAI-style caches keep every prefix), and for how
long each entry lives unused. From that it answers the history policy's questions:

- is the cache **cold** (idle past its TTL, plus a margin: the provider will write everything
  again anyway, so rewriting is free);
- from which message boundary could a rewrite still **read** the unchanged prefix (`read_point`);
- how many more requests will the conversation probably make (`remaining`);
- does replacing history pay: `(R + 1) * read * saved > margin * (write - read) * rewritten`.

The expected number of remaining requests follows the "Lindy" estimate for lifetimes with a
heavy tail, which agent sessions have (a handful of requests to several hundred): a conversation
that has made n requests is as likely as not to make about n more. A rewrite's cost is paid now
and for certain, its gain later and only while the conversation lasts, so hookd counts on half
that median (n / 2). The estimate has a floor (a conversation that has just begun is still an
agent session, which runs tens of requests), a cap (a long session's past says little about the
next hour; sessions end when the context fills and the client compacts), and is limited by how
often the conversation has gone cold so far, since a cold cache ends what a warm rewrite can
earn: (n + 1) / (colds + 1) requests between cold turns, Laplace-smoothed, plus the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hookd.prices import Prices, Usage

# A cache counts as cold only this long past its TTL (clock skew, requests still in flight), and
# an entry is trusted for reading only while it has this long left.
COLD_MARGIN_S = 60.0
READ_MARGIN_S = 15.0
MAX_ENTRIES = 32
REMAINING_CAP = 50.0
# A conversation that has only just begun is still expected to make this many more requests:
# agent sessions run tens to hundreds of requests, and a Lindy estimate of 1 or 2 would rule out
# rewriting output that became redundant right away, which is when it is cheapest.
REMAINING_FLOOR = 8.0
CACHE_CONTROL = "cache_control"
MAX_BREAKPOINTS = 4


@dataclass
class Entry:
    boundary: int  # the entry caches messages[:boundary] (0: tools and system only)
    expires: float
    long: bool  # an Anthropic one-hour entry


@dataclass
class CacheState:
    """One conversation's cache as hookd models it; kept in the conversation's record."""

    sent_at: float = 0.0
    requests: int = 0
    colds: int = 0
    # `requests` when history was last rewritten (-1: never)
    last_rewrite: int = -1
    entries: list[Entry] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "sent_at": self.sent_at,
            "requests": self.requests,
            "colds": self.colds,
            "last_rewrite": self.last_rewrite,
            "entries": [[e.boundary, e.expires, e.long] for e in self.entries],
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> CacheState:
        return cls(
            sent_at=float(value["sent_at"]),
            requests=int(value["requests"]),
            colds=int(value["colds"]),
            last_rewrite=int(value["last_rewrite"]),
            entries=[Entry(int(b), float(e), bool(long)) for b, e, long in value["entries"]],
        )


def expires(state: CacheState, prices: Prices) -> float:
    """When the last thing the provider holds for this conversation expires."""
    if prices.breakpoints:
        return max((e.expires for e in state.entries), default=0.0)
    return state.sent_at + prices.ttl


def cold(state: CacheState, prices: Prices, now: float, margin: float = COLD_MARGIN_S) -> bool:
    """Nothing of this conversation can still be in the provider's cache (`margin` seconds past
    its expiry: the policy wants certainty before it rewrites; an estimate of the bill wants the
    likeliest answer, 0)."""
    return state.requests > 0 and now > expires(state, prices) + margin


def read_point(state: CacheState, prices: Prices, start: int, now: float) -> int | None:
    """The longest prefix, up to message `start`, that a request could still read from the
    cache (None: none at all). An explicit cache has entries only at breakpoints; a rewrite
    places one there."""
    if not prices.breakpoints:
        return start if now < state.sent_at + prices.ttl - READ_MARGIN_S else None
    alive = [e.boundary for e in state.entries if e.boundary <= start and e.expires - READ_MARGIN_S > now]
    return max(alive, default=None)


def remaining(state: CacheState) -> float:
    """Requests this conversation will probably still make (see the module docstring)."""
    seen = max(1, state.requests)
    lindy = max(seen / 2, REMAINING_FLOOR)
    return min(lindy, REMAINING_CAP, (seen + 1) / (state.colds + 1) + REMAINING_FLOOR)


def value(prices: Prices, state: CacheState, saved: float, rewritten: float, margin: float) -> float:
    """What a rewrite is worth over the requests to come, in input-token equivalents: `saved`
    tokens of history read `remaining + 1` times for less (this request included), against
    `rewritten` tokens written again instead of read, weighted by `margin` for the estimate's
    uncertainty."""
    return (remaining(state) + 1) * prices.read * saved - margin * (prices.write - prices.read) * rewritten


def estimate(
    state: CacheState,
    prices: Prices,
    now: float,
    head: int,
    sizes: list[int],
    sent: list[tuple[int, bool]],
    unchanged: int,
) -> Usage:
    """The bill the model expects for a request before it is sent: `head` tokens of tools and
    system, messages of `sizes` tokens, breakpoints at `sent`, the first `unchanged` messages as
    they were last time. By message, not by content block: an estimate for when the provider's
    own usage does not reach hookd."""
    ends = [head]
    for size in sizes:
        ends.append(ends[-1] + size)
    hit = read_point(state, prices, min(unchanged, len(sizes)), now)
    read = ends[hit] if hit is not None else 0
    if not prices.breakpoints:
        return Usage(cache_read=read, input=ends[-1] - read)
    if not sent or ends[max(b for b, _ in sent)] < prices.min_tokens:
        return Usage(input=ends[-1])
    last = max(b for b, _ in sent)
    written = max(0, ends[last] - read)
    long = any(is_long for boundary, is_long in sent if boundary == last)
    return Usage(
        cache_read=min(read, ends[last]),
        cache_write=0 if long else written,
        cache_write_long=written if long else 0,
        input=ends[-1] - max(ends[last], read),
    )


def marks(body: dict[str, Any], messages: list[Any]) -> list[tuple[int, bool]]:
    """The message boundaries this request asks the provider to cache (breakpoints on a
    message's last block, or on tools or system for boundary 0), with whether each is 1 h."""
    found: list[tuple[int, bool]] = []
    head = [*_as_list(body.get("tools")), *_as_list(body.get("system"))]
    found += [(0, long) for block in head if (long := _mark(block)) is not None]
    for index, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and content and (long := _mark(content[-1])) is not None:
            found.append((index + 1, long))
    return found


def observe(state: CacheState, prices: Prices, now: float, sent: list[tuple[int, bool]], unchanged: int) -> None:
    """Record a request as sent: it read the longest live entry within the prefix it shares
    with what was sent before (`unchanged` messages), which refreshes that entry, and it wrote
    an entry at each of its breakpoints."""
    was_cold = cold(state, prices, now)
    if prices.breakpoints:
        hit = read_point(state, prices, unchanged, now)
        # Entries past the unchanged prefix cache history that is no longer sent.
        live = [e for e in state.entries if e.expires > now and e.boundary <= unchanged]
        for entry in live:
            if entry.boundary == hit:
                entry.expires = now + (prices.ttl_long if entry.long else prices.ttl)
        for boundary, long in sent:
            live = [e for e in live if e.boundary != boundary]
            live.append(Entry(boundary, now + (prices.ttl_long if long else prices.ttl), long))
        # The entries that expire last are the ones worth remembering (the tools-and-system
        # entry among them: every request refreshes it).
        kept = sorted(live, key=lambda e: e.expires)[-MAX_ENTRIES:]
        state.entries = sorted(kept, key=lambda e: e.boundary)
    state.colds += was_cold
    state.requests += 1
    state.sent_at = now


def place_breakpoint(messages: list[Any], boundary: int, long: bool, head: int) -> bool:
    """Mark messages[:boundary] for caching, so a rewrite from there on still reads what comes
    before it. `messages` is the whole request's list; entries are replaced, never changed in
    place. Within the provider's limit of four (`head` of them on tools and system): when four
    are already set, the next-to-last message breakpoint (a second entry for this very request)
    gives way. Returns False when no breakpoint can go there (the message has no block to carry
    it, or no breakpoint can give way)."""
    if boundary <= 0:
        return True
    content = messages[boundary - 1].get("content") if isinstance(messages[boundary - 1], dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[-1], dict):
        return False
    if CACHE_CONTROL in content[-1]:
        return True
    marked = [i for i, m in enumerate(messages) if _last_block_marked(m)]
    if head + _count_marks(messages) >= MAX_BREAKPOINTS:
        movable = [i for i in marked[:-1] if i >= boundary]
        if not movable:
            return False
        victim = messages[movable[-1]]
        messages[movable[-1]] = {**victim, "content": [*victim["content"][:-1], _unmarked(victim["content"][-1])]}
    later_long = any(_mark(messages[i]["content"][-1]) for i in marked if i >= boundary)
    control: dict[str, Any] = {"type": "ephemeral"}
    if long or later_long:
        # A one-hour breakpoint may not follow a five-minute one.
        control["ttl"] = "1h"
    target = messages[boundary - 1]
    messages[boundary - 1] = {**target, "content": [*content[:-1], {**content[-1], CACHE_CONTROL: control}]}
    return True


def has_breakpoints(body: dict[str, Any], messages: list[Any]) -> bool:
    return bool(marks(body, messages))


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _mark(block: Any) -> bool | None:
    """None when the block carries no breakpoint, else whether it asks for an hour."""
    if not isinstance(block, dict) or not isinstance(block.get(CACHE_CONTROL), dict):
        return None
    return block[CACHE_CONTROL].get("ttl") == "1h"


def _last_block_marked(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and bool(content) and _mark(content[-1]) is not None


def _count_marks(messages: list[Any]) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(_mark(block) is not None for block in content)
    return count


def _unmarked(block: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in block.items() if k != CACHE_CONTROL}
