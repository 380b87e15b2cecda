"""Quality without an LLM: did the agent still see what it went on to use?

For every assistant message of a recorded session, the *evidence* is the spans it took from earlier
tool output:

- from its tool calls: an edit's `old_string` (whole), and the paths, patterns, URLs and queries it
  passes (whole), plus the path-like words and identifiers inside a shell command (a whole command
  line rarely appears in any output);
- from its text: `backticked` spans, identifiers of 4+ characters and numbers of 3+ digits;

kept only when the span appears verbatim in an earlier tool result and nowhere in the user or
system text or in earlier assistant messages (so it can only have come from tool output). Claude
Code prefixes every line of a file read with its number and a tab or arrow; that prefix is taken
out before matching, on both sides.

A policy is scored by the share of evidence (by length) still visible in what it sent for the
request just before the message, i.e. in the prompt the model answered. What matters is whether the
information was there, so headroom's lossless folds count as visible: a path listing folded under
its directories, grep hits under their file, repeated lines collapsed into a count are unfolded
with headroom's own exact inverses before matching. An edit whose `old_string`
is gone predicts a failed edit or a re-read; a span that was visible only in tool output a policy
cleared predicts a re-read of that tool call, which `bench.cache` charges in the bill.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from headroom.transforms import lossless_compaction

from hookd.history import strings

LINE_NUMBER = re.compile(r"^ *\d+(?:→|\t)", re.MULTILINE)
BACKTICKED = re.compile(r"`([^`\n]{3,200})`")
IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z_][A-Za-z0-9_]{3,}(?![A-Za-z0-9_])")
NUMBER = re.compile(r"(?<![0-9.])[0-9]{3,}(?![0-9])")
PATH_WORD = re.compile(r"[A-Za-z0-9_.~/-]*/[A-Za-z0-9_.~/-]+")
# Tool-call arguments that name something the agent saw: taken whole.
WHOLE_INPUTS = ("old_string", "file_path", "path", "notebook_path", "pattern", "glob", "url", "query")
COMMAND_INPUTS = ("command", "cmd")
AGE_BUCKETS = ((0, 1, "0-1"), (2, 5, "2-5"), (6, 20, "6-20"), (21, 10**9, "21+"))
UNFOLDS = (
    lossless_compaction.path_unheading,
    lossless_compaction.search_unheading,
    lossless_compaction.search_dir_unheading,
    lossless_compaction.expand_runs,
)


@dataclass(frozen=True)
class Span:
    text: str
    request: int  # the request whose prompt the message answered
    kind: str  # "old_string", "input" or "text"
    tool: str  # the tool whose (latest) output held the span
    age: int  # requests between that output's first appearance and this request
    source: str  # tool_use_id / tool_call_id of that output


@dataclass
class Score:
    """Evidence of one policy: visible length over all length, by kind, tool and age."""

    total: int = 0
    visible: int = 0
    old_strings: int = 0
    old_strings_visible: int = 0
    by_tool: dict[str, list[int]] = field(default_factory=dict)
    by_age: dict[str, list[int]] = field(default_factory=dict)

    def add(self, span: Span, seen: bool) -> None:
        length = len(span.text)
        self.total += length
        self.visible += length * seen
        if span.kind == "old_string":
            self.old_strings += 1
            self.old_strings_visible += seen
        for table, key in ((self.by_tool, span.tool), (self.by_age, age_bucket(span.age))):
            pair = table.setdefault(key, [0, 0])
            pair[0] += length * seen
            pair[1] += length

    @property
    def share(self) -> float:
        return self.visible / self.total if self.total else 1.0

    @property
    def old_string_share(self) -> float:
        return self.old_strings_visible / self.old_strings if self.old_strings else 1.0

    def merge(self, other: Score) -> None:
        self.total += other.total
        self.visible += other.visible
        self.old_strings += other.old_strings
        self.old_strings_visible += other.old_strings_visible
        for mine, theirs in ((self.by_tool, other.by_tool), (self.by_age, other.by_age)):
            for key, (seen, length) in theirs.items():
                pair = mine.setdefault(key, [0, 0])
                pair[0] += seen
                pair[1] += length

    def as_json(self) -> dict[str, Any]:
        return {
            "share": self.share,
            "total": self.total,
            "old_strings": self.old_strings,
            "old_strings_visible": self.old_strings_visible,
            "by_tool": self.by_tool,
            "by_age": self.by_age,
        }


def age_bucket(age: int) -> str:
    return next(label for low, high, label in AGE_BUCKETS if low <= age <= high)


def unnumbered(text: str) -> str:
    return LINE_NUMBER.sub("", text)


def visible_text(messages: list[Any], unfolded: dict[str, str] | None = None) -> str:
    """All the text a request shows the model, line numbers of file reads taken out, with every
    lossless fold undone (`unfolded` caches that work across the requests of a session)."""
    cache = {} if unfolded is None else unfolded
    parts = []
    for text in strings(messages):
        if text not in cache:
            cache[text] = "\0".join({text, *(unfold(text) for unfold in UNFOLDS)})
        parts.append(cache[text])
    return unnumbered("\0".join(parts))


@dataclass
class Output:
    """One tool result of the session, as recorded."""

    source: str
    tool: str
    request: int  # the first request that carried it
    text: str


def tool_calls(message: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(id, tool name, arguments) of every tool call in an assistant message, both shapes."""
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("input"), dict):
            yield str(block.get("id")), str(block.get("name")), block["input"]
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {} if isinstance(call, dict) else {}
        try:
            arguments = orjson.loads(function.get("arguments") or "{}")
        except orjson.JSONDecodeError:
            arguments = {}
        yield str(call.get("id")), str(function.get("name")), arguments if isinstance(arguments, dict) else {}


