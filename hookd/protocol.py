"""The Aperture hook contract: HookCallData in, `allow` / `modify` answers out.

We never answer `block`: a compression hook that fails must cost the user nothing, and under a
`fail_closed` policy anything but a well-formed `allow` would turn our failure into their 503.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

ALLOW = b'{"action":"allow"}'
# orjson reads an integer outside [-2**63, 2**64) as a float, which would write a different
# number back into a `modify`. Such a float is at least 2**63 in size; one that came from a
# float literal that large is refused too (rare, and refusing costs only the savings).
WIDE = float(2**63)
# orjson reads nesting up to 1024 levels but writes only about 255, and the answer wraps the body
# in two more; real requests (tool schemas included) stay far below this.
MAX_DEPTH = 200


class Passthrough(Exception):
    """The body is not something we compress; it goes upstream untouched."""


@dataclass(frozen=True)
class HookCall:
    body: dict[str, Any]
    messages: list[Any]
    model: str
    provider: str
    session_id: str
    # Aperture's id for this request (matches its later `entire_request` event) and the user's
    # login; either may be empty.
    request_id: str = ""
    user: str = ""


def parse(decoded: bytes | bytearray) -> HookCall:
    """Read the parts of HookCallData we act on, or raise Passthrough saying why not."""
    try:
        call = orjson.loads(decoded)
    except orjson.JSONDecodeError as exc:
        # orjson also refuses NaN, integers past 64 bits and nesting past 1024 levels: values we
        # could not write back unchanged, so such a body must go through as it came.
        raise Passthrough(f"not JSON orjson can round-trip: {exc}") from None
    if not isinstance(call, dict):
        raise Passthrough("HookCallData is not an object")
    depth, wide = _shape(call)
    if depth > MAX_DEPTH:
        raise Passthrough(f"nested {depth} levels deep; orjson writes back at most {MAX_DEPTH}")
    if wide:
        raise Passthrough("an integer wider than 64 bits would not survive a rewrite")
    body = call.get("request_body")
    if not isinstance(body, dict):
        raise Passthrough("no request_body object")
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise Passthrough("request_body has no messages array")
    metadata = call.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    return HookCall(
        body=body,
        messages=messages,
        model=_text(metadata.get("model")) or _text(body.get("model")),
        provider=_text(metadata.get("provider")),
        session_id=_text(metadata.get("session_id")),
        request_id=_text(metadata.get("request_id")),
        user=_text(metadata.get("login_name")),
    )


def _shape(value: Any) -> tuple[int, bool]:
    """How deep the document nests, and whether it holds a number too wide to write back."""
    deepest = 0
    # Iterative: the structure may be nested as deep as orjson reads (1024 levels).
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is dict or kind is list:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if kind is dict else item))
        elif kind is float and not -WIDE < item < WIDE:
            return deepest, True
    return deepest, False


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def modify(body: dict[str, Any], messages: list[Any]) -> bytes:
    """The whole body again (the contract replaces, it does not patch) with only messages new."""
    try:
        return orjson.dumps({"action": "modify", "request_body": {**body, "messages": messages}})
    except orjson.JSONEncodeError as exc:
        # orjson reads nesting up to 1024 levels but writes only about 255; such a body goes
        # through as it came.
        raise Passthrough(f"body cannot be written back: {exc}") from None
