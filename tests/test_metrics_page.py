"""`/metrics` rendered in pieces: the same page Prometheus would read, without holding the loop."""

from __future__ import annotations

import asyncio

from prometheus_client import Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hookd.metrics import SAMPLES_PER_PIECE, Metrics, pieces

USERS = 2 * SAMPLES_PER_PIECE + 50


def busy_metrics() -> Metrics:
    """hookd's metrics plus a family long enough to be split over three pieces."""
    metrics = Metrics()
    billed = Counter("test_billed_tokens", "per user", ["user"], registry=metrics.registry)
    for user in range(USERS):
        billed.labels(f"user{user}@example.com").inc(user)
    metrics.outcomes.labels("modify").inc()
    return metrics


def hookd_lines(page: bytes) -> list[bytes]:
    """The page without the process's own gauges, which move between two renders."""
    return [line for line in page.splitlines() if b"process_" not in line]


def test_the_page_in_pieces_is_the_page_in_one_go() -> None:
    metrics = busy_metrics()
    page = metrics.render()
    assert hookd_lines(page) == hookd_lines(generate_latest(metrics.registry))
    families = {family.name: family for family in text_string_to_metric_families(page.decode())}
    assert len(families["test_billed_tokens"].samples) == USERS
    assert page.count(b"# TYPE test_billed_tokens_total counter") == 1
    assert b"_created" not in page


async def test_a_scrape_lets_other_work_run_between_its_pieces() -> None:
    metrics = busy_metrics()
    count = len(list(pieces(metrics.registry)))
    assert count > 3
    ticks = 0

    async def other_requests() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    await asyncio.sleep(0)
    before = ticks
    page = await metrics.render_yielding()
    ticker.cancel()
    assert hookd_lines(page) == hookd_lines(metrics.render())
    assert ticks - before >= count - 1
