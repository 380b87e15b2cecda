"""The real `hookd` with real worker processes and real headroom, on conversations built from
real command output on this machine (the corpus replay lives in test_corpus.py)."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import orjson
import pytest
import zstandard

from hookd import validate
from hookd.affinity import session_key, slot_for
from tests import client, fixtures
from tests.disk import files_containing
from tests.hookd_process import Hookd

GIB = 1024**3


def assert_faithful(call: dict[str, Any], answer: dict[str, Any]) -> None:
    sent, got = call["request_body"], answer["request_body"]
    assert {k: v for k, v in got.items() if k != "messages"} == {k: v for k, v in sent.items() if k != "messages"}
    validate.check(sent["messages"], got["messages"])
    assert b"hash=" not in orjson.dumps(got["messages"])


async def post(server: Hookd, call: dict[str, Any] | bytes, **kwargs: Any) -> tuple[int, dict[str, str], Any]:
    """POST, then wait for this request's -v line so tests can read it as `server.stdout[-1]`."""
    seen = len(server.stdout)
    async with aiohttp.ClientSession() as session:
        answer = await client.post(session, server.url, call, **kwargs)
    if answer[0] != 415:
        await asyncio.to_thread(server.line, seen)
    return answer


def outcome_of_last(server: Hookd) -> str:
    return server.stdout[-1].rsplit("-> ", 1)[1].strip()


@pytest.mark.parametrize("provider", ["anthropic", "openai"])
async def test_real_tool_output_is_compressed(
    hookd: Hookd, provider: str, anthropic_messages: list[Any], openai_messages: list[Any]
) -> None:
    messages = anthropic_messages if provider == "anthropic" else openai_messages
    call = fixtures.hook_call(messages, provider, session_id=f"real-{provider}")
    status, _, answer = await post(hookd, call)
    assert status == 200
    assert answer["action"] == "modify", hookd.stdout[-1]
    assert_faithful(call, answer)
    assert len(orjson.dumps(answer["request_body"])) < len(orjson.dumps(call["request_body"]))


async def test_unknown_model_names_count_tokens_offline(hookd: Hookd, openai_messages: list[Any]) -> None:
    for model in ("deepseek-chat", "qwen-max", "llama-3-70b", "some-new-model", ""):
        call = fixtures.hook_call(openai_messages, "openai", session_id=f"model-{model}")
        call["metadata"]["model"] = call["request_body"]["model"] = model
        status, _, answer = await post(hookd, call)
        assert (status, answer["action"]) == (200, "modify"), hookd.stdout[-1]
        assert "tokens_in=0 " not in hookd.stdout[-1]


@pytest.mark.parametrize("coding", ["zstd", "br", "gzip"])
async def test_encoded_bodies_get_the_same_answer(hookd: Hookd, coding: str, anthropic_messages: list[Any]) -> None:
    call = fixtures.hook_call(anthropic_messages, session_id="codings")
    _, _, plain = await post(hookd, call)
    status, _, encoded = await post(hookd, call, coding=coding)
    assert status == 200
    assert encoded == plain
    assert hookd.stdout[-1].startswith(f"request({coding}) ")


async def test_unknown_coding_is_refused_with_415(hookd: Hookd) -> None:
    status, headers, _ = await post(hookd, b"{}", headers={"Content-Encoding": "compress"})
    assert status == 415
    assert headers["Accept-Encoding"] == "zstd, br, gzip"


async def test_corrupt_body_is_a_decode_error(hookd: Hookd) -> None:
    status, _, answer = await post(hookd, b"\x28\xb5\x2f\xfd garbage", headers={"Content-Encoding": "zstd"})
    assert (status, answer) == (200, {"action": "allow"})
    assert outcome_of_last(hookd) == "allow(decode-error)"


def _zeros_bomb(coding: str) -> bytes:
    """1 GiB of zeros in `coding`, built a MiB at a time so the test never holds the GiB."""
    chunk = bytes(1024 * 1024)
    if coding == "gzip":
        gz = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join(gz.compress(chunk) for _ in range(1024)) + gz.flush()
    if coding == "zstd":
        zs = zstandard.ZstdCompressor(level=3).compressobj()
        return b"".join(zs.compress(chunk) for _ in range(1024)) + zs.flush()
    br = brotli.Compressor(quality=1)
    return b"".join(br.process(chunk) for _ in range(1024)) + br.finish()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def bomb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookd]:
    with Hookd(state_dir=tmp_path_factory.mktemp("bombs"), pool_size=1) as server:
        yield server


@pytest.mark.slow
@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
async def test_gigabyte_bombs_are_too_large_in_bounded_memory(bomb_server: Hookd, coding: str) -> None:
    bomb = _zeros_bomb(coding)
    before = peak_rss_mb(bomb_server.proc.pid)
    status, _, answer = await post(bomb_server, bomb, headers={"Content-Encoding": coding})
    assert (status, answer) == (200, {"action": "allow"})
    assert outcome_of_last(bomb_server) == "allow(too-large)"
    assert peak_rss_mb(bomb_server.proc.pid) - before < 100


@pytest.mark.slow
async def test_sigkill_of_the_busy_worker_answers_allow_and_the_pool_recovers(tmp_path: Path) -> None:
    with Hookd(state_dir=tmp_path, pool_size=2) as server:
        session = "kill-me"
        call = fixtures.hook_call(fixtures.big_json_conversation("first"), session_id=session)
        slot = slot_for(session_key(session, call["request_body"]["messages"]), 2)
        victim = server.worker_pids()[slot]
        pending = asyncio.create_task(post(server, call))
        await asyncio.sleep(0.5)
        os.kill(victim, signal.SIGKILL)
        status, _, answer = await pending
        assert (status, answer) == (200, {"action": "allow"})
        assert outcome_of_last(server) == "allow(error)"
        server.wait_ready(60)
        after = server.worker_pids()
        assert len(after) == 2 and victim not in after
        again = fixtures.hook_call(fixtures.big_json_conversation("second"), session_id=session)
        status, _, answer = await post(server, again)
        assert (status, answer["action"]) == (200, "modify")


def _plant(call: dict[str, Any], secret: str) -> dict[str, Any]:
    call = copy.deepcopy(call)
    for message in call["request_body"]["messages"]:
        for block in message["content"] if isinstance(message.get("content"), list) else []:
            if block.get("type") == "tool_result":
                block["content"] = f"{secret}\n{block['content']}"
    return call


async def test_request_content_never_reaches_disk(tmp_path: Path, anthropic_messages: list[Any]) -> None:
    import time

    secret = f"PLANTED-{os.urandom(8).hex()}"
    started = time.time() - 1
    state = tmp_path / "state"
    with Hookd(state_dir=state, pool_size=2) as server:
        for i in range(4):
            call = _plant(fixtures.hook_call(anthropic_messages, session_id=f"privacy-{i}"), secret)
            status, _, answer = await post(server, call)
            assert (status, answer["action"]) == (200, "modify")
    roots = [state, Path.home(), Path("/tmp")]
    assert files_containing(roots, secret.encode(), since=started) == []
