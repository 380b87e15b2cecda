"""The history policy: when to rewrite what the provider already cached, and how much.

Modes (`history` in /config):

- `plain`: every turn compresses the whole conversation again (tsheadroom's way). Old messages
  change whenever headroom's view of them does, and every change costs a cache write.
- `sticky`: each message is compressed once, when it first arrives, and sent the same way ever
  after. The cache is never disturbed; history is never made smaller either.
- `auto` (the default): like sticky, with new messages compressed as hard as is safe, and every
  so often history is replaced from some message on by a more compressed form (stale or
  superseded file reads, repeated output) when the cache model says it pays for itself over the
  requests still to come: in one batch (at least `history_batch` messages), never again within
  `history_interval` requests, and from the cut that gains the most. When the conversation has
  been idle past its cache's lifetime the provider writes everything again anyway, so a cold
  turn rewrites the whole history to its most compressed form for free.
- `clear`: auto, and old tool output is cleared as well (see `hookd.clearing`), in the same batches
  and on cold turns.

The compressed forms come from a *candidate*: the history as last sent, compressed again with the
strong pipeline by a worker after a turn was answered (`hookd.rewrites`). This module only
chooses among forms; it never compresses.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from hookd import cache_model, clearing
from hookd.cache_model import CacheState
from hookd.prices import Prices

MODES = ("sticky", "plain", "auto", "clear")
# o200k_base averages 3.36 bytes of message JSON per token over the corpus; decisions weigh
# tokens against tokens, so an average is all they need.
BYTES_PER_TOKEN = 3.4
# How much more a rewrite must be worth than it costs: the expected number of requests to come is
# an estimate, and a rewrite that only just pays is a bet that often loses.
MARGIN = 1.5
# Smaller gains are not worth a batch, whatever the arithmetic says.
MIN_SAVED_TOKENS = 2048
# Only a message compression changed can hold a dedup pointer; this finds them in stored bytes.
POINTS = b"same as msg"
POINTER = re.compile(r"\[↑\d+L same as msg (\d+)(?: [+-]\d+L)?: ('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]")


@dataclass(frozen=True)
class Knobs:
    mode: str = "auto"
    batch: int = 2
    interval: int = 10
    keep: int = 10


@dataclass
class Plan:
    """A rewrite of history: messages from `start` on take new forms (unmarked)."""

    reason: str  # "batch" or "cold"
    start: int
    read_point: int  # the prefix still read from cache; a breakpoint goes there
    forms: dict[int, Any] = field(default_factory=dict)
    saved_bytes: int = 0
    # Tokens the rewrite takes out; from bytes until the worker's counts are known (`counted`).
    saved_tokens: int = 0

    def __post_init__(self) -> None:
        self.saved_tokens = self.saved_tokens or round(self.saved_bytes / BYTES_PER_TOKEN)

    def counted(self, saved: dict[int, int], sizes: list[int]) -> None:
        """Tokens by the worker's count where it gave one (`saved`: index -> tokens taken out),
        by bytes for forms it did not make (clearing's notes)."""
        self.saved_tokens = sum(
            saved[i] if i in saved else round((sizes[i] - _size(form)) / BYTES_PER_TOKEN)
            for i, form in self.forms.items()
        )


def sent_sizes(emitted: dict[int, bytes], original_sizes: list[int], count: int) -> list[int]:
    """The size of each history message as it was sent last turn."""
    return [len(emitted[i]) if i in emitted else original_sizes[i] for i in range(count)]


def choose(
    knobs: Knobs,
    candidate: dict[int, Any],
    sent: list[Any],
    sizes: list[int],
    originals: list[Any],
    pointing: set[int] | None = None,
) -> dict[int, Any]:
    """The smallest form of every history message the policy may send: the candidate's where it
    is smaller than what was sent, cleared tool output in `clear` mode, and nothing that would
    leave a dedup pointer without the text it points to. `pointing`: the messages sent with a
    pointer in them (None: look at every one)."""
    forms = {i: form for i, form in candidate.items() if i < len(sizes) and _size(form) < sizes[i]}
    sources = set(range(len(sent))) if pointing is None else pointing
    if knobs.mode == "clear":
        kept = referenced({**{i: sent[i] for i in sources if i < len(sent)}, **forms})
        current = {**dict(enumerate(sent)), **forms}
        for index, form in clearing.clear(current, originals, knobs.keep, len(sizes), kept).items():
            if _size(form) < (_size(forms[index]) if index in forms else sizes[index]):
                forms[index] = form
    return consistent(forms, sent, sources)


def plan_cold(knobs: Knobs, forms: dict[int, Any], sizes: list[int]) -> Plan | None:
    """A cold cache: everything is written again anyway, so every smaller form goes."""
    if not forms:
        return None
    saved = sum(sizes[i] - _size(form) for i, form in forms.items())
    return Plan("cold", min(forms), 0, forms, saved)


def plan_batch(
    knobs: Knobs, forms: dict[int, Any], sizes: list[int], state: CacheState, prices: Prices, now: float
) -> Plan | None:
    """The warm rewrite worth the most, if any is worth its cost: from which message on to
    replace history, given where the cache can still be read from."""
    if not forms or (state.last_rewrite >= 0 and state.requests - state.last_rewrite < knobs.interval):
        return None
    best: Plan | None = None
    best_value = 0.0
    count = len(sizes)
    starts = sorted(forms)
    for position, start in enumerate(starts):
        changed = starts[position:]
        if len(changed) < knobs.batch:
            break
        read_point = cache_model.read_point(state, prices, start, now)
        if read_point is None:
            continue
        saved = sum(sizes[i] - _size(forms[i]) for i in changed)
        if saved < MIN_SAVED_TOKENS * BYTES_PER_TOKEN:
            continue
        rewritten = sum(sizes[read_point:count]) - saved
        worth = cache_model.value(prices, state, saved, rewritten, MARGIN)
        if worth > best_value:
            best_value = worth
            best = Plan("batch", start, read_point, {i: forms[i] for i in changed}, saved)
    return best


def _size(form: Any) -> int:
    return len(orjson.dumps(form))


def pointers(form: Any) -> Iterator[tuple[int, str]]:
    """(message number, anchor text) of every dedup pointer in a message."""
    for text in strings(form):
        if "same as msg" not in text:
            continue
        for match in POINTER.finditer(text):
            try:
                anchor = ast.literal_eval(match.group(2))
            except (ValueError, SyntaxError):
                anchor = ""
            yield int(match.group(1)), str(anchor).removesuffix("...")


def referenced(forms: dict[int, Any]) -> set[int]:
    """Messages some dedup pointer refers to: their text must stay."""
    return {target for form in forms.values() for target, _ in pointers(form)}


def consistent(forms: dict[int, Any], sent: list[Any], sources: set[int] | None = None) -> dict[int, Any]:
    """`forms` without the changes that would leave a pointer dangling: a pointer must find its
    anchor in the message it names, as that message will be sent. `sources`: the sent messages
    that may hold a pointer (None: any)."""
    forms = dict(forms)
    for _ in range(len(forms) + 1):
        final = {**dict(enumerate(sent)), **forms}
        holders = set(final) if sources is None else sources | set(forms)
        broken = [(s, t) for s, t in _dangling(final, holders) if s in forms or t in forms]
        if not broken:
            return forms
        for source, target in broken:
            # Undo the newer change first: the pointer's own message if it changed, else the
            # message it points to.
            forms.pop(source if source in forms else target, None)
    return {}


def _dangling(final: dict[int, Any], holders: set[int]) -> list[tuple[int, int]]:
    broken = []
    for source in holders:
        for target, anchor in pointers(final.get(source)):
            text = "\0".join(strings(final.get(target)))
            if anchor and anchor not in text:
                broken.append((source, target))
    return broken


def strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
