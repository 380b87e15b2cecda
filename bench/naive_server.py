"""The afternoon alternative: a minimal aiohttp server that runs headroom's compress() in threads.

    python -m bench.naive_server --port PORT

`POST /v1/compress` takes `{"messages": [...], "model": "..."}` (the body headroom's own proxy
takes) and answers `{"messages", "tokens_before", "tokens_after"}`; `GET /healthz` answers once the
port is open. It is deliberately what a user would write: headroom's defaults (retrieval markers
included), stdlib JSON, no warm-up, a thread pool as wide as the CPU count. The only addition is the
offline environment every contender gets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from worker import offline


def compress(body: dict[str, Any]) -> dict[str, Any]:
    import headroom

    result = headroom.compress(body["messages"], model=body["model"])
    return {"messages": result.messages, "tokens_before": result.tokens_before, "tokens_after": result.tokens_after}


async def handle_compress(request: web.Request) -> web.Response:
    # aiohttp decodes gzip bodies itself and answers 400 to zstd without `backports.zstd`.
    raw = await request.read()
    loop = asyncio.get_running_loop()
    payload = await loop.run_in_executor(request.app["pool"], compress, json.loads(raw))
    return web.json_response(payload)


async def handle_health(_: web.Request) -> web.Response:
    return web.Response(text="ok")


def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["pool"] = ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
    app.router.add_post("/v1/compress", handle_compress)
    app.router.add_get("/healthz", handle_health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    offline.prepare()
    web.run_app(build_app(), host="127.0.0.1", port=args.port, print=None)


if __name__ == "__main__":
    main()
