"""Cross-turn dedup of new tool output against the whole conversation, kept between turns.

A span of a new tool output that repeats an earlier output verbatim (a file printed again, a test
run's unchanged lines) becomes a pointer to the earlier message, `[↑12L same as msg 40: 'def
run(...']`. headroom does this with `enable_cross_turn_dedup`, over every block of the messages
it is given, each call: on a whole conversation that is tens of milliseconds per turn, and on the
window of recent messages a worker is given it misses every repeat of older output. So the worker
keeps, per conversation, headroom's dedup index (its verbatim lines and line anchors) from one
turn to the next, adds the messages it has not indexed yet, and folds only the new messages'
output against it, with headroom's own matching, pointer text and thresholds. The pointer names
the message by its number in the whole conversation.

The index is trusted only while the history it was built from is the history the job carries:
each indexed message's digest is checked against the job's copy where they overlap. A job that
does not line up (another worker served the last turns, history was rewritten) starts a new index
from the window it carries. Only ever-earlier text is pointed to, and nothing already sent is
changed, so what the provider cached stays as it was.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from headroom.config import DEFAULT_BYTE_EXACT_EXCLUDE_TOOLS, DEFAULT_VERBATIM_EXCLUDE_TOOLS, is_tool_excluded
from headroom.transforms import cross_turn_dedup as headroom_dedup

CACHE_CONTROL = "cache_control"
# Text held in indexes, per worker; least recently used conversations go first.
MAX_INDEX_CHARS = 64 * 1024 * 1024
# Outputs never folded (a file read: an edit copies its `old_string` from it, often across lines;
# a fetched page), though later output may point at them.
VERBATIM_TOOLS = DEFAULT_VERBATIM_EXCLUDE_TOOLS | DEFAULT_BYTE_EXACT_EXCLUDE_TOOLS


@dataclass
class Index:
    start: int  # the first message indexed
    digests: list[bytes] = field(default_factory=list)  # per message from `start`
    corpus: list[list[str | None]] = field(default_factory=list)  # per block: its verbatim lines
    block_message: list[int] = field(default_factory=list)  # per block: its message number
    anchors: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    chars: int = 0

    @property
    def upto(self) -> int:
        return self.start + len(self.digests)


@dataclass(frozen=True)
class Slot:
    """Where a tool output's text sits in a message."""

    block: int | None  # index in an Anthropic content list; None for a tool message's string
    sub: int | None  # index of the one text sub-block of a list-valued tool_result
    text: str
    verbatim: bool  # an output that must stay byte for byte (a file read): indexed, never folded


class Dedup:
    def __init__(self, max_chars: int = MAX_INDEX_CHARS) -> None:
        self.max_chars = max_chars
        self.indexes: OrderedDict[str, Index] = OrderedDict()
        self.chars = 0

    def fold(self, session: str, messages: list[Any], frozen: int, offset: int) -> dict[int, Any]:
        """New forms for the messages after the first `frozen` (the job's new ones) whose output
        repeats earlier output; keys are positions in `messages`, which start at message
        `offset` of the conversation."""
        if not session:
            return {}
        verbatim = _verbatim_ids(messages)
        index = self._index_for(session, messages[:frozen], offset, verbatim)
        changed: dict[int, Any] = {}
        for position in range(frozen, len(messages)):
            message = messages[position]
            folded = self._fold_message(index, message, offset + position, verbatim)
            if folded is not message:
                changed[position] = folded
            index.digests.append(_digest(folded))
        self._account(session, index)
        return changed

    def _index_for(self, session: str, context: list[Any], offset: int, verbatim: set[str]) -> Index:
        index = self.indexes.pop(session, None)
        if index is not None:
            self.chars -= index.chars
        if index is None or not _lines_up(index, context, offset):
            index = Index(start=offset)
        for position in range(index.upto - offset, len(context)):
            message = context[position]
            for slot in _slots(message, verbatim):
                _add(index, slot.text.split("\n"), offset + position)
            index.digests.append(_digest(message))
        return index

    def _fold_message(self, index: Index, message: Any, number: int, verbatim: set[str]) -> Any:
        out = message
        for slot in _slots(message, verbatim):
            lines = slot.text.split("\n")
            if slot.verbatim:
                _add(index, lines, number)
                continue
            kept, text = _fold_lines(index, lines)
            _add_verbatim(index, kept, number)
            if text != slot.text:
                out = _replace(out, slot, text)
        return out

    def _account(self, session: str, index: Index) -> None:
        self.indexes[session] = index
        self.chars += index.chars
        while self.chars > self.max_chars and len(self.indexes) > 1:
            _, oldest = self.indexes.popitem(last=False)
            self.chars -= oldest.chars


