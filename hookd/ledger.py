"""What hookd did to each request, kept briefly by Aperture's request id.

The provider's bill for a request arrives after the hook has answered, in Aperture's
`entire_request` event. To say what hookd saved on that request, the event is matched here to
what the hook knew when it answered: how many tokens it took out of the messages, how many of
those the provider had cached, how many tokens of history a rewrite made it write again instead
of read, and the cache model's own estimate of the bill with and without hookd (used when no
event arrives). Entries are small numbers, no content; they are bounded in count and age.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from hookd.prices import Usage

MAX_ENTRIES = 100_000
TTL_S = 600.0


@dataclass(frozen=True)
class Facts:
    provider: str
    model: str
    user: str
    tokens_before: int  # the messages as the client sent them
    tokens_after: int  # as hookd sent them
    removed_cached: int  # removed from history the provider had cached (read, without hookd)
    removed_new: int  # removed from what the provider writes this request
    rewritten: int  # history hookd made the provider write again where it would have read it
    modelled: Usage = field(default_factory=Usage)  # the cache model's estimate of the bill
    modelled_without: Usage = field(default_factory=Usage)  # the same for the request as it came
    read_price: float = 0.1
    write_price: float = 1.25


def as_wire(facts: Facts) -> dict[str, Any]:
    """The facts as plain JSON values, for the events process (`hookd.counter`)."""
    return asdict(facts)


def from_wire(value: dict[str, Any]) -> Facts:
    """The facts `as_wire` sent; a field missing or of the wrong kind raises TypeError."""
    usage = {name: Usage(**value.pop(name, {})) for name in ("modelled", "modelled_without")}
    return Facts(**value, **usage)


class Notebook(Protocol):
    """Where the hook notes what it did to each request: a `Ledger` in this process, or the
    events process's (`hookd.counter_link`)."""

    def note(self, request_id: str, facts: Facts) -> None: ...


class Ledger:
    def __init__(
        self, max_entries: int = MAX_ENTRIES, ttl: float = TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self.clock = clock
        self.entries: OrderedDict[str, tuple[float, Facts]] = OrderedDict()
        # Told of every entry that leaves unmatched (expired, or pushed out by the bound), so
        # the cache model's estimate can be counted for it.
        self.unmatched: Callable[[Facts], None] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def note(self, request_id: str, facts: Facts) -> None:
        if not request_id:
            return
        self.expire()
        self.entries.pop(request_id, None)
        self.entries[request_id] = (self.clock(), facts)
        while len(self.entries) > self.max_entries:
            self._unmatched(self.entries.popitem(last=False)[1][1])

    def take(self, request_id: str) -> Facts | None:
        """The facts of a request, once: a second event for the same id is not counted twice."""
        self.expire()
        entry = self.entries.pop(request_id, None)
        return entry[1] if entry else None

    def expire(self) -> list[Facts]:
        """Drop (and return) the entries no event came for in time."""
        horizon = self.clock() - self.ttl
        gone = []
        while self.entries:
            request_id, (noted, facts) = next(iter(self.entries.items()))
            if noted >= horizon:
                break
            del self.entries[request_id]
            gone.append(facts)
            self._unmatched(facts)
        return gone

    def _unmatched(self, facts: Facts) -> None:
        if self.unmatched is not None:
            self.unmatched(facts)
