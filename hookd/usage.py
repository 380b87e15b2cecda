"""The provider's bill for one request, read from Aperture's `entire_request` event.

Aperture calls a hook with `"events": ["entire_request"]` once a request has completed, with the
`metadata` of the hook call (`request_id`, `provider`, `model`, `login_name`) and whatever the
grant's `send` list asks for. Three places can carry the input tokens the provider billed; the
first that holds a readable usage is taken:

1. `response_body.usage`: the provider's own numbers, with its own meaning (Aperture assembles
   the body of a streamed response too).
   - Anthropic: `input_tokens` (neither read from nor written to the cache),
     `cache_read_input_tokens`, `cache_creation_input_tokens`, split by lifetime in
     `cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`.
   - OpenAI Chat Completions: `prompt_tokens`, of which `prompt_tokens_details.cached_tokens`
     (DeepSeek: `prompt_cache_hit_tokens`) were read from the cache; the Responses API's `input_tokens` with
     `input_tokens_details.cached_tokens` mean the same.
   - Gemini: `usageMetadata.promptTokenCount`, of which `cachedContentTokenCount` were cached.
2. `raw_responses`, the stream's parsed SSE events: Anthropic's `message_start` (`message.usage`)
   and `message_delta` (`usage`, cumulative), OpenAI's final chunk (`usage`), the Responses API's
   `response.completed` (`response.usage`). Later events' fields replace earlier ones'.
3. `metadata.estimated_cost.usage`, Aperture's own summary: `input_tokens`, `cached_tokens`,
   `cache_creation_input_tokens` and its 5 min / 1 h split. Aperture does not document whether
   its `input_tokens` includes the cached ones (OpenAI's convention) or not (Anthropic's); it is
   read as Anthropic's (disjoint), which the field names follow. Provider-native usage, when
   present, always wins over it.

Anything else (no usage anywhere, values that are not token counts) is reported as no usage. The
document is only read here: nothing of its content outlives the call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hookd.prices import Usage

# No request bills more input than this; a larger count is not a token count.
MAX_TOKENS = 100_000_000
# Request ids longer than this are not Aperture's; they are looked up as given, never stored.
MAX_ID_CHARS = 256
# Streamed events scanned per document: usage sits in the first and the last ones.
EDGE_EVENTS = 64
USAGE_HOLDERS = ("usage", "message", "response", "data", "usageMetadata")


class NotUsage(Exception):
    """A usage object whose counts are not token counts (wrong types, negative, absurd)."""


@dataclass(frozen=True)
class Event:
    request_id: str
    provider: str
    model: str
    user: str
    usage: Usage | None  # None: no readable usage in the event
    source: str  # where the usage came from: response_body, raw_responses, estimated_cost
    dollars: float  # Aperture's estimated cost of the whole request (input and output), 0 if absent


def read(document: Any) -> Event | None:
    """The event's metadata and billed input, or None when the document is not an object."""
    if not isinstance(document, dict):
        return None
    metadata = _object(document.get("metadata"))
    cost = _object(metadata.get("estimated_cost"))
    usage, source = None, ""
    for name, find in (
        ("response_body", lambda: _native(_object(document.get("response_body")))),
        ("raw_responses", lambda: _streamed(document.get("raw_responses"))),
        ("estimated_cost", lambda: _aperture(cost.get("usage"))),
    ):
        try:
            usage = find()
        except NotUsage:
            continue
        if usage is not None:
            source = name
            break
    dollars = cost.get("dollars")
    body = _object(document.get("response_body"))
    return Event(
        request_id=_text(metadata.get("request_id"))[:MAX_ID_CHARS],
        provider=_text(metadata.get("provider")),
        model=_text(metadata.get("model")) or _text(body.get("model")),
        user=_text(metadata.get("login_name")),
        usage=usage,
        source=source,
        dollars=float(dollars) if _is_number(dollars) and 0 <= dollars < 1e9 else 0.0,
    )


def _native(body: dict[str, Any]) -> Usage | None:
    if "usage" in body:
        return parse(body["usage"])
    if "usageMetadata" in body:
        return _gemini(body["usageMetadata"])
    return None


