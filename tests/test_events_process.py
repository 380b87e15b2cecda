"""Events on their own listener (--events-listen): a process of their own, at a lower CPU priority
than the hook's, fed by the front end with what the hook did, its series on the hook's /metrics.

The integration tests run the real `hookd` with a real headroom worker; the channel between the
two processes is also tested in this process, frame by frame.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from hookd import counter, counter_link
from hookd.config import Store
from hookd.counter_link import CounterLink
from hookd.ledger import Facts, as_wire, from_wire
from hookd.metrics import Metrics
from hookd.prices import Usage
from hookd.runner import make_runner
from hookd.settings import Settings
from tests import aperture_events, fixtures
from tests.hookd_process import Hookd, free_port
from worker import frames

TOKEN = "events-process-token"
BILL = Usage(input=1_200, cache_read=30_000, cache_write=2_500)
# OpenAI bills no cache writes.
BILLS = {"anthropic": BILL, "openai": Usage(input=1_700, cache_read=30_080)}
FACTS = Facts("anthropic", "claude-sonnet-4-5", "dev@example.com", 5_000, 3_000, 0, 2_000, 0, Usage(input=10))
USER = "dev@example.com"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Hookd, str]]:
    folder = tmp_path_factory.mktemp("events-process")
    (folder / "token").write_text(TOKEN)
    events_url = f"http://127.0.0.1:{free_port()}/events"
    flags = ("--events-listen", events_url.split("//")[1].split("/")[0], "--token-file", str(folder / "token"))
    with Hookd(*flags, state_dir=folder / "state", pool_size=1) as server:
        yield server, events_url


def post(url: str, document: Any, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=orjson.dumps(document), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def hook_call(server: Hookd, request_id: str, provider: str = "anthropic") -> None:
    messages = fixtures.anthropic_session() if provider == "anthropic" else fixtures.openai_session()
    call = fixtures.hook_call(messages[:4], provider, session_id=f"session-{request_id}")
    call["metadata"].update(request_id=request_id, login_name=USER)
    status, answer = post(server.url, call)
    assert status == 200 and answer["action"] in ("allow", "modify")


def samples(server: Hookd) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.url + "metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def events_pid(server: Hookd, not_this: int | None = None) -> int:
    """The events process's pid, once one other than `not_this` is running."""
    found: list[int] = []

    def running() -> bool:
        pid = server.get("/readyz")[1]["events_process"]["pid"]
        found[:] = [pid] if pid and pid != not_this else []
        return bool(found)

    wait_for(running)
    return found[0]


