"""A compressor that stands behind the same seam as the worker pool, for handler tests."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable
from typing import Any

from hookd.compressor import CompressorError, Job, Overloaded, Result

# The `start` fixture (conftest): starts the app with a fake behind the seam, returns its URL,
# the fake and a client session.
Start = Callable[..., Any]


def shorten(messages: list[Any]) -> list[Any]:
    """Messages with every long string cut to its first 20 characters, like a compressor would."""

    def cut(value: Any) -> Any:
        if isinstance(value, str) and len(value) > 100:
            return value[:20] + " [cut]"
        if isinstance(value, list):
            return [cut(v) for v in value]
        if isinstance(value, dict):
            return {k: cut(v) if k in ("content", "text") else v for k, v in value.items()}
        return value

    return [cut(copy.deepcopy(m)) for m in messages]


def _text_of(message: Any) -> str:
    return str(message)


class FakeCompressor:
    """`mode` picks the behaviour: shorten, same, error, overload, zero-tokens, drop-message,
    rename-tool-id, slow; and for the history policy, where new messages go as they came and only
    a job over the whole history (nothing frozen) shortens: aging (every message but the last
    two, as output that compresses once it is old) and stale (only messages that say STALE, as a
    file read a later edit made stale)."""

    def __init__(self, mode: str = "shorten") -> None:
        self.mode = mode
        self.jobs: list[Job] = []

    async def start(self) -> None:
        return None

    async def stop(self, grace: float) -> None:
        return None

    def ready(self) -> bool:
        return True

    async def wait_ready(self, timeout: float) -> bool:
        return True

    def worker_info(self) -> list[dict[str, Any]]:
        return [{"slot": 0, "state": "idle", "pid": 0}]

    async def compress_idle(self, job: Job) -> Result | None:
        return await self.compress(job)

    async def compress(self, job: Job) -> Result:
        self.jobs.append(job)
        if self.mode == "error":
            raise CompressorError("worker died")
        if self.mode == "overload":
            raise Overloaded("no worker free")
        if self.mode == "slow":
            await asyncio.sleep(0.5)
        # Like headroom, leave the frozen history alone and count only what follows it.
        live = job.messages[job.frozen :]
        messages = job.messages[: job.frozen] + shorten(live)
        if self.mode in ("aging", "stale"):
            messages = self._history_only(job)
        if self.mode == "same":
            messages = job.messages
        elif self.mode == "drop-message":
            messages = messages[:-1]
        elif self.mode == "rename-tool-id":
            messages = _rename_tool_ids(messages)
        before = sum(len(str(m)) for m in live)
        after = sum(len(str(m)) for m in messages[job.frozen :])
        if self.mode == "zero-tokens":
            before = after = 0
        return Result(messages=messages, tokens_before=before, tokens_after=after, model_limit=200000, slot=0)

    def _history_only(self, job: Job) -> list[Any]:
        if job.frozen or len(job.messages) <= 2:
            return list(job.messages)
        if self.mode == "aging":
            return shorten(job.messages[:-2]) + job.messages[-2:]
        return [shorten([m])[0] if "STALE" in _text_of(m) else m for m in job.messages]


def _rename_tool_ids(messages: list[Any]) -> list[Any]:
    for message in messages:
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if block.get("type") == "tool_use":
                block["id"] = block["id"] + "-renamed"
    return messages