def _lines_up(index: Index, context: list[Any], offset: int) -> bool:
    """The index covers the messages before the job's context without a gap, and the messages
    both have are the same."""
    if not index.start <= offset <= index.upto:
        return False
    overlap = range(offset, min(index.upto, offset + len(context)))
    return all(index.digests[n - index.start] == _digest(context[n - offset]) for n in overlap)


def _fold_lines(index: Index, lines: list[str]) -> tuple[list[str | None], str]:
    """headroom's dedup loop for one block, against the kept index."""
    out: list[str] = []
    kept: list[str | None] = []
    position = 0
    while position < len(lines):
        match = headroom_dedup._longest_match(lines, position, index.anchors, index.corpus)
        if match is not None and match[0] >= headroom_dedup.DEFAULT_MIN_LINES:
            span = lines[position : position + match[0]]
            if len("\n".join(span)) >= headroom_dedup.DEFAULT_MIN_CHARS:
                out.append(headroom_dedup._pointer(span, index.block_message[match[1]], match[3]))
                kept.extend([None] * match[0])
                position += match[0]
                continue
        out.append(lines[position])
        kept.append(lines[position])
        position += 1
    return kept, "\n".join(out)


def _add(index: Index, lines: list[str], number: int) -> None:
    _add_verbatim(index, list(lines), number)


def _add_verbatim(index: Index, lines: list[str | None], number: int) -> None:
    headroom_dedup._index_lines(lines, len(index.corpus), index.anchors)
    index.corpus.append(lines)
    index.block_message.append(number)
    index.chars += sum(len(line) for line in lines if line is not None)


def _slots(message: Any, verbatim: set[str]) -> Iterator[Slot]:
    """The tool outputs of a message, as headroom's dedup pass finds them."""
    if not isinstance(message, dict):
        return
    content = message.get("content")
    if message.get("role") in ("tool", "function") and isinstance(content, str) and content:
        yield Slot(None, None, content, str(message.get("tool_call_id")) in verbatim)
        return
    for number, block in enumerate(content if isinstance(content, list) else []):
        if not isinstance(block, dict) or block.get("type") != "tool_result":
            continue
        keep = str(block.get("tool_use_id")) in verbatim or CACHE_CONTROL in block
        inner = block.get("content")
        if isinstance(inner, str) and inner:
            yield Slot(number, None, inner, keep)
        elif isinstance(inner, list):
            texts = [i for i, sub in enumerate(inner) if isinstance(sub, dict) and isinstance(sub.get("text"), str)]
            if len(texts) == 1 and inner[texts[0]]["text"]:
                yield Slot(number, texts[0], inner[texts[0]]["text"], keep)


def _replace(message: dict[str, Any], slot: Slot, text: str) -> dict[str, Any]:
    if slot.block is None:
        return {**message, "content": text}
    content = list(message["content"])
    block = dict(content[slot.block])
    if slot.sub is None:
        block["content"] = text
    else:
        inner = list(block["content"])
        inner[slot.sub] = {**inner[slot.sub], "text": text}
        block["content"] = inner
    content[slot.block] = block
    return {**message, "content": content}


def _verbatim_ids(messages: list[Any]) -> set[str]:
    """Calls whose output headroom never rewrites (file reads, fetched pages)."""
    found = set()
    for message in messages:
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        for block in content if isinstance(content, list) else []:
            if isinstance(block, dict) and block.get("type") == "tool_use" and _verbatim(block.get("name")):
                found.add(str(block.get("id")))
        for call in message.get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and _verbatim(function.get("name")):
                found.add(str(call.get("id")))
    return found


def _verbatim(name: Any) -> bool:
    return isinstance(name, str) and is_tool_excluded(name, VERBATIM_TOOLS)


def _digest(message: Any) -> bytes:
    encoded = orjson.dumps(message)
    if b'"cache_control"' in encoded:
        encoded = orjson.dumps(_unmarked(message))
    return hashlib.blake2b(encoded, digest_size=16).digest()


def _unmarked(value: Any) -> Any:
    """Breakpoints move every turn; they are not part of what was sent."""
    if isinstance(value, dict):
        return {k: _unmarked(v) for k, v in value.items() if k != CACHE_CONTROL}
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    return value
