"""Every counter hookd keeps, in Prometheus form (prometheus-client does the exposition format).

The `headroom_*` names are the ones tsheadroom and headroom's own proxy export, so existing
dashboards keep working; `hookd_*` series are ours. Label values are bounded: outcomes and
providers come from small fixed sets, model names are capped (see `ModelLabels`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

from hookd.summary import Record

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STATE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
BYTES_BUCKETS = tuple(float(2**p) for p in range(10, 27, 2))  # 1 KiB .. 64 MiB
KNOWN_PROVIDERS = frozenset(
    {
        "anthropic",
        "openai",
        "google",
        "gemini",
        "bedrock",
        "vertex",
        "azure",
        "deepseek",
        "mistral",
        "xai",
        "groq",
        "openrouter",
    }
)
MAX_MODEL_LABELS = 64
MAX_LABEL_CHARS = 80
# Outcomes that mean "we meant to compress and could not": tsheadroom's failed counter.
FAILED_OUTCOMES = frozenset({"allow(error)", "allow(invalid-output)", "allow(overload)", "modify(history)"})
# prometheus-client formats ~20 us a sample, and the per-user usage series run to thousands:
# a page rendered in one go held the event loop, and every hook call behind it, for 30 ms and
# more. It is rendered this many samples at a time, the loop free between pieces (~2 ms).
SAMPLES_PER_PIECE = 100

# A `_created` twin of every counter and histogram series doubles the page (and the time to
# render it); nothing reads them, and they would break the page's pieces (see `pieces`).
disable_created_metrics()


class ModelLabels:
    """Model names come from clients, so their number is unbounded: the first 64 seen get their
    own label value and every later one is counted as "other"."""

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self.limit = limit
        self.known: set[str] = set()

    def label(self, model: str) -> str:
        model = model[:MAX_LABEL_CHARS] or "unknown"
        if model in self.known:
            return model
        if len(self.known) < self.limit:
            self.known.add(model)
            return model
        return "other"


def provider_label(provider: str) -> str:
    provider = provider.lower()
    if not provider:
        return "unknown"
    return provider if provider in KNOWN_PROVIDERS else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The front end's own memory and start time: every counter here counts since then.
        ProcessCollector(registry=r)
        self.models = ModelLabels()
        self.requests = Counter("headroom_requests", "Hook calls that reached the compressor", registry=r)
        self.requests_failed = Counter(
            "headroom_requests_failed", "Hook calls whose compression failed (answered allow)", registry=r
        )
        self.tokens_input = Counter("headroom_tokens_input", "Tokens in messages before compression", registry=r)
        self.tokens_saved = Counter("headroom_tokens_saved", "Tokens removed by answers of modify", registry=r)
        self.by_provider = Counter(
            "headroom_requests_by_provider", "Hook calls by upstream provider", ["provider"], registry=r
        )
        self.by_model = Counter("headroom_requests_by_model", "Hook calls by model", ["model"], registry=r)
        self.inbound = Counter("headroom_inbound_requests", "HTTP requests received on the hook", registry=r)
        self.inbound_completed = Counter(
            "headroom_inbound_requests_completed", "HTTP requests on the hook that were answered", registry=r
        )
        self.inbound_active = Gauge("headroom_inbound_requests_active", "Hook requests in progress", registry=r)
        self.outcomes = Counter("hookd_outcomes", "Answers by outcome", ["outcome"], registry=r)
        self.duration = Histogram(
            "hookd_request_duration_seconds", "Hook request time, read to write", buckets=LATENCY_BUCKETS, registry=r
        )
        self.worker_time = Histogram(
            "hookd_worker_duration_seconds", "Time inside compress() in the worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "hookd_queue_wait_seconds", "Wait for a worker", buckets=LATENCY_BUCKETS, registry=r
        )
        self.wire_bytes = Histogram(
            "hookd_request_wire_bytes", "Request body size as received", buckets=BYTES_BUCKETS, registry=r
        )
        self.body_bytes = Histogram(
            "hookd_request_body_bytes", "Request body size after decoding", buckets=BYTES_BUCKETS, registry=r
        )
        self.wire_total = Counter("hookd_wire_bytes", "Request bytes received on the wire", registry=r)
        self.decoded_total = Counter("hookd_decoded_bytes", "Request bytes after decoding", registry=r)
        self.tokens_after = Counter("hookd_tokens_output", "Tokens in messages after compression", registry=r)
        self.pool_size = Gauge("hookd_pool_size", "Configured worker processes", registry=r)
        self.pool_live = Gauge("hookd_pool_live", "Worker processes warm and serving", registry=r)
        self.pool_busy = Gauge("hookd_pool_busy", "Worker processes with a request in flight", registry=r)
        self.worker_restarts = Counter(
            "hookd_worker_restarts", "Worker processes that exited and were respawned", registry=r
        )
        self.events_process_restarts = Counter(
            "hookd_events_process_restarts",
            "Times the events process (--events-listen) exited and was started again",
            registry=r,
        )
        self.notes_dropped = Counter(
            "hookd_events_notes_dropped",
            "Answered requests whose facts the events process did not get (it was down or behind); "
            "their events count as unmatched",
            registry=r,
        )
        self.worker_recycles = Counter(
            "hookd_worker_recycles", "Workers replaced because their memory passed --worker-max-rss", registry=r
        )
        self.affinity_hits = Counter("hookd_affinity_hits", "Requests served by their session's worker", registry=r)
        self.affinity_spills = Counter(
            "hookd_affinity_spills", "Requests sent to another worker because theirs was busy or down", registry=r
        )
        self.cold_starts = Counter(
            "hookd_cold_starts", "Requests served by a worker that had not seen their session", registry=r
        )
        self.overloads = Counter("hookd_overloads", "Requests answered allow because no worker came free", registry=r)
        self.sticky_bytes = Gauge(
            "hookd_sticky_bytes", "Memory held for what conversations were sent (sticky mode)", registry=r
        )
        self.sticky_conversations = Gauge(
            "hookd_sticky_conversations", "Conversations remembered in sticky mode", registry=r
        )
        self.rewrites = Counter(
            "hookd_history_rewrites", "Turns that replaced already-sent history, by reason", ["reason"], registry=r
        )
        self.rewrite_messages = Counter(
            "hookd_history_rewrite_messages", "Messages of history replaced, by reason", ["reason"], registry=r
        )
        self.rewrite_tokens = Counter(
            "hookd_history_rewrite_tokens",
            "Tokens taken out of already-sent history by rewrites (estimated from bytes), by reason",
            ["reason"],
            registry=r,
        )
        self.markers_removed = Counter(
            "hookd_retrieval_markers_removed", "Retrieval markers kept out of answers", registry=r
        )
        # Shared conversation state (--state-url): Redis's health as the requests saw it.
        self.state_duration = Histogram(
            "hookd_state_call_seconds", "Redis calls, by operation", ["op"], buckets=STATE_BUCKETS, registry=r
        )
        self.state_errors = Counter(
            "hookd_state_errors",
            "Redis calls that failed (the turn went on without them), by reason",
            ["reason"],
            registry=r,
        )
        self.state_skipped = Counter(
            "hookd_state_skipped", "Redis calls not made: breaker open or the request's allowance spent", registry=r
        )
        self.state_available = Gauge(
            "hookd_state_available",
            "1 while the shared state (--state-url) answers; 0 without one or while its breaker is open",
            registry=r,
        )
        self.state_lookups = Counter(
            "hookd_state_lookups",
            "Conversation lookups by where the record came from (local, shared, none, unavailable)",
            ["source"],
            registry=r,
        )
        self.state_conflicts = Counter(
            "hookd_state_conflicts", "Turns not recorded: another replica recorded the conversation first", registry=r
        )
        self.state_fetched_bytes = Counter(
            "hookd_state_fetched_bytes", "Sealed record bytes fetched from Redis", registry=r
        )

    def observe(self, rec: Record) -> None:
        """Count one finished hook request."""
        self.outcomes.labels(rec.outcome).inc()
        self.duration.observe(rec.dur_ms / 1000)
        if rec.wire_bytes:
            self.wire_bytes.observe(rec.wire_bytes)
            self.wire_total.inc(rec.wire_bytes)
        if rec.in_bytes:
            self.body_bytes.observe(rec.in_bytes)
            self.decoded_total.inc(rec.in_bytes)
        if rec.in_msgs:
            self.requests.inc()
            self.by_provider.labels(provider_label(rec.provider)).inc()
            self.by_model.labels(self.models.label(rec.model)).inc()
        if rec.outcome in FAILED_OUTCOMES:
            self.requests_failed.inc()
        if rec.slot >= 0:
            self.worker_time.observe(rec.worker_ms / 1000)
        if rec.tokens_in > 0:
            self.tokens_input.inc(rec.tokens_in)
            self.tokens_after.inc(rec.tokens_out)
        if rec.outcome.startswith("modify"):
            self.tokens_saved.inc(rec.tokens_in - rec.tokens_out)
        if rec.rewrite != "-" and rec.outcome.startswith("modify"):
            self.rewrites.labels(rec.rewrite).inc()
            self.rewrite_messages.labels(rec.rewrite).inc(rec.rewrite_msgs)
            self.rewrite_tokens.labels(rec.rewrite).inc(rec.rewrite_tokens)

    def render(self) -> bytes:
        return b"".join(pieces(self.registry))

    async def render_yielding(self) -> bytes:
        return await render_yielding(self.registry)


async def render_yielding(registry: CollectorRegistry) -> bytes:
    """The page, rendered a piece at a time with the event loop free between pieces, so a
    scrape cannot hold up the hook calls that arrive while it is being written."""
    parts = []
    for part in pieces(registry):
        parts.append(part)
        await asyncio.sleep(0)
    return b"".join(parts)


def pieces(registry: CollectorRegistry) -> Iterator[bytes]:
    """The exposition format in pieces of at most `SAMPLES_PER_PIECE` samples. A family split
    over pieces keeps its `# HELP` and `# TYPE` lines in the first only: the format allows them
    once per family, its samples following them together."""
    for family in registry.collect():
        for start in range(0, max(len(family.samples), 1), SAMPLES_PER_PIECE):
            piece = Metric(family.name, family.documentation, family.type, family.unit)
            piece.samples = family.samples[start : start + SAMPLES_PER_PIECE]
            text = generate_latest(_Family(piece))
            yield text if start == 0 else text.split(b"\n", 2)[2]


class _Family:
    """One family in the shape `generate_latest` reads from a registry."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> list[Metric]:
        return [self.family]
