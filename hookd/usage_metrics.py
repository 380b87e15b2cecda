"""The provider's bill and hookd's savings as Prometheus series, per provider, model and user.

Registered on the same registry as `hookd.metrics`. Every series counts input tokens by kind
(`input`, `cache_read`, `cache_write_5m`, `cache_write_1h`) or in input-token equivalents
(`weighted`: each kind at its price from `hookd.prices`, so 1,000 cached reads at 0.1x are 100).

- from events (`entire_request`): what the provider billed (`hookd_billed_*`) and hookd's
  estimate of the bill without hookd for the same requests (`hookd_estimated_*`); a request hookd
  never answered counts as billed in both (as far as hookd knows it changed nothing);
- from the cache model, for requests hookd answered that no event came for in time:
  `hookd_modelled_billed_*` and `hookd_modelled_estimated_*`.

Users are Aperture's `login_name`, or with `--hash-users` the first 16 hex digits of its
HMAC-SHA256 under the operator's key (stable, not reversible without the key). Users and models
are bounded like `ModelLabels`: past the limit, new ones are counted as "other".
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from hookd.metrics import MAX_LABEL_CHARS, ModelLabels, provider_label
from hookd.prices import Prices, Usage

MAX_USER_LABELS = 200
HASH_HEX_DIGITS = 16
# Usage's fields and the `kind` label values they are counted under.
KINDS = (
    ("input", "input"),
    ("cache_read", "cache_read"),
    ("cache_write", "cache_write_5m"),
    ("cache_write_long", "cache_write_1h"),
)
LABELS = ("provider", "model", "user")


class UserLabels:
    """Login names as label values: hashed when a key is given, the first `limit` as themselves."""

    def __init__(self, limit: int = MAX_USER_LABELS, key: bytes | None = None) -> None:
        self.names = ModelLabels(limit)
        self.key = key

    def label(self, login: str) -> str:
        if not login:
            return "unknown"
        if self.key is not None:
            login = hmac.new(self.key, login.encode(), hashlib.sha256).hexdigest()[:HASH_HEX_DIGITS]
        return self.names.label(login[:MAX_LABEL_CHARS])


@dataclass(frozen=True)
class Who:
    provider: str
    model: str
    user: str


class UsageMetrics:
    def __init__(self, registry: CollectorRegistry, models: ModelLabels, users: UserLabels) -> None:
        self.models = models
        self.users = users
        self.children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        r = registry
        # The events process (--events-listen) can restart without the front end: these counters
        # then start again from zero, and `hookd savings` must know they did.
        self.counting_since = Gauge(
            "hookd_usage_counting_since_seconds",
            "When the usage counters started from zero (Unix time): hookd's start, or the events process's",
            registry=r,
        )
        self.counting_since.set(time.time())
        self.events = Counter(
            "hookd_usage_events", "entire_request events received, by what became of them", ["outcome"], registry=r
        )
        self.requests = Counter(
            "hookd_usage_requests",
            "Requests whose bill an event reported; matched: hookd had answered the request",
            [*LABELS, "matched"],
            registry=r,
        )
        self.billed = Counter(
            "hookd_billed_input_tokens", "Input tokens the provider billed, by kind", [*LABELS, "kind"], registry=r
        )
        self.billed_weighted = Counter(
            "hookd_billed_input_weighted_tokens",
            "Input the provider billed, in input-token equivalents (each kind at its price)",
            LABELS,
            registry=r,
        )
        self.estimated = Counter(
            "hookd_estimated_input_tokens",
            "Input tokens the provider would have billed for the same requests without hookd (estimated), by kind",
            [*LABELS, "kind"],
            registry=r,
        )
        self.estimated_weighted = Counter(
            "hookd_estimated_input_weighted_tokens",
            "Input the provider would have billed without hookd (estimated), in input-token equivalents",
            LABELS,
            registry=r,
        )
        self.dollars = Counter(
            "hookd_aperture_cost_dollars",
            "Aperture's estimated cost of the requests events reported (input and output), when sent",
            LABELS,
            registry=r,
        )
        self.removed = Counter(
            "hookd_removed_tokens",
            "Tokens hookd took out of the messages of requests it answered (counted when their bill is settled)",
            LABELS,
            registry=r,
        )
        self.pending = Gauge(
            "hookd_usage_pending_requests",
            "Requests hookd answered whose event has not come yet (bounded; counted by the cache model on expiry)",
            registry=r,
        )
        self.modelled_requests = Counter(
            "hookd_modelled_requests", "Requests hookd answered that no event came for in time", LABELS, registry=r
        )
        self.modelled = Counter(
            "hookd_modelled_billed_input_tokens",
            "The cache model's estimate of the input billed, for requests no event came for, by kind",
            [*LABELS, "kind"],
            registry=r,
        )
        self.modelled_weighted = Counter(
            "hookd_modelled_billed_input_weighted_tokens",
            "The cache model's estimate of the input billed, for requests no event came for, "
            "in input-token equivalents",
            LABELS,
            registry=r,
        )
        self.modelled_without = Counter(
            "hookd_modelled_estimated_input_tokens",
            "The cache model's estimate of the input billed without hookd, for requests no event came for, by kind",
            [*LABELS, "kind"],
            registry=r,
        )
        self.modelled_without_weighted = Counter(
            "hookd_modelled_estimated_input_weighted_tokens",
            "The cache model's estimate of the input billed without hookd, for requests no event came for, "
            "in input-token equivalents",
            LABELS,
            registry=r,
        )

    def _add(
        self, by_kind: Counter, weighted: Counter, labels: tuple[str, str, str], usage: Usage, prices: Prices
    ) -> None:
        for field, kind in KINDS:
            # Every kind gets its series, zero or not, so ratios over kinds never miss a term.
            self._child(by_kind, (*labels, kind)).inc(getattr(usage, field))
        self._child(weighted, labels).inc(usage.cost(prices))

    def _child(self, counter: Counter, labels: tuple[str, ...]) -> Counter:
        """`counter.labels(*labels)`, looked up once: prometheus-client validates and locks on
        every call, and an event touches a dozen series (label values are bounded, so is this)."""
        key = (id(counter), labels)
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = counter.labels(*labels)
        return child

    def who(self, provider: str, model: str, user: str) -> Who:
        return Who(provider_label(provider), self.models.label(model), self.users.label(user))

    def observed(
        self, who: Who, prices: Prices, billed: Usage, without: Usage, removed: int | None, dollars: float
    ) -> None:
        """One request's bill from an event; `removed` is None when hookd had not answered it."""
        labels = (who.provider, who.model, who.user)
        self.requests.labels(*labels, "false" if removed is None else "true").inc()
        self._add(self.billed, self.billed_weighted, labels, billed, prices)
        self._add(self.estimated, self.estimated_weighted, labels, without, prices)
        if removed:
            self.removed.labels(*labels).inc(removed)
        if dollars:
            self.dollars.labels(*labels).inc(dollars)

    def modelled_only(self, who: Who, prices: Prices, billed: Usage, without: Usage, removed: int) -> None:
        """One request hookd answered whose event never came: the cache model's figures."""
        labels = (who.provider, who.model, who.user)
        self.modelled_requests.labels(*labels).inc()
        self._add(self.modelled, self.modelled_weighted, labels, billed, prices)
        self._add(self.modelled_without, self.modelled_without_weighted, labels, without, prices)
        if removed:
            self.removed.labels(*labels).inc(removed)