def _streamed(events: Any) -> Usage | None:
    if not isinstance(events, list):
        return None
    merged: dict[str, Any] = {}
    # A long stream is thousands of text deltas; usage sits at its start and its end.
    edges = events if len(events) <= 2 * EDGE_EVENTS else events[:EDGE_EVENTS] + events[-EDGE_EVENTS:]
    for event in edges:
        for usage in _usages_in(event):
            merged.update({k: v for k, v in usage.items() if v is not None})
    return parse(merged) if merged else None


def _usages_in(event: Any) -> Iterable[dict[str, Any]]:
    # Most of a stream is text deltas with none of these keys: skipped before any other work.
    if not isinstance(event, dict) or not any(key in event for key in USAGE_HOLDERS):
        return
    event = _object(event)
    # Some SSE parsers keep the event name beside its data: {"event": ..., "data": {...}}.
    if isinstance(event.get("data"), dict):
        event = event["data"]
    for holder in (event, _object(event.get("message")), _object(event.get("response"))):
        if isinstance(holder.get("usage"), dict):
            yield holder["usage"]
    if isinstance(event.get("usageMetadata"), dict):
        yield {"gemini": event["usageMetadata"]}


def parse(usage: Any) -> Usage | None:
    """A provider's usage object, Anthropic's or OpenAI's (see the module docstring)."""
    if not isinstance(usage, dict):
        return None
    if "gemini" in usage:
        return _gemini(usage["gemini"])
    if "prompt_tokens" in usage:
        return _inclusive(usage, "prompt_tokens", "prompt_tokens_details")
    if "input_tokens_details" in usage:
        return _inclusive(usage, "input_tokens", "input_tokens_details")
    if not any(key in usage for key in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")):
        return None
    split = _object(usage.get("cache_creation"))
    return _disjoint(
        _count(usage, "input_tokens"),
        _count(usage, "cache_read_input_tokens"),
        _count(usage, "cache_creation_input_tokens"),
        _count(split, "ephemeral_5m_input_tokens"),
        _count(split, "ephemeral_1h_input_tokens"),
    )


def _inclusive(usage: dict[str, Any], total_key: str, details_key: str) -> Usage:
    """OpenAI's convention: the cached tokens are part of the total."""
    if details_key in usage:
        cached = _count(_object(usage[details_key]), "cached_tokens")
    else:
        # DeepSeek's own name for the same count.
        cached = _count(usage, "prompt_cache_hit_tokens")
    return _cached_of(_count(usage, total_key), cached)


def _gemini(metadata: Any) -> Usage | None:
    metadata = _object(metadata)
    if "promptTokenCount" not in metadata:
        return None
    return _cached_of(_count(metadata, "promptTokenCount"), _count(metadata, "cachedContentTokenCount"))


def _aperture(usage: Any) -> Usage | None:
    if not isinstance(usage, dict) or not any(
        key in usage for key in ("input_tokens", "cached_tokens", "cache_creation_input_tokens")
    ):
        return None
    return _disjoint(
        _count(usage, "input_tokens"),
        _count(usage, "cached_tokens"),
        _count(usage, "cache_creation_input_tokens"),
        _count(usage, "cache_creation_5m_input_tokens"),
        _count(usage, "cache_creation_1h_input_tokens"),
    )


def _cached_of(total: int, cached: int) -> Usage:
    if cached > total:
        raise NotUsage(f"{cached} cached of {total} tokens")
    return Usage(input=total - cached, cache_read=cached)


def _disjoint(uncached: int, read: int, written: int, five: int, hour: int) -> Usage:
    """Anthropic's convention: input, reads and writes are separate counts."""
    # A total without its split (older API versions) is all five-minute writes.
    return Usage(
        input=uncached, cache_read=read, cache_write=five + max(0, written - five - hour), cache_write_long=hour
    )


def _count(holder: dict[str, Any], key: str) -> int:
    value = holder.get(key)
    if value is None:
        return 0
    if not _is_number(value) or value != int(value) or not 0 <= value <= MAX_TOKENS:
        raise NotUsage(f"{key} is not a token count")
    return int(value)


def _is_number(value: Any) -> bool:
    # bool is an int in Python, never in a JSON document meant as a number.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
