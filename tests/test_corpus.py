"""Every request of every recorded session, replayed through the real `hookd`.

Skipped, saying why, when ../shared/corpus is not beside the clone.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import pytest

from hookd import validate
from tests import client
from tests.corpus import REPO
from tests.disk import files_containing
from tests.hookd_process import Hookd

pytestmark = pytest.mark.corpus
FIELD = re.compile(r"(\w+)=(\S+)")


def fields(line: str) -> dict[str, str]:
    head, _, outcome = line.rpartition(" -> ")
    return {**dict(FIELD.findall(head)), "outcome": outcome.strip()}


SECRET = f"PLANTED-{os.urandom(8).hex()}"


class Replay(NamedTuple):
    answers: list[tuple[str, Any, Any]]
    lines: list[str]
    started: float


def planted(call: dict[str, Any]) -> dict[str, Any]:
    """The call with SECRET in its newest message, where tool output arrives."""
    messages = list(call["request_body"]["messages"])
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = f"{content}\n{SECRET}"
    elif isinstance(content, list):
        # After any tool results, which must come first.
        last["content"] = [*content, {"type": "text", "text": SECRET}]
    messages[-1] = last
    return {**call, "request_body": {**call["request_body"], "messages": messages}}


async def replay(
    server: Hookd, sessions: list[dict[str, Any]], coding: str | None = None
) -> list[tuple[str, Any, Any]]:
    """Each session turn by turn, a secret planted in every request; two sessions at a time."""
    from tests import corpus

    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for session in sessions:
        queue.put_nowait(session)
    answers: list[tuple[str, Any, Any]] = []

    async def agent(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            session = queue.get_nowait()
            for call in map(planted, corpus.hook_calls(session)):
                status, _, answer = await client.post(http, server.url, call, coding=coding)
                assert status == 200
                answers.append((session["name"], call, answer))

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(agent(http), agent(http))
    return answers


@pytest.fixture(scope="module")
def replayed(hookd: Hookd, corpus_sessions: list[dict[str, Any]]) -> Replay:
    started = time.time() - 1
    seen = len(hookd.stdout)
    answers = asyncio.run(replay(hookd, corpus_sessions))
    hookd.line(seen + len(answers) - 1)
    return Replay(answers, hookd.stdout[seen:], started)


def test_every_request_is_answered_allow_or_modify(replayed: Replay, corpus_sessions: list[Any]) -> None:
    answers = replayed.answers
    assert len(answers) == sum(len(s["turn_ends"]) for s in corpus_sessions)
    assert {answer["action"] for _, _, answer in answers} <= {"allow", "modify"}


def test_every_modify_keeps_other_fields_and_tool_pairing(replayed: Replay) -> None:
    answers = replayed.answers
    modified = [(call, answer) for _, call, answer in answers if answer["action"] == "modify"]
    assert len(modified) > len(answers) / 3
    for call, answer in modified:
        sent, got = call["request_body"], answer["request_body"]
        assert {k: v for k, v in got.items() if k != "messages"} == {k: v for k, v in sent.items() if k != "messages"}
        validate.check(sent["messages"], got["messages"])


def test_no_answer_carries_a_retrieval_instruction(replayed: Replay) -> None:
    answers = replayed.answers
    for _, _, answer in answers:
        text = orjson.dumps(answer)
        assert b"Retrieve more: hash=" not in text
        assert b"Retrieve original: hash=" not in text


def test_every_model_counts_tokens_offline(replayed: Replay) -> None:
    lines = replayed.lines
    outcomes = Counter(fields(line)["outcome"] for line in lines)
    assert set(outcomes) <= {"modify", "allow(noop)"}, outcomes
    assert all(int(fields(line)["tokens_in"]) > 0 for line in lines)


def test_sessions_with_bulky_tool_output_save_tokens(replayed: Replay) -> None:
    answers, lines = replayed.answers, replayed.lines
    sent: Counter[str] = Counter()
    forwarded: Counter[str] = Counter()
    for name, call, answer in answers:
        messages = call["request_body"]["messages"]
        sent[name] += len(orjson.dumps(messages))
        if answer["action"] == "modify":
            messages = answer["request_body"]["messages"]
        forwarded[name] += len(orjson.dumps(messages))
    bulky = [name for name in sent if name.startswith("local-")]
    assert bulky
    for name in bulky:
        assert forwarded[name] < 0.97 * sent[name], (name, forwarded[name], sent[name])
    tokens_in = sum(int(fields(line)["tokens_in"]) for line in lines)
    tokens_out = sum(int(fields(line)["tokens_out"]) for line in lines)
    assert tokens_out < 0.98 * tokens_in


def test_no_content_reached_disk_during_the_replay(replayed: Replay, hookd: Hookd) -> None:
    assert all(SECRET.encode() in orjson.dumps(call) for _, call, _ in replayed.answers)
    roots = [hookd.state_dir, Path.home(), Path("/tmp")]
    assert files_containing(roots, SECRET.encode(), since=replayed.started) == []


def test_metrics_agree_with_the_replay(replayed: Replay, hookd: Hookd) -> None:
    with urllib.request.urlopen(hookd.url + "metrics", timeout=10) as response:
        text = response.read().decode()
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}
    outcomes = Counter(fields(line)["outcome"] for line in replayed.lines)
    saved = sum(
        int(fields(line)["tokens_in"]) - int(fields(line)["tokens_out"])
        for line in replayed.lines
        if fields(line)["outcome"].startswith("modify")
    )
    assert values["headroom_requests_total"] == len(replayed.answers)
    for outcome, count in outcomes.items():
        assert values[f'hookd_outcomes_total{{outcome="{outcome}"}}'] == count
    assert values["headroom_tokens_saved_total"] == saved > 0
    tool = shutil.which("promtool") or shutil.which("promtool", path=str(REPO / ".venv" / "bin"))
    if tool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/test installs it)")
    checked = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
def test_encoded_requests_get_the_same_answers(
    hookd: Hookd, corpus_sessions: list[dict[str, Any]], coding: str
) -> None:
    from tests import corpus

    async def both() -> None:
        async with aiohttp.ClientSession() as http:
            for session in corpus_sessions:
                calls = corpus.hook_calls(session)
                for call in (calls[0], calls[len(calls) // 2], calls[-1]):
                    _, _, plain = await client.post(http, hookd.url, call)
                    status, _, encoded = await client.post(http, hookd.url, call, coding=coding)
                    assert (status, encoded) == (200, plain), session["name"]

    asyncio.run(both())
