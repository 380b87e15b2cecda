"""What the provider would have billed for a request had hookd let it through as it came.

The estimate starts from the provider's own bill for the request as hookd sent it, and undoes
what hookd changed, from the facts the hook recorded when it answered (`hookd.ledger.Facts`):

- `removed_cached`: tokens hookd had removed from history that the provider held in its cache
  (the conversation's cache was warm). Sent, they would have been **read** from the cache.
- `removed_new`: tokens hookd removed from what this request adds (new messages, or all of it
  when the cache was cold). Sent, they would have been billed like the rest of the new part:
  **written** to the cache where the provider caches only at breakpoints and this request wrote
  an entry (at the lifetime it wrote), else plain **input**.
- `rewritten`: history a rewrite made the provider bill afresh (written, or input where caching
  is automatic) that it would otherwise have **read**: moved from there to cache reads.

So, with `fresh` the kind a request's new part is billed as:

    read'  = read + removed_cached + rewritten
    fresh' = fresh + removed_new - rewritten    (never below zero; the rest from input)

Cache hits the provider would have found on the original bytes are the ones it found on hookd's:
hookd sends the same history byte for byte from turn to turn, so the cache boundary it sees is
the one the original conversation would have had. Token counts in the facts are hookd's own
(headroom's counter on the messages); the provider's tokenizer differs by a few per cent, and so
does the estimate. The cache model's estimate (`Facts.modelled_without`) is what stands in when no
event arrives.
"""

from __future__ import annotations

from hookd.ledger import Facts
from hookd.prices import Prices, Usage


def without_hookd(billed: Usage, facts: Facts, prices: Prices) -> Usage:
    estimate = Usage(
        input=billed.input,
        cache_read=billed.cache_read + facts.removed_cached + facts.rewritten,
        cache_write=billed.cache_write,
        cache_write_long=billed.cache_write_long,
    )
    if not prices.breakpoints or billed.cache_write + billed.cache_write_long == 0:
        estimate.input += facts.removed_new
    elif billed.cache_write == 0:
        estimate.cache_write_long += facts.removed_new
    else:
        estimate.cache_write += facts.removed_new
    _take(estimate, facts.rewritten)
    return estimate


def _take(usage: Usage, tokens: int) -> None:
    """Take `tokens` of what was billed afresh: writes first, then input."""
    for kind in ("cache_write", "cache_write_long", "input"):
        taken = min(tokens, getattr(usage, kind))
        setattr(usage, kind, getattr(usage, kind) - taken)
        tokens -= taken
