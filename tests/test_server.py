"""The hook handler behind a fake compressor: every outcome, status and header a caller sees."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import zstandard

from tests import client
from tests.fakes import Start

ANTHROPIC_CALL: dict[str, Any] = {
    "metadata": {"provider": "anthropic", "model": "claude-sonnet-4-5", "session_id": "s1"},
    "request_body": {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "temperature": 0.25,
        "messages": [
            {"role": "user", "content": "list files"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "file\n" * 400}]},
        ],
    },
}


async def test_modify_replaces_only_messages(start: Start) -> None:
    url, fake, session = await start()
    status, _headers, answer = await client.post(session, url, ANTHROPIC_CALL)
    assert status == 200
    assert answer["action"] == "modify"
    sent = ANTHROPIC_CALL["request_body"]
    got = answer["request_body"]
    assert list(got) == list(sent)
    assert {k: v for k, v in got.items() if k != "messages"} == {k: v for k, v in sent.items() if k != "messages"}
    assert got["messages"][2]["content"][0]["content"].endswith("[cut]")
    assert fake.jobs[0].model == "claude-sonnet-4-5"


async def test_every_answer_advertises_accepted_codings(start: Start) -> None:
    url, _, session = await start()
    _, headers, _ = await client.post(session, url, {"request_body": {}})
    assert headers["Accept-Encoding"] == "zstd, br, gzip"


async def test_no_accept_compressed_turns_the_advertisement_off(start: Start) -> None:
    url, _, session = await start(accept_compressed=False)
    status, headers, answer = await client.post(session, url, ANTHROPIC_CALL, coding="zstd")
    assert "Accept-Encoding" not in headers
    assert (status, answer["action"]) == (200, "modify")


@pytest.mark.parametrize(
    ("mode", "action"),
    [("same", "allow"), ("error", "allow"), ("overload", "allow"), ("zero-tokens", "allow"), ("drop-message", "allow")],
)
async def test_failures_of_the_compressor_fail_open(start: Start, mode: str, action: str) -> None:
    url, _, session = await start(mode)
    status, _, answer = await client.post(session, url, ANTHROPIC_CALL)
    assert (status, answer) == (200, {"action": action})


async def test_renamed_tool_id_is_refused(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start("rename-tool-id", verbose=True)
    _, _, answer = await client.post(session, url, ANTHROPIC_CALL)
    assert answer == {"action": "allow"}
    assert capsys.readouterr().out.strip().endswith("-> allow(invalid-output)")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1, 2]",
        b'{"request_body": "text"}',
        b'{"request_body": {"contents": []}}',
        b'{"request_body": {"messages": {"role": "user"}}}',
        b'{"request_body": {"messages": [{"role": "user", "content": "x"}], "seed": 123456789012345678901234567890}}',
    ],
)
async def test_bodies_we_do_not_compress_pass_through(start: Start, body: bytes) -> None:
    url, fake, session = await start(verbose=True)
    status, _, answer = await client.post(session, url, body)
    assert (status, answer) == (200, {"action": "allow"})
    assert fake.jobs == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_get_405(start: Start, method: str) -> None:
    url, _, session = await start()
    async with session.request(method, url) as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"


@pytest.mark.parametrize("coding", ["compress", "deflate", "snappy"])
async def test_unknown_coding_gets_415_with_what_we_accept(start: Start, coding: str) -> None:
    url, fake, session = await start(accept_compressed=False)
    async with session.post(url, data=b"{}", headers={"Content-Encoding": coding}) as response:
        assert response.status == 415
        assert response.headers["Accept-Encoding"] == "zstd, br, gzip"
    assert fake.jobs == []


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
async def test_compressed_bodies_get_the_same_answer(start: Start, coding: str) -> None:
    url, _, session = await start()
    _, _, plain = await client.post(session, url, ANTHROPIC_CALL)
    status, _, encoded = await client.post(session, url, ANTHROPIC_CALL, coding=coding)
    assert status == 200
    assert encoded == plain


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
async def test_corrupt_body_is_a_decode_error(start: Start, coding: str, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True)
    good = client.encode_body(orjson.dumps(ANTHROPIC_CALL), coding)
    async with session.post(url, data=good[: len(good) // 2], headers={"Content-Encoding": coding}) as response:
        assert response.status == 200
        assert await response.json() == {"action": "allow"}
    assert capsys.readouterr().out.strip().endswith("-> allow(decode-error)")


async def test_body_over_the_wire_limit_is_too_large(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, fake, session = await start(verbose=True, max_wire_bytes=64 * 1024)
    status, _, answer = await client.post(session, url, b"x" * (200 * 1024))
    assert (status, answer) == (200, {"action": "allow"})
    assert capsys.readouterr().out.strip().endswith("-> allow(too-large)")
    assert fake.jobs == []


async def test_chunked_body_over_the_limit_is_too_large(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True, max_wire_bytes=64 * 1024)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"y" * 4096

    async with session.post(url, data=chunks()) as response:
        assert response.status == 200
        assert await response.json() == {"action": "allow"}
    assert capsys.readouterr().out.strip().endswith("-> allow(too-large)")


async def test_decoded_body_over_the_limit_is_too_large(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True, max_decoded_bytes=1024 * 1024)
    bomb = zstandard.ZstdCompressor().compress(b"{" + b" " * (4 * 1024 * 1024))
    status, _, answer = await client.post(session, url, bomb, headers={"Content-Encoding": "zstd"})
    assert (status, answer) == (200, {"action": "allow"})
    assert capsys.readouterr().out.strip().endswith("-> allow(too-large)")


@pytest.mark.parametrize(
    ("accept", "coding"), [("gzip", "gzip"), ("zstd", "zstd"), ("br", "br"), ("gzip, zstd", "zstd")]
)
async def test_answer_is_encoded_as_the_caller_allows(start: Start, accept: str, coding: str) -> None:
    url, _, _ = await start()
    call = orjson.loads(orjson.dumps(ANTHROPIC_CALL))
    call["request_body"]["system"][0]["text"] = "Answer in the style of the project. " * 100
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(url, data=orjson.dumps(call), headers={"Accept-Encoding": accept}) as response,
    ):
        assert response.headers["Content-Encoding"] == coding
        body = await response.read()
    decoded = {"gzip": gzip.decompress, "zstd": _unzstd, "br": _unbrotli}[coding](body)
    assert orjson.loads(decoded)["action"] == "modify"


async def test_no_compress_response_answers_identity(start: Start) -> None:
    url, _, _ = await start(compress_response=False)
    async with (
        aiohttp.ClientSession(auto_decompress=False) as raw,
        raw.post(url, data=orjson.dumps(ANTHROPIC_CALL), headers={"Accept-Encoding": "gzip"}) as response,
    ):
        assert "Content-Encoding" not in response.headers
        assert orjson.loads(await response.read())["action"] == "modify"


def _unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _unbrotli(data: bytes) -> bytes:
    import brotli

    return bytes(brotli.decompress(data))


async def test_verbose_line_has_tsheadroom_fields_in_order(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True)
    await client.post(session, url, ANTHROPIC_CALL, coding="zstd")
    line = capsys.readouterr().out.strip()
    fields = [part.split("=")[0] for part in line.split(" -> ")[0].split()[1:]]
    assert line.startswith("request(zstd) ")
    assert fields[:11] == [
        "in_msgs", "in_bytes", "out_bytes", "wire_bytes", "dur_ms", "read_ms",
        "write_ms", "worker_ms", "slot", "cold", "model_limit",
    ]  # fmt: skip
    assert line.endswith("-> modify")


async def test_verbose_line_carries_no_content(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True)
    secret = "SECRET-PAYLOAD-1234"
    call = orjson.loads(orjson.dumps(ANTHROPIC_CALL))
    call["request_body"]["messages"][0]["content"] = secret
    await client.post(session, url, call)
    captured = capsys.readouterr()
    assert secret not in captured.out and secret not in captured.err


async def test_empty_messages_is_a_noop(start: Start) -> None:
    url, fake, session = await start()
    _, _, answer = await client.post(session, url, {"request_body": {"messages": []}})
    assert answer == {"action": "allow"}
    assert fake.jobs == []


async def test_health_and_metrics(start: Start) -> None:
    url, _, session = await start()
    await client.post(session, url, ANTHROPIC_CALL)
    async with session.get(url + "healthz") as response:
        assert response.status == 200
    async with session.get(url + "readyz") as response:
        assert response.status == 200
    async with session.get(url + "metrics") as response:
        text = await response.text()
    assert 'hookd_outcomes_total{outcome="modify"} 1.0' in text
    assert "headroom_requests_total 1.0" in text
    assert 'headroom_requests_by_provider_total{provider="anthropic"} 1.0' in text


async def test_body_too_deep_to_write_back_passes_through(start: Start, capsys: pytest.CaptureFixture[str]) -> None:
    url, _, session = await start(verbose=True)
    raw = orjson.dumps(ANTHROPIC_CALL)[:-2] + b',"tool_schema":' + _json_nested(300) + b"}}"
    status, _, answer = await client.post(session, url, raw)
    assert (status, answer) == (200, {"action": "allow"})
    assert capsys.readouterr().out.strip().endswith("-> allow(passthrough)")


def _json_nested(depth: int) -> bytes:
    return b'{"items":' * depth + b'"leaf"' + b"}" * depth
