"""Start-up settings: one object built by `cli` and read everywhere else.

Limits that protect the process (body sizes, timeouts) live here too, so a reader finds every
number that bounds hookd in one place.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1024 * 1024

# Aperture accepts request bodies up to 50 MiB, so a hook must take them too; anything larger on
# the wire or after decoding is answered `allow(too-large)` without buffering the excess.
MAX_WIRE_BYTES = 50 * MIB
MAX_DECODED_BYTES = 50 * MIB


def default_pool_size() -> int:
    """One worker per usable CPU: compress() is CPU-bound and does not scale with threads."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    # Where Aperture's entire_request events are taken, by a process of their own (`hookd.counter`);
    # None: on the hook's own listener, at /events.
    events_listen: tuple[str, int] | None = None
    pool_size: int = 1
    max_compress: float = 60.0
    state_dir: Path = Path("hookd-state")
    verbose: bool = False
    affinity: bool = True
    accept_compressed: bool = True
    compress_response: bool = True
    # Longest wait for a session's own (busy) worker before spilling to a free one. A spill
    # recompresses the conversation cold: 0.8 s for a 1.1 MB one where a warm turn takes 66 ms
    # (bench/replay.py), so waiting out a few warm turns is cheaper. Each request waits at most
    # what its own cold recompress would cost (hook.affinity_wait).
    affinity_wait: float = 0.5
    # How long a request may wait for any worker before it is answered `allow(overload)`: well
    # under Aperture's default 5 s hook timeout, so the user never pays that timeout.
    queue_timeout: float = 2.0
    # Requests allowed to wait for a worker at once, per worker; past it, `allow(overload)` at
    # once. Each waiter holds its decoded body, so this bounds memory under a flood.
    queue_per_worker: int = 8
    # A client that has not sent its whole body by then gets `allow(read-error)`.
    read_timeout: float = 30.0
    max_wire_bytes: int = MAX_WIRE_BYTES
    max_decoded_bytes: int = MAX_DECODED_BYTES
    # Workers get this long to import headroom and compress their warm-up samples.
    warmup_timeout: float = 120.0
    # The memory of what each conversation was sent: bounded by total size and by idle time. Two
    # hours outlive the longest provider cache (Anthropic's 1 h breakpoints), so a conversation that
    # returns after its cache expired is known, and gets its cold turn.
    sticky_max_mb: int = 256
    sticky_ttl: float = 7200.0
    # A worker whose resident memory passes this is replaced between requests (0: never).
    # headroom's caches are bounded (64 MB result cache) but Python's heap rarely shrinks; with
    # the ML model a worker sits near 0.7 GB.
    worker_max_rss_mb: int = 1536
    # On SIGTERM, requests in flight get this long to finish; then they are answered `allow`.
    drain_timeout: float = 20.0
    # ML text compression (Kompress): auto (on when installed and the model is cached), on (a
    # worker without it fails to start), off.
    ml: str = "auto"
    # ONNX Runtime threads per worker; 0 shares the CPUs out among the workers.
    ml_threads: int = 0
    # Seconds of ML work one request may take; the text left then goes as it is. Aperture waits
    # 5 s for a hook by default, and this leaves room for the rest of the work.
    ml_budget: float = 2.0
    # The HuggingFace hub cache holding the model (None: huggingface_hub's own default).
    model_cache: Path | None = None
    # Tokens, read from files at start-up; kept out of repr so they never reach a log.
    hook_token: str | None = field(default=None, repr=False)
    admin_token: str | None = field(default=None, repr=False)
    # Usage metrics: distinct users counted by name before the rest go to "other", and the key
    # that hashes login names into labels (--hash-users); kept out of repr like the tokens.
    max_user_labels: int = 200
    user_hash_key: bytes | None = field(default=None, repr=False)
    # Serve a non-loopback address without a hook token (--allow-unauthenticated); checked again
    # for a socket systemd passes, whose address --listen does not decide.
    allow_unauthenticated: bool = False
    # Conversation records shared by every replica in Redis (None: this process's memory only).
    # The URL may carry a password, and the key seals every value: none of them in a repr.
    state_url: str | None = field(default=None, repr=False)
    state_password: str | None = field(default=None, repr=False)
    state_key: bytes | None = field(default=None, repr=False)
    # The longest one request waits on Redis, all its calls together: Redis saves the provider
    # cache, never the request, so it may not cost the request more than this.
    state_timeout: float = 0.05

    @property
    def onnx_threads(self) -> int:
        """Threads per worker such that pool size x threads does not oversubscribe the CPUs:
        ONNX Runtime otherwise starts one per core in every worker."""
        return self.ml_threads or max(1, default_pool_size() // self.pool_size)

    def worker_options(self) -> dict[str, Any]:
        """What a worker process is started with (see `worker.main.run`)."""
        return {
            "ml": {"mode": self.ml, "threads": self.onnx_threads, "budget": self.ml_budget},
            "model_cache": str(self.model_cache) if self.model_cache else None,
        }
