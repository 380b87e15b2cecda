"""A hook client for tests and benchmarks: encodes bodies the way a real sender would."""

from __future__ import annotations

import gzip
from typing import Any

import aiohttp
import brotli
import orjson
import zstandard


def encode_body(raw: bytes, coding: str | None) -> bytes:
    if coding == "gzip":
        return gzip.compress(raw, compresslevel=6)
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(raw)
    if coding == "br":
        return brotli.compress(raw, quality=5)
    return raw


async def post(
    session: aiohttp.ClientSession,
    url: str,
    call: dict[str, Any] | bytes,
    coding: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """POST a hook call; returns status, headers and the decoded JSON answer."""
    raw = call if isinstance(call, bytes) else orjson.dumps(call)
    sent_headers = {"Content-Type": "application/json", **(headers or {})}
    if coding:
        sent_headers["Content-Encoding"] = coding
    async with session.post(url, data=encode_body(raw, coding), headers=sent_headers) as response:
        body = await response.read()
        return response.status, dict(response.headers), orjson.loads(body) if body else None
