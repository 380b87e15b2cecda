"""Which worker a conversation belongs to.

headroom caches compression results per process, so the turns of one conversation should keep
landing on the same worker. The key must be stable across hookd restarts and between processes,
so it is a BLAKE2 digest, never Python's salted `hash()`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

# Clients move Anthropic cache breakpoints every turn (Claude Code marks the last two messages),
# so the same first messages arrive with and without `cache_control`; it must not change the key.
VOLATILE_KEYS = frozenset({"cache_control"})


def session_key(session_id: str, messages: list[Any]) -> bytes:
    """Aperture's session id when it sent one, else the conversation's first two messages."""
    if session_id:
        material = b"session\0" + session_id.encode()
    else:
        material = b"messages\0" + orjson.dumps(_normalise(messages[:2]), option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(material, digest_size=16).digest()


def _normalise(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def slot_for(key: bytes, pool_size: int) -> int:
    return int.from_bytes(key[:8], "big") % pool_size