def tool_outputs(message: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(id, content) of every tool result in a message, both shapes."""
    if message.get("role") == "tool":
        yield str(message.get("tool_call_id")), message.get("content")
        return
    content = message.get("content")
    for block in content if isinstance(content, list) else []:
        if isinstance(block, dict) and block.get("type") == "tool_result":
            yield str(block.get("tool_use_id")), block.get("content")


def own_text(message: dict[str, Any]) -> str:
    """What a message says that is not tool output (a tool call's arguments included)."""
    if message.get("role") == "tool":
        return ""
    content = message.get("content")
    if isinstance(content, list):
        kept = [b for b in content if not (isinstance(b, dict) and b.get("type") == "tool_result")]
        return "\0".join(strings(kept)) + "\0" + "\0".join(strings(message.get("tool_calls") or []))
    return "\0".join(strings({k: v for k, v in message.items() if k != "role"}))


def candidates(message: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(span, kind) the message might have taken from tool output."""
    for _, _, arguments in tool_calls(message):
        for key in WHOLE_INPUTS:
            if isinstance(arguments.get(key), str):
                yield arguments[key], "old_string" if key == "old_string" else "input"
        for edit in arguments.get("edits") or []:
            if isinstance(edit, dict) and isinstance(edit.get("old_string"), str):
                yield edit["old_string"], "old_string"
        for key in COMMAND_INPUTS:
            if isinstance(arguments.get(key), str):
                yield from ((word, "input") for word in PATH_WORD.findall(arguments[key]))
                yield from ((word, "input") for word in IDENTIFIER.findall(arguments[key]))
    content = message.get("content")
    texts = [content] if isinstance(content, str) else []
    if isinstance(content, list):
        texts += [b["text"] for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)]
    for text in texts:
        for pattern in (BACKTICKED, IDENTIFIER, NUMBER):
            yield from ((match, "text") for match in pattern.findall(text))


def evidence(session: dict[str, Any]) -> list[Span]:
    """The session's evidence spans, each tied to the request its message answered."""
    messages = session["messages"]
    turn_ends = session["turn_ends"]
    system = "\0".join(strings(session["request_template"].get("system")))
    names: dict[str, str] = {}
    outputs: list[Output] = []
    said = [system]  # user, system and assistant text so far
    spans: list[Span] = []
    seen_until = 0
    for request, end in enumerate(turn_ends[:-1]):
        for message in messages[seen_until:end]:
            for call_id, name, _ in tool_calls(message):
                names[call_id] = name
            for source, content in tool_outputs(message):
                text = unnumbered("\0".join(strings(content)))
                outputs.append(Output(source, names.get(source, "?"), request, text))
            said.append(own_text(message))
        seen_until = end
        reply = messages[end]
        spoken = "\0".join(said)
        spans += _spans_of(reply, request, outputs, spoken)
    return spans


def _spans_of(reply: dict[str, Any], request: int, outputs: list[Output], spoken: str) -> list[Span]:
    found: list[Span] = []
    unique: set[str] = set()
    for text, kind in candidates(reply):
        text = unnumbered(text) if kind == "old_string" else text
        if len(text) < 3 or text in unique or text in spoken:
            continue
        unique.add(text)
        latest = next((output for output in reversed(outputs) if text in output.text), None)
        if latest is not None:
            found.append(Span(text, request, kind, latest.tool, request - latest.request, latest.source))
    return found


def score(spans: list[Span], sent: list[list[Any]]) -> tuple[Score, list[Span]]:
    """How much evidence a policy kept visible; `sent[i]` is the messages it sent for request i.
    Also returns the spans it lost."""
    result = Score()
    lost: list[Span] = []
    texts: dict[int, str] = {}
    unfolded: dict[str, str] = {}
    for span in spans:
        if span.request not in texts:
            texts = {span.request: visible_text(sent[span.request], unfolded)}
        seen = span.text in texts[span.request]
        result.add(span, seen)
        if not seen:
            lost.append(span)
    return result, lost
