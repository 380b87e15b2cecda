"""`hookd savings URL`: the week's table an operator pastes into a report, read from a running
hookd's /metrics, as text and as JSON, since start or since a saved snapshot."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from hookd import cli
from hookd import savings as savings_command
from hookd.prices import Usage
from tests import aperture_events
from tests.hookd_process import free_port
from tests.usage_app import Served, Servers, value

ANN, BOB = "ann@example.com", "bob@example.com"
OPUS, GPT = "claude-opus-4-6", "gpt-4o"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    servers = Servers(tmp_path)
    yield servers.start
    await servers.close()


async def savings(*args: str) -> tuple[int, str, str]:
    """`hookd savings ...` as the command line runs it (in a thread: the server runs on this loop)."""
    out, err = io.StringIO(), io.StringIO()

    def run() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli.main(["savings", *args])

    status = await asyncio.to_thread(run)
    return status, out.getvalue(), err.getvalue()


async def traffic(served: Served, anthropic: list[Any], tag: str) -> None:
    """Ann: one Opus request hookd answered; Bob: a GPT request it did not see."""
    await served.call(f"{tag}-ann", anthropic, model=OPUS, user=ANN)
    bill = Usage(input=1_000, cache_read=20_000, cache_write=2_000)
    assert await served.event(aperture_events.event("anthropic", f"{tag}-ann", bill, model=OPUS, user=ANN)) == 200
    bob = aperture_events.event("openai-stream", f"{tag}-bob", Usage(input=500, cache_read=4_096), "openai", GPT, BOB)
    assert await served.event(bob) == 200


async def test_the_table_per_user_and_model_agrees_with_the_counters(
    serve: Callable[..., Any], anthropic_messages: Any
) -> None:
    served = await serve()
    await traffic(served, anthropic_messages, "w1")
    status, out, _ = await savings(served.url, "--json")
    assert status == 0
    report = json.loads(out)
    rows = {(r["user"], r["model"]): r for r in report["observed"]}
    samples = await served.metrics()
    ann = rows[(ANN, OPUS)]
    who = {"provider": "anthropic", "model": OPUS, "user": ANN}
    assert ann["requests"] == 1
    assert ann["billed"] == pytest.approx(1_000 + 0.1 * 20_000 + 1.25 * 2_000)
    assert ann["without"] == value(samples, "hookd_estimated_input_weighted_tokens_total", **who)
    assert ann["saved"] == pytest.approx(ann["without"] - ann["billed"]) and ann["saved"] > 0
    assert ann["cache_hit"] == pytest.approx(20_000 / 23_000)
    assert ann["cache_hit_without"] < ann["cache_hit"]  # the removed tokens would have been written
    bob = rows[(BOB, GPT)]
    assert (bob["requests"], bob["saved"], bob["cache_hit"]) == (1, 0, pytest.approx(4_096 / 4_596))
    assert report["observed_total"]["requests"] == 2
    assert report["observed_total"]["saved"] == pytest.approx(ann["saved"])
    assert "since hookd started" in report["window"]


async def test_the_text_table_is_one_to_paste(serve: Callable[..., Any], anthropic_messages: Any) -> None:
    served = await serve()
    await traffic(served, anthropic_messages, "w1")
    status, out, _ = await savings(served.url.rstrip("/") + "/metrics")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("hookd savings, since hookd started")
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| user | model | requests |")
    assert [line.split(" | ")[:3] for line in table[1:]] == [
        ["| ann@example.com", OPUS, "1"],
        ["| bob@example.com", GPT, "1"],
        ["| all", "all", "2"],
    ]


async def test_a_saved_snapshot_gives_the_difference_since(
    serve: Callable[..., Any], anthropic_messages: Any, tmp_path: Path
) -> None:
    served = await serve()
    await traffic(served, anthropic_messages, "week1")
    snapshot = tmp_path / "monday.json"
    assert (await savings(served.url, "--save", str(snapshot)))[0] == 0
    await traffic(served, anthropic_messages, "week2")
    await traffic(served, anthropic_messages, "week2b")
    status, out, _ = await savings(served.url, "--since", str(snapshot), "--json")
    assert status == 0
    report = json.loads(out)
    assert report["observed_total"]["requests"] == 4
    assert report["window"].startswith("from the snapshot of")

    # A snapshot from before a restart: its counts are gone, and the report says so.
    stale = json.loads(snapshot.read_text())
    stale["started"] -= 3600
    snapshot.write_text(json.dumps(stale))
    report = json.loads((await savings(served.url, "--since", str(snapshot), "--json"))[1])
    assert report["observed_total"]["requests"] == 6
    assert "restarted after the snapshot" in report["window"]


def test_counts_run_from_the_events_process_start_when_it_restarted_since_hookd() -> None:
    # With --events-listen the usage counters live in the events process, which may restart alone.
    page = (
        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1000.0\n"
        "# TYPE hookd_usage_counting_since_seconds gauge\nhookd_usage_counting_since_seconds 5000.0\n"
    )
    assert savings_command.read(page)[1] == 5000.0


async def test_requests_without_an_event_are_reported_from_the_cache_model(
    serve: Callable[..., Any], anthropic_messages: Any
) -> None:
    served = await serve()
    await served.call("quiet", anthropic_messages, model=OPUS, user=ANN)
    served.hook.ledger.ttl = 0
    served.hook.ledger.expire()
    report = json.loads((await savings(served.url, "--json"))[1])
    assert report["observed"] == []
    (row,) = report["modelled"]
    assert (row["user"], row["model"], row["requests"]) == (ANN, OPUS, 1)
    assert row["saved"] > 0


async def test_an_unreachable_hookd_is_an_error_saying_where() -> None:
    status, _, err = await savings("http://127.0.0.1:9/")
    assert status == 2 and "http://127.0.0.1:9/metrics" in err


async def test_a_page_without_usage_series_is_an_error_not_a_report_of_nothing() -> None:
    # What /metrics shows when the events process (--events-listen) did not answer in time.
    async def page(request: web.Request) -> web.Response:
        return web.Response(text="process_start_time_seconds 1000.0\n")

    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        status, out, err = await savings(f"http://127.0.0.1:{port}/")
    finally:
        await runner.cleanup()
    assert (status, out) == (2, "")
    assert "no usage series" in err


async def test_odd_label_values_and_a_broken_snapshot(serve: Callable[..., Any], tmp_path: Path) -> None:
    served = await serve()
    odd = aperture_events.event("openai", "odd", Usage(input=10), "openai", 'gpt|"odd",model', "a|b@example.com")
    assert await served.event(odd) == 200
    report = json.loads((await savings(served.url, "--json"))[1])
    assert [(r["user"], r["model"]) for r in report["observed"]] == [("a|b@example.com", 'gpt|"odd",model')]
    broken = tmp_path / "broken.json"
    broken.write_text('{"taken": 1, "samples": [[1, 2]]}')
    status, _, err = await savings(served.url, "--since", str(broken))
    assert status == 2 and "cannot read the snapshot" in err
