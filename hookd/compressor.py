"""The one seam between the front end and the workers.

The server hands a `Job` to a `Compressor` and gets a `Result` or an exception back. The real
implementation is `pool.WorkerPool`; tests put a fake behind the same interface so every branch
of the handler runs without spawning a process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Job:
    messages: list[Any]
    model: str
    key: bytes
    knobs: dict[str, Any] = field(default_factory=dict)
    # How long this job may wait for its session's busy worker before spilling (live setting).
    affinity_wait: float = 0.5
    # The first `frozen` messages were sent upstream before exactly as given: keep them as they are.
    frozen: int = 0
    # The pipeline for whole histories in modes auto and clear (cross-turn dedup, superseded reads).
    strong: bool = False
    # Where `messages` start in the conversation (dedup pointers name messages by that number).
    offset: int = 0
    # Fold the new messages' output against what the worker has seen of this conversation.
    dedup: bool = False
    # Count the tokens of every changed message, before and after (Result.counts).
    count: bool = False


@dataclass
class Result:
    """What a worker made of a job. `messages` is the full list, unchanged entries shared."""

    messages: list[Any]
    tokens_before: int = 0
    tokens_after: int = 0
    model_limit: int = 0
    worker_ms: float = 0.0
    wait_ms: float = 0.0
    slot: int = -1
    cold: bool = False
    # "hit": the session's own worker; "spill": another one; "any": affinity is off.
    placement: str = "any"
    markers_removed: int = 0
    rss_mb: float = 0.0
    # index -> (tokens before, tokens after) of each changed message, when the job asked.
    counts: dict[int, tuple[int, int]] = field(default_factory=dict)


class CompressorError(Exception):
    """The call failed; the request is answered `allow(error)`."""


class Overloaded(CompressorError):
    """No worker came free in time; the request is answered `allow(overload)`."""


class Compressor(Protocol):
    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None: ...

    def ready(self) -> bool: ...

    async def wait_ready(self, timeout: float) -> bool: ...

    def worker_info(self) -> list[dict[str, Any]]: ...

    async def compress(self, job: Job) -> Result: ...

    async def compress_idle(self, job: Job) -> Result | None:
        """Run `job` only on a worker that is idle now, with nothing waiting: background work
        that must never delay a request. None when there is no such worker."""
        ...