def wait_for(predicate: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("shape", aperture_events.SHAPES)
def test_each_event_right_after_its_answer_is_matched_and_counted_to_the_token(
    served: tuple[Hookd, str], shape: str
) -> None:
    server, events_url = served
    provider = "openai" if shape.startswith("openai") else "anthropic"
    before = samples(server)
    # Each event is sent the moment its hook call is answered, as Aperture does: the front
    # end's note of the request must already be in the events process.
    for number in range(5):
        request_id = f"{shape}-{number}"
        hook_call(server, request_id, provider)
        assert post(events_url, aperture_events.event(shape, request_id, BILLS[provider], provider, user=USER)) == (
            200,
            {"action": "allow"},
        )
    after = samples(server)
    counted = total(after, "hookd_usage_events_total", outcome="matched") - total(
        before, "hookd_usage_events_total", outcome="matched"
    )
    assert counted == 5
    billed = {
        kind: total(after, "hookd_billed_input_tokens_total", kind=kind, provider=provider)
        - total(before, "hookd_billed_input_tokens_total", kind=kind, provider=provider)
        for kind in ("input", "cache_read", "cache_write_5m")
    }
    bill = BILLS[provider]
    assert billed == {
        "input": 5 * bill.input,
        "cache_read": 5 * bill.cache_read,
        "cache_write_5m": 5 * bill.cache_write,
    }


def test_readyz_names_the_events_process_which_runs_niced(served: tuple[Hookd, str]) -> None:
    server, events_url = served
    process = psutil.Process(events_pid(server))
    assert server.get("/readyz")[1]["events_process"]["url"] == events_url
    assert process.ppid() == server.proc.pid
    assert process.nice() == min(19, psutil.Process(server.proc.pid).nice() + counter.NICE)


def test_the_events_listener_wants_the_hook_token(served: tuple[Hookd, str]) -> None:
    _, events_url = served
    status, answer = post(events_url, aperture_events.event("anthropic", "no-token", BILL), token=None)
    assert status == 401 and "token" in answer["error"]


def test_an_event_sent_to_the_hook_listener_is_answered_and_the_operator_told(served: tuple[Hookd, str]) -> None:
    server, _ = served
    for _ in range(2):
        assert post(server.url + "events", aperture_events.event("anthropic", "astray", BILL)) == (
            200,
            {"action": "allow"},
        )
    server.wait_log("point Aperture's events hook at --events-listen")
    assert sum("point Aperture's events hook" in line for line in server.stderr) == 1


def test_a_killed_events_process_is_started_again_and_hooks_go_on(served: tuple[Hookd, str]) -> None:
    server, events_url = served
    old = events_pid(server)
    os.kill(old, signal.SIGKILL)
    for number in range(5):
        hook_call(server, f"while-down-{number}")  # the hook never waits for the events process
    events_pid(server, not_this=old)
    assert total(samples(server), "hookd_events_process_restarts_total") == 1
    hook_call(server, "after-restart")
    before = total(samples(server), "hookd_usage_events_total", outcome="matched")
    post(events_url, aperture_events.event("anthropic", "after-restart", BILL, user=USER))
    assert total(samples(server), "hookd_usage_events_total", outcome="matched") == before + 1
    assert not [line for line in server.stdout if "allow(error)" in line]


def test_a_hung_events_process_is_replaced_and_costs_scrapes_only_a_wait(served: tuple[Hookd, str]) -> None:
    server, _ = served
    old = events_pid(server)
    os.kill(old, signal.SIGSTOP)
    hook_call(server, "while-hung")
    for _ in range(counter_link.HUNG_AFTER_PAGES):
        # Each scrape waits for the process's series, then shows the front end's own.
        assert total(samples(server), "hookd_worker_restarts_total") == 0
    events_pid(server, not_this=old)
    server.wait_log("taking it for hung")
    assert not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE


def test_the_events_process_goes_when_hookd_does(tmp_path: Path) -> None:
    server = Hookd("--events-listen", f"127.0.0.1:{free_port()}", state_dir=tmp_path, pool_size=1)
    with server:
        process = psutil.Process(events_pid(server))
    assert server.proc.returncode == 0
    process.wait(timeout=10)
    assert not process.is_running()
    assert "Traceback" not in "".join(server.stderr)


def test_hookd_cannot_start_on_an_events_port_it_cannot_have(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = Hookd("--events-listen", f"127.0.0.1:{port}", state_dir=tmp_path, pool_size=1)
        assert server.proc.wait(timeout=60) == 2
        server.stop()
    assert "cannot listen for events" in "".join(server.stderr)


# --- the channel, frame by frame -----------------------------------------------------------------


def test_facts_cross_the_channel_unchanged() -> None:
    assert from_wire(orjson.loads(orjson.dumps(as_wire(FACTS)))) == FACTS


async def test_notes_prices_and_pages_over_the_channel() -> None:
    ours, theirs = socket.socketpair()
    events_process = counter.Counter(Settings())
    channel = counter.Channel(theirs, events_process)
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    writer.write(frames.encode({"prices": {"anthropic": {"read": 0.2}}}))
    writer.write(frames.encode({"note": ["req-1", as_wire(FACTS)]}))
    writer.write(frames.encode({"note": ["req-2", {"nonsense": 1}]}))  # dropped, the rest go on
    writer.write(frames.encode({"page": 7}))
    reply = await asyncio.wait_for(frames.read(reader), 10)
    assert reply["page"] == 7 and "hookd_usage_pending_requests 1.0" in reply["text"]
    assert list(events_process.ledger.entries) == ["req-1"]
    assert events_process.table["anthropic"].read == 0.2
    writer.close()
    await asyncio.wait_for(channel.closed, 10)
    theirs.close()


async def test_a_note_with_no_events_process_is_dropped_and_counted(tmp_path: Path) -> None:
    metrics = Metrics()
    with socket.socket() as listening:
        link = CounterLink(Settings(), listening, Store(tmp_path, 0.5), metrics)
        link.note("req-1", FACTS)
        assert await link.page() == b""
    assert metrics.registry.get_sample_value("hookd_events_notes_dropped_total") == 1


async def test_an_event_readable_with_its_note_finds_it() -> None:
    """The note and its event readable in the same turn of the loop, as when the events process
    has fallen behind: the note is read first, every time."""
    ours, theirs = socket.socketpair()
    events_process = counter.Counter(Settings())
    channel = counter.Channel(theirs, events_process)
    app = web.Application()
    events_process.events.routes(app)
    runner = await make_runner(app)
    listening = socket.create_server(("127.0.0.1", 0))
    await web.SockSite(runner, listening).start()
    reader, writer = await asyncio.open_connection(*listening.getsockname()[:2])
    try:
        for number in range(20):
            request_id = f"together-{number}"
            ours.sendall(frames.encode({"note": [request_id, as_wire(FACTS)]}))
            body = orjson.dumps(aperture_events.event("anthropic", request_id, BILL))
            writer.write(f"POST /events HTTP/1.1\r\nHost: hookd\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
        registry = events_process.registry
        await until(lambda: registry.get_sample_value("hookd_usage_events_total", {"outcome": "matched"}) == 20)
        assert registry.get_sample_value("hookd_usage_events_total", {"outcome": "unmatched"}) == 0
    finally:
        writer.close()
        await runner.cleanup()
        ours.close()
        await asyncio.wait_for(channel.closed, 10)
        theirs.close()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
