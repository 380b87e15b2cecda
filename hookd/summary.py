"""What one request did, and the `-v` line that prints it.

The first fields and their order are tsheadroom's, so operators' greps carry over; ours follow,
before ` -> outcome`. Sizes, timings and outcomes only: no content, no ids, no model names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Record:
    coding: str = "identity"
    in_msgs: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    wire_bytes: int = 0
    dur_ms: float = 0.0
    read_ms: float = 0.0
    write_ms: float = 0.0
    worker_ms: float = 0.0
    slot: int = -1
    cold: bool = False
    model_limit: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    placement: str = "-"
    wait_ms: float = 0.0
    frozen: int = 0
    # The history policy: "batch" or "cold" when this turn replaced history, with how many
    # messages and (estimated) tokens it took out.
    rewrite: str = "-"
    rewrite_msgs: int = 0
    rewrite_tokens: int = 0
    response_coding: str = "identity"
    outcome: str = "allow(noop)"
    provider: str = ""
    model: str = ""


def line(rec: Record) -> str:
    slot = str(rec.slot) if rec.slot >= 0 else "-"
    return (
        f"request({rec.coding}) in_msgs={rec.in_msgs} in_bytes={rec.in_bytes} out_bytes={rec.out_bytes} "
        f"wire_bytes={rec.wire_bytes} dur_ms={rec.dur_ms:.0f} read_ms={rec.read_ms:.0f} "
        f"write_ms={rec.write_ms:.0f} worker_ms={rec.worker_ms:.0f} slot={slot} "
        f"cold={'true' if rec.cold else 'false'} model_limit={rec.model_limit} "
        f"tokens_in={rec.tokens_in} tokens_out={rec.tokens_out} affinity={rec.placement} "
        f"wait_ms={rec.wait_ms:.0f} frozen={rec.frozen} rewrite={rec.rewrite} rewrite_msgs={rec.rewrite_msgs} "
        f"rewrite_tokens={rec.rewrite_tokens} resp={rec.response_coding} -> {rec.outcome}"
    )
