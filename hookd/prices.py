"""What providers charge for their prompt caches: one table, by provider and model family.

Prices are fractions of the provider's own input price, so a billed request is counted in
"input-token equivalents": cached reads at `read`, cache writes at `write` (entries that live
`ttl` seconds unused) or `write_long` (Anthropic's `"ttl": "1h"` entries, `ttl_long`), the rest
at 1. `breakpoints` says whether the provider caches only where the request marks it (Anthropic's
`cache_control`) or every prefix on its own (OpenAI, DeepSeek, Gemini's implicit cache). The
operator can override any field of any row through `/config` (`cache_prices`), for a negotiated
price or a provider that changed its rules.

Sources (late 2026): Anthropic's prompt-caching docs (0.1x reads, 1.25x 5-minute writes, 2x 1-hour
writes, at most 4 breakpoints, ~20 blocks of lookback); OpenAI's (50-90% off cached input by model,
no write premium, evicted after 5-10 minutes idle, always within an hour); DeepSeek's (hits at about
a tenth, no write premium, entries kept for hours); Gemini's implicit caching (a quarter of the
input price on 2.5 models, a tenth on later ones).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

FIVE_MINUTES = 300.0
ONE_HOUR = 3600.0


@dataclass(frozen=True)
class Prices:
    read: float
    write: float
    write_long: float
    ttl: float
    ttl_long: float
    breakpoints: bool
    min_tokens: int = 1024


ANTHROPIC = Prices(read=0.1, write=1.25, write_long=2.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=True)
# Rows are chosen by the longest model-name prefix that names one (or an alias of one), else by
# the provider, else "default": Aperture's provider names are the operator's own, so a DeepSeek
# model behind a provider called "openai" still gets DeepSeek's prices, and a Claude model
# Anthropic's whatever its provider is called.
DEFAULT_TABLE: dict[str, Prices] = {
    "anthropic": ANTHROPIC,
    "openai": Prices(read=0.5, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    "gpt-4.1": Prices(read=0.25, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    "gpt-5": Prices(read=0.1, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    "o3": Prices(read=0.25, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    "o4": Prices(read=0.25, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    # DeepSeek keeps entries "for hours to days"; an hour is the cautious end of that.
    "deepseek": Prices(read=0.1, write=1.0, write_long=1.0, ttl=ONE_HOUR, ttl_long=ONE_HOUR, breakpoints=False),
    "gemini": Prices(read=0.25, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
    "default": Prices(read=0.5, write=1.0, write_long=1.0, ttl=FIVE_MINUTES, ttl_long=ONE_HOUR, breakpoints=False),
}
MODEL_ALIASES = {"claude": "anthropic"}
FIELDS = tuple(asdict(ANTHROPIC))


@dataclass
class Usage:
    """One request's input as a provider bills it, in tokens by kind."""

    input: int = 0
    cache_read: int = 0
    cache_write: int = 0
    cache_write_long: int = 0

    def cost(self, prices: Prices) -> float:
        """In input-token equivalents."""
        return (
            self.input
            + prices.read * self.cache_read
            + prices.write * self.cache_write
            + prices.write_long * self.cache_write_long
        )

    @property
    def total(self) -> int:
        return self.input + self.cache_read + self.cache_write + self.cache_write_long

    def add(self, other: Usage) -> None:
        self.input += other.input
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write
        self.cache_write_long += other.cache_write_long


MAX_ROWS = 64
MAX_ROW_NAME = 64


class InvalidPrices(ValueError):
    """A `cache_prices` override that is not a table of valid rows."""


def resolve(table: dict[str, Prices], provider: str, model: str) -> Prices:
    lowered = model.lower()
    names = {**{name: name for name in table}, **MODEL_ALIASES}
    prefixes = [prefix for prefix in names if lowered.startswith(prefix)]
    if prefixes:
        return table[names[max(prefixes, key=len)]]
    return table.get(provider.lower()) or table["default"]


def merged(overrides: dict[str, dict[str, Any]]) -> dict[str, Prices]:
    """The default table with the operator's overrides applied, row by row and field by field."""
    table = dict(DEFAULT_TABLE)
    for name, fields in overrides.items():
        base = table.get(name, table["default"])
        table[name] = replace(base, **fields)
    return table


def validate(value: Any) -> dict[str, dict[str, Any]]:
    """`cache_prices` as PUT to /config: {row: {field: value}}, every value checked."""
    if not isinstance(value, dict) or len(value) > MAX_ROWS:
        raise InvalidPrices(f"cache_prices must be an object of at most {MAX_ROWS} rows")
    checked: dict[str, dict[str, Any]] = {}
    for name, fields in value.items():
        if not name or len(name) > MAX_ROW_NAME or name != name.lower():
            raise InvalidPrices(f"cache_prices row names are lowercase providers or model prefixes: {name!r}")
        if not isinstance(fields, dict):
            raise InvalidPrices(f"cache_prices.{name} must be an object of {', '.join(FIELDS)}")
        checked[name] = {key: _field(name, key, item) for key, item in fields.items()}
    return checked


def _field(row: str, key: str, value: Any) -> Any:
    where = f"cache_prices.{row}.{key}"
    if key == "breakpoints":
        if not isinstance(value, bool):
            raise InvalidPrices(f"{where} must be true or false")
        return value
    if key not in FIELDS:
        raise InvalidPrices(f"{where} is not a price field (known: {', '.join(FIELDS)})")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidPrices(f"{where} must be a number")
    if key == "min_tokens":
        if not isinstance(value, int) or not 0 <= value <= 1_000_000:
            raise InvalidPrices(f"{where} must be an integer from 0 to 1000000")
        return value
    if key in ("ttl", "ttl_long"):
        if not 1 <= value <= 7 * 86400:
            raise InvalidPrices(f"{where} must be seconds from 1 to 604800")
        return float(value)
    if key == "read" and not 0 <= value <= 1:
        raise InvalidPrices(f"{where} must be from 0 to 1 (a fraction of the input price)")
    if key != "read" and not 1 <= value <= 10:
        raise InvalidPrices(f"{where} must be from 1 to 10 (a multiple of the input price)")
    return float(value)


def as_document(table: dict[str, Prices]) -> dict[str, dict[str, Any]]:
    return {name: asdict(prices) for name, prices in sorted(table.items())}
