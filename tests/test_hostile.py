"""Hostile input: whatever a caller sends, the hook answers within its contract and keeps serving.

Property-based (hypothesis) over HookCallData shapes: random metadata, request bodies with and
without messages, Anthropic and OpenAI conversations with tool_use/tool_result pairs (some left
dangling), unicode, integers past 64 bits, floats and nested objects in every extra field. Plus a
fuzz over raw bytes with random Content-Encoding headers: random bytes, valid bodies in one to
three stacked codings, the same truncated or with a byte flipped, unknown codings.

The contract, checked on every answer:
  * 200 with exactly `{"action":"allow"}` or a `modify`; 405 for a method other than POST; 415
    with Accept-Encoding for a coding we do not decode; 401 only when a hook token is set;
  * a `modify` changes nothing but `request_body.messages`, compared as parsed JSON (Python's
    parser, arbitrary-precision integers, last duplicate key wins), and keeps every message's
    role and tool-call ids (`hookd.validate.check`);
  * the server keeps serving: /healthz 200 afterwards.

Most examples run in-process against the aiohttp app with `tests.fakes.FakeCompressor` (any of its
failure modes, drawn per example), served from a thread so hypothesis can drive it synchronously;
a smaller number go to the real server with a real headroom worker. The server keeps its state
between examples (sticky mode remembers conversations), as a real one would: a repeated example
takes the remembered-conversation path, so hypothesis may call a failure "flaky" - it is still one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import http.client
import io
import json
import logging
import threading
import time
import traceback
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hookd import server, validate
from hookd.config import Store
from hookd.metrics import Metrics
from hookd.settings import Settings
from tests import client, report
from tests.fakes import FakeCompressor
from tests.hookd_process import Hookd, free_port

MIB = 1024 * 1024
FAKES = Path(__file__).with_name("fakes.py")
KNOWN_CODINGS = {"", "identity", "gzip", "x-gzip", "zstd", "br"}
# Paths the admin endpoints own; the hook answers on every other one.
ADMIN_PATHS = ("/healthz", "/readyz", "/metrics", "/config")
# "shorten" three times over: it is the mode that answers modify, whose body the property checks.
FAKE_MODES = (
    "shorten",
    "shorten",
    "shorten",
    "same",
    "error",
    "overload",
    "zero-tokens",
    "drop-message",
    "rename-tool-id",
)
# Modes in which the fake itself never raises, whatever the messages look like.
WELL_BEHAVED_MODES = ("shorten", "shorten", "same", "error", "overload", "zero-tokens")
HOOK_TOKEN = "hook-secret"


# -- the app, served from a thread ---------------------------------------------------------


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FailureLog(logging.Handler):
    """Exceptions that reached the hook's last line of defence ("unexpected failure")."""

    def __init__(self, thread: int | None) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = thread  # the served app's thread: other apps log to the same logger
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and record.getMessage().startswith("unexpected failure"):
            self.records.append(record)

    def ours(self) -> list[str]:
        """Those raised in hookd's own code, not inside the fake compressor."""
        found = []
        for record in self.records:
            assert record.exc_info is not None
            _, exc, tb = record.exc_info
            frames = traceback.extract_tb(tb)
            if not any(Path(frame.filename) == FAKES for frame in frames):
                found.append(f"{type(exc).__name__}: {exc} at {frames[-1].filename}:{frames[-1].lineno}")
        return found


class Served:
    """The hook app with a FakeCompressor, on its own event loop in a thread."""

    def __init__(self, state: Path, **overrides: Any) -> None:
        self.settings = dataclasses.replace(Settings(port=free_port()), **overrides)
        self.fake = FakeCompressor()
        self.metrics = Metrics()
        self.sent = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.failures = FailureLog(self.thread.ident)
        store = Store(state, self.settings.affinity_wait)

        async def start() -> Any:
            app = server.build_app(self.settings, self.fake, self.metrics, store)
            return await server.start_site(app, self.settings)

        self.runner = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        logging.getLogger("hookd").addHandler(self.failures)

    def close(self) -> None:
        logging.getLogger("hookd").removeHandler(self.failures)
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(
        self, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST", path: str = "/"
    ) -> Reply:
        self.sent += path not in ADMIN_PATHS
        return http_request(self.settings.port, body, headers, method, path)

    def outcomes(self) -> dict[str, float]:
        return {
            sample.labels["outcome"]: sample.value
            for family in self.metrics.outcomes.collect()
            for sample in family.samples
            if sample.name == "hookd_outcomes_total"
        }

    def settled(self) -> dict[str, float]:
        """Outcome counts once every request sent has been recorded (the record is written just
        after the answer, so the client can be a moment ahead of it)."""
        deadline = time.monotonic() + 10
        while self.metrics.registry.get_sample_value("headroom_inbound_requests_completed_total") != self.sent:
            assert time.monotonic() < deadline, "a request was never recorded"
            time.sleep(0.001)
        return self.outcomes()

    def outcome_of(self, body: bytes, headers: dict[str, str] | None = None) -> tuple[Reply, str]:
        before = self.settled()
        reply = self.request(body, headers)
        after = self.settled()
        changed = [name for name, count in after.items() if count != before.get(name, 0)]
        assert len(changed) == 1, changed
        return reply, changed[0]


def http_request(port: int, body: bytes, headers: dict[str, str] | None, method: str, path: str) -> Reply:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    app = Served(tmp_path_factory.mktemp("hostile"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The same app with a hook token configured."""
    app = Served(tmp_path_factory.mktemp("guarded"), hook_token=HOOK_TOKEN)
    yield app
    app.close()


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hookd]:
    """The real server with one real headroom worker; --max-compress keeps a stuck example short."""
    with Hookd("--max-compress", "20", state_dir=tmp_path_factory.mktemp("real"), pool_size=1) as hookd:
        yield hookd


# -- the contract ----------------------------------------------------------------------------


def check_answer(reply: Reply, sent: Any = None, token_set: bool = False) -> str:
    """Assert the answer is one the contract allows; returns the action or status seen. `sent`
    is the HookCallData as Python's JSON parser reads it, when the body was JSON."""
    assert reply.status in (200, 405, 415, 401), reply
    if reply.status == 401:
        assert token_set, "401 without a hook token configured"
        return "401"
    if reply.status == 415:
        assert reply.headers.get("accept-encoding") == "zstd, br, gzip", reply.headers
        return "415"
    if reply.status == 405:
        return "405"
    answer = reply.json()
    if answer == {"action": "allow"}:
        return "allow"
    assert answer.get("action") == "modify" and set(answer) == {"action", "request_body"}, answer
    assert_faithful(sent, answer)
    return "modify"


def canonical(value: Any) -> str:
    """JSON text that tells 1, 1.0 and true apart (Python's == does not)."""
    return json.dumps(value, sort_keys=True)


def assert_faithful(sent: Any, answer: dict[str, Any]) -> None:
    assert isinstance(sent, dict) and isinstance(sent.get("request_body"), dict), "modify of a body without one"
    before, after = sent["request_body"], answer["request_body"]
    assert canonical({k: v for k, v in after.items() if k != "messages"}) == canonical(
        {k: v for k, v in before.items() if k != "messages"}
    )
    assert isinstance(after["messages"], list) and len(after["messages"]) == len(before["messages"])
    # validate.check passes a message by identity when it is unchanged, which holds inside hookd
    # but never between two parsed documents: compare the changed ones only.
    changed = [
        (b, a) for b, a in zip(before["messages"], after["messages"], strict=True) if canonical(b) != canonical(a)
    ]
    validate.check([b for b, _ in changed], [a for _, a in changed])


def parsed(raw: bytes) -> Any:
    """What the sender meant, read by a parser with no limits of its own (None if not JSON)."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


# -- strategies ------------------------------------------------------------------------------

TEXT = st.text(max_size=30)
KEYS = st.text(max_size=10)
# Every integer orjson reads exactly, edges included, and floats well inside +-2**63.
EDGE_INTS = st.sampled_from([2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 0, -1])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    EDGE_INTS,
    st.floats(min_value=-1e18, max_value=1e18, allow_nan=False),
    TEXT,
)
# Values no rewrite could carry unchanged: the whole body must pass through. Planted in about one
# example in eight, so most examples still reach the compressor.
WIDE = st.one_of(
    st.integers(min_value=2**64, max_value=2**200),
    st.integers(min_value=-(2**200), max_value=-(2**63) - 1),
    st.floats(min_value=2.0**63, allow_infinity=False),
    st.floats(max_value=-(2.0**63), allow_infinity=False),
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=12
)
JSON_OBJECT = st.dictionaries(KEYS, JSON, max_size=4)
# Long enough (over 100 characters) that the fake compressor shortens it.
LONG_TEXT = st.builds(lambda part, times: part * times, st.text(min_size=5, max_size=12), st.integers(21, 60))
TOOL_IDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=12)
EXTRAS = st.dictionaries(st.sampled_from(["cache_control", "name", "x-extra", "citations", "ünï"]), JSON, max_size=2)


def log_lines(word: str, count: int) -> str:
    return "\n".join(
        f"2026-11-22 10:{i // 60 % 60:02d}:{i % 60:02d} INFO {word} request {i} ok in {i % 7} ms" for i in range(count)
    )


def json_rows(word: str, count: int) -> str:
    return json.dumps(
        [{"id": i, "name": f"{word}-{i}", "path": f"/src/{word}/{i % 13}.py", "ok": i % 3 > 0} for i in range(count)]
    )


# Tool output of the bulk real agents see, so that real headroom has something to compress.
BULKY = st.builds(log_lines, TEXT, st.integers(100, 400)) | st.builds(json_rows, TEXT, st.integers(50, 300))


def tool_output() -> st.SearchStrategy[Any]:
    return st.one_of(
        LONG_TEXT,
        BULKY,
        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": LONG_TEXT}), min_size=1, max_size=2),
        st.lists(JSON, max_size=20).map(json.dumps),
    )


def content() -> st.SearchStrategy[Any]:
    block = st.one_of(
        st.fixed_dictionaries({"type": st.just("text"), "text": LONG_TEXT | TEXT}),
        st.fixed_dictionaries({"type": st.sampled_from(["image", "thinking", "document"])}, optional={"data": JSON}),
        JSON_OBJECT,
    )
    return st.one_of(LONG_TEXT, TEXT, st.lists(block, max_size=3), st.none())


@st.composite
def anthropic_messages(draw: st.DrawFn) -> list[Any]:
    messages: list[Any] = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["text", "text", "tool", "tool", "tool", "junk"]))
        if kind == "text":
            messages.append({"role": draw(st.sampled_from(["user", "assistant"]) | TEXT), "content": draw(content())})
        elif kind == "tool":
            ids = draw(st.lists(TOOL_IDS, min_size=1, max_size=3, unique=True))
            uses = [{"type": "tool_use", "id": i, "name": draw(TEXT), "input": draw(JSON_OBJECT)} for i in ids]
            messages.append({"role": "assistant", "content": [{"type": "text", "text": draw(TEXT)}, *uses]})
            answered = draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids)))  # some left dangling
            results = [
                {"type": "tool_result", "tool_use_id": i, "content": draw(tool_output()), **draw(EXTRAS)}
                for i in answered
            ]
            messages.append({"role": "user", "content": results})
        else:
            messages.append(draw(JSON))
    return messages


@st.composite
def openai_messages(draw: st.DrawFn) -> list[Any]:
    messages: list[Any] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT | LONG_TEXT)})
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["user", "user", "tool", "tool", "tool", "junk"]))
        if kind == "user":
            messages.append(
                {"role": draw(st.sampled_from(["user", "assistant", "developer"])), "content": draw(content())}
            )
        elif kind == "tool":
            ids = draw(st.lists(TOOL_IDS, min_size=1, max_size=3, unique=True))
            calls = [
                {"id": i, "type": "function", "function": {"name": draw(TEXT), "arguments": json.dumps(draw(JSON))}}
                for i in ids
            ]
            messages.append({"role": "assistant", "content": draw(st.none() | TEXT), "tool_calls": calls})
            for i in draw(st.lists(st.sampled_from(ids), unique=True, max_size=len(ids))):
                messages.append({"role": "tool", "tool_call_id": i, "content": draw(BULKY | LONG_TEXT | TEXT)})
        else:
            messages.append(draw(JSON))
    return messages


@st.composite
def hook_calls(draw: st.DrawFn) -> Any:
    """HookCallData, mostly well-formed, with hostile values everywhere a client controls."""
    body: dict[str, Any] = draw(st.dictionaries(KEYS.filter(lambda k: k != "messages"), JSON, max_size=4))
    body.update(
        draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "model": st.sampled_from(["claude-sonnet-4-5", "gpt-4o", "deepseek-chat", ""]) | JSON,
                    "max_tokens": st.integers(-(2**63), 2**64 - 1),
                    "temperature": st.floats(allow_nan=False, allow_infinity=False),
                    "stream": st.booleans(),
                    "system": TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})),
                    "tools": st.lists(JSON_OBJECT, max_size=2),
                },
            )
        )
    )
    shape = draw(st.sampled_from(["anthropic", "anthropic", "openai", "openai", "absent", "not-a-list"]))
    if shape == "anthropic":
        body["messages"] = draw(anthropic_messages())
    elif shape == "openai":
        body["messages"] = draw(openai_messages())
    elif shape == "not-a-list":
        body["messages"] = draw(JSON.filter(lambda value: not isinstance(value, list)))
    metadata = draw(
        st.fixed_dictionaries(
            {},
            optional={
                "provider": st.sampled_from(["anthropic", "openai", "google", ""]) | JSON,
                "model": TEXT | JSON,
                "session_id": TEXT | JSON,
                "request_id": TEXT,
            },
        )
        | JSON
    )
    call: Any = {"metadata": metadata, "request_body": body, **draw(st.dictionaries(st.sampled_from(["x", "ü"]), JSON))}
    # Rare branches fire on a middle value: hypothesis often draws the simplest choice (0, the
    # first element), which must be the common case.
    if draw(st.integers(0, 7)) == 5:
        messages = body.get("messages")
        inside = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
        target = draw(st.sampled_from([body, *inside]))
        target[draw(KEYS)] = draw(WIDE)
    if draw(st.integers(0, 19)) == 7:
        call = draw(JSON)  # not HookCallData at all
    elif draw(st.integers(0, 19)) == 7:
        call["request_body"] = draw(JSON)
    return call


def to_json(call: Any, ascii_only: bool) -> bytes:
    return json.dumps(call, ensure_ascii=ascii_only, allow_nan=False).encode()


CODING_TOKENS = st.sampled_from(
    ["gzip", "x-gzip", "GZip", " zstd ", "br", "identity", "", "compress", "deflate", "snappy", "*", "gzip;q=1"]
) | st.from_regex(r"[a-z0-9-]{1,8}", fullmatch=True)


def encode_chain(raw: bytes, chain: list[str]) -> bytes:
    for coding in chain:
        raw = client.encode_body(raw, coding)
    return raw


def reference_decode(body: bytes, header: str | None) -> bytes | None:
    """The body decoded by each library's standard decoder, or None if one of them refuses."""
    chain = [t.strip().lower() for t in (header or "").split(",")]
    try:
        for coding in reversed([{"x-gzip": "gzip"}.get(c, c) for c in chain if c not in ("", "identity")]):
            if coding == "gzip":
                body = gzip.decompress(body)
            elif coding == "zstd":
                reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
                body = reader.read()
            else:
                body = brotli.decompress(body)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, brotli.error):
        return None
    return body


@st.composite
def wire_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """A body as it crosses the wire, and its Content-Encoding header (None: no header)."""
    kind = draw(st.sampled_from(["encoded", "encoded", "random", "truncated", "flipped", "garbage-after"]))
    if kind == "random":
        header = draw(st.none() | st.lists(CODING_TOKENS, max_size=3).map(", ".join))
        return draw(st.binary(max_size=2048)), header
    raw = to_json(draw(hook_calls()), ascii_only=True)
    chain = draw(st.lists(st.sampled_from(["gzip", "zstd", "br"]), min_size=1, max_size=3))
    body = encode_chain(raw, chain)
    if kind == "truncated":
        body = body[: draw(st.integers(0, max(0, len(body) - 1)))]
    elif kind == "flipped" and body:
        at = draw(st.integers(0, len(body) - 1))
        body = body[:at] + bytes([body[at] ^ draw(st.integers(1, 255))]) + body[at + 1 :]
    elif kind == "garbage-after":
        body += draw(st.binary(min_size=1, max_size=64))
    tokens = list(chain)
    if draw(st.booleans()):
        tokens.insert(draw(st.integers(0, len(tokens))), draw(CODING_TOKENS))
    if draw(st.integers(0, 9)) == 7:
        tokens.reverse()  # listed in the wrong order: does not decode
    return body, ", ".join(tokens)


def unknown_coding(header: str | None) -> bool:
    return any(t.strip().lower() not in KNOWN_CODINGS for t in (header or "").split(","))


def check_wire_answer(reply: Reply, body: bytes, header: str | None) -> str:
    if unknown_coding(header):
        assert reply.status == 415, (header, reply)
        return check_answer(reply)
    assert reply.status == 200, (header, reply)
    decoded = reference_decode(body, header)
    seen = check_answer(reply, parsed(decoded) if decoded is not None else None)
    return seen


def examples(count: int) -> settings:
    """Hypothesis settings for a property test that sends `count` requests."""
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


# -- properties, in-process with the fake compressor ---------------------------------------


def test_any_hook_call_gets_an_answer_within_the_contract(served: Served, request: pytest.FixtureRequest) -> None:
    seen: dict[str, int] = {}

    @examples(400)
    @given(call=hook_calls(), mode=st.sampled_from(FAKE_MODES), ascii_only=st.booleans())
    def check(call: Any, mode: str, ascii_only: bool) -> None:
        served.fake.mode = mode
        raw = to_json(call, ascii_only)
        action = check_answer(served.request(raw, {"Content-Type": "application/json"}), parsed(raw))
        seen[action] = seen.get(action, 0) + 1

    check()
    assert served.request(method="GET", path="/healthz").status == 200
    report.record(request, examples=sum(seen.values()), answers=seen, answers_outside_contract=0)
    assert seen.get("modify", 0) > 0, "no example reached a modify: the property checked nothing"


def test_hookd_itself_raises_nothing_on_any_hook_call(served: Served, request: pytest.FixtureRequest) -> None:
    """Behind a compressor that never raises unexpectedly, no input makes hookd's own code fall
    through to its catch-all (which answers allow, logs a traceback and counts allow(error))."""
    served.failures.records.clear()
    count = 0

    @examples(300)
    @given(call=hook_calls(), mode=st.sampled_from(WELL_BEHAVED_MODES))
    def check(call: Any, mode: str) -> None:
        nonlocal count
        served.fake.mode = mode
        raw = to_json(call, ascii_only=False)
        check_answer(served.request(raw), parsed(raw))
        count += 1
        assert served.failures.ours() == []

    check()
    report.record(request, examples=count, internal_exceptions=len(served.failures.ours()))


def test_any_method_and_path_other_than_post_is_405(served: Served) -> None:
    @examples(100)
    @given(
        # Standard methods only: aiohttp's parser answers 400 to an unregistered one before any
        # handler runs.
        method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
        path=st.from_regex(r"/[a-zA-Z0-9_./%-]{0,20}", fullmatch=True).filter(lambda p: not p.startswith(ADMIN_PATHS)),
        body=st.binary(max_size=64),
    )
    def check(method: str, path: str, body: bytes) -> None:
        reply = served.request(body, method=method, path=path)
        assert reply.status == 405, (method, path, reply)
        assert reply.headers.get("allow") == "POST"

    check()


def test_401_only_without_the_right_token(guarded: Served, served: Served) -> None:
    call = to_json({"request_body": {"messages": [{"role": "user", "content": "x" * 200}]}}, ascii_only=True)
    right = st.sampled_from([{"Authorization": f"Bearer {HOOK_TOKEN}"}, {"X-Api-Key": HOOK_TOKEN}])
    wrong = st.one_of(
        st.just({}),
        st.builds(lambda t: {"Authorization": f"Bearer {t}"}, st.from_regex(r"[!-~]{1,30}", fullmatch=True)),
        st.builds(lambda t: {"X-Api-Key": t}, st.from_regex(r"[!-~]{1,30}", fullmatch=True)),
        st.just({"Authorization": "Basic aG9vay1zZWNyZXQ="}),
        st.just({"Authorization": f"Bearer {HOOK_TOKEN}x"}),
        st.just({"Authorization": f"Token {HOOK_TOKEN}"}),
    ).filter(lambda h: HOOK_TOKEN not in (h.get("X-Api-Key"), h.get("Authorization", "")[7:]))

    @examples(100)
    @given(headers=right | wrong)
    def check(headers: dict[str, str]) -> None:
        authorised = HOOK_TOKEN in (headers.get("X-Api-Key"), headers.get("Authorization", "")[7:])
        reply = guarded.request(call, headers)
        assert (reply.status == 401) == (not authorised), (headers, reply)
        check_answer(reply, json.loads(call), token_set=True)
        assert served.request(call, headers).status == 200  # no token configured: never 401

    check()


def test_raw_bytes_in_any_content_encoding(served: Served, request: pytest.FixtureRequest) -> None:
    served.fake.mode = "shorten"
    seen: dict[str, int] = {}

    @examples(400)
    @given(wire=wire_bodies())
    def check(wire: tuple[bytes, str | None]) -> None:
        body, header = wire
        headers = {"Content-Encoding": header} if header is not None else {}
        action = check_wire_answer(served.request(body, headers), body, header)
        seen[action] = seen.get(action, 0) + 1

    check()
    assert served.request(method="GET", path="/healthz").status == 200
    report.record(request, examples=sum(seen.values()), answers=seen, answers_outside_contract=0)
    assert {"allow", "modify", "415"} <= set(seen), seen


# -- explicit hostile cases, in-process ------------------------------------------------------

TOOL_PAIR = [
    {"role": "user", "content": "list files"},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "file\n" * 400}]},
]


def call_bytes(body_fields: bytes = b"", messages: bytes | None = None, session: str = "s1") -> bytes:
    """HookCallData written by hand, so it can carry what no JSON library would write."""
    messages = json.dumps(TOOL_PAIR).encode() if messages is None else messages
    metadata = json.dumps({"provider": "anthropic", "model": "claude-sonnet-4-5", "session_id": session}).encode()
    return b'{"metadata":' + metadata + b',"request_body":{' + body_fields + b'"messages":' + messages + b"}}"


def nested(depth: int) -> bytes:
    return b'{"k":' * depth + b'"leaf"' + b"}" * depth


@pytest.fixture
def shorten(served: Served) -> Served:
    served.fake.mode = "shorten"
    served.failures.records.clear()
    return served


@pytest.mark.parametrize(("where", "depth"), [("tool_schema", 1000), ("tool_schema", 1100), ("metadata", 1000)])
def test_deep_nesting_outside_messages_passes_through(shorten: Served, where: str, depth: int) -> None:
    if where == "metadata":
        raw = b'{"metadata":' + nested(depth) + b',"request_body":{"messages":' + json.dumps(TOOL_PAIR).encode() + b"}}"
    else:
        raw = call_bytes(b'"tool_schema":' + nested(depth) + b",")
    reply, outcome = shorten.outcome_of(raw)
    # Nesting hookd could not write back, wherever it is, goes through untouched.
    assert (reply.status, reply.json(), outcome) == (200, {"action": "allow"}, "allow(passthrough)")
    assert shorten.failures.ours() == []


def test_deep_nesting_inside_messages_is_answered_allow(shorten: Served) -> None:
    for session in ("s1", ""):
        messages = (
            b'[{"role":"user","content":[{"type":"text","text":"' + b"y" * 300 + b'","x":' + nested(1000) + b"}]}]"
        )
        reply = shorten.request(call_bytes(messages=messages, session=session))
        assert (reply.status, reply.json()) == (200, {"action": "allow"})
    assert shorten.request(method="GET", path="/healthz").status == 200


@pytest.mark.parametrize("depth", [300, 1000])
def test_deep_nesting_inside_messages_is_a_passthrough(shorten: Served, depth: int) -> None:
    messages = b'[{"role":"user","content":[{"type":"text","text":"' + b"y" * 300 + b'","x":' + nested(depth) + b"}]}]"
    reply, outcome = shorten.outcome_of(call_bytes(messages=messages))
    assert (reply.status, reply.json()) == (200, {"action": "allow"})
    assert shorten.failures.ours() == []
    assert outcome == "allow(passthrough)"


def test_compressor_dropping_a_message_is_invalid_output(served: Served) -> None:
    """A different message count is refused by validation, not by an error on the way to it."""
    served.fake.mode = "drop-message"
    served.failures.records.clear()
    reply, outcome = served.outcome_of(call_bytes(session="drops"))
    assert (reply.status, reply.json()) == (200, {"action": "allow"})
    assert served.failures.ours() == []
    assert outcome == "allow(invalid-output)"


@pytest.mark.parametrize("where", ["messages", "body"])
def test_ten_megabyte_strings(shorten: Served, where: str) -> None:
    huge = "é" + "0123456789abcdef" * (10 * MIB // 16)
    call: dict[str, Any] = {"metadata": {"session_id": f"huge-{where}"}, "request_body": {"messages": TOOL_PAIR}}
    if where == "messages":
        call["request_body"]["messages"] = [*TOOL_PAIR, {"role": "user", "content": huge}]
    else:
        call["request_body"]["prompt_extra"] = huge
    raw = to_json(call, ascii_only=False)
    reply, outcome = shorten.outcome_of(raw)
    assert (check_answer(reply, json.loads(raw)), outcome) == ("modify", "modify")
    if where == "body":
        assert reply.json()["request_body"]["prompt_extra"] == huge


def test_duplicate_keys_mean_what_the_last_one_says(shorten: Served) -> None:
    fields = b'"temperature":0.1,"temperature":0.9,"model":"a","model":"b",'
    raw = call_bytes(fields, session="dupes")
    reply, outcome = shorten.outcome_of(raw)
    assert outcome == "modify"
    body = reply.json()["request_body"]
    assert (body["temperature"], body["model"]) == (0.9, "b")
    assert check_answer(reply, parsed(raw)) == "modify"


@pytest.mark.parametrize(
    "raw",
    [
        call_bytes(b'"note":"caf\xe9",'),  # Latin-1, not UTF-8
        call_bytes(b'"note":"\xed\xa0\x80",'),  # an encoded surrogate
        call_bytes(b'"note":"\xc0\xaf",'),  # an overlong encoding
        call_bytes(b'"note":"\\ud800",'),  # a lone surrogate escape
        b"\xef\xbb\xbf" + call_bytes(),  # a byte-order mark
        call_bytes(messages=b'[{"role":"user","content":"\xff' + b"x" * 300 + b'"}]'),
    ],
    ids=["latin1", "utf8-surrogate", "overlong", "lone-surrogate-escape", "bom", "in-messages"],
)
def test_invalid_utf8_passes_through(shorten: Served, raw: bytes) -> None:
    reply, outcome = shorten.outcome_of(raw)
    assert (reply.status, reply.json(), outcome) == (200, {"action": "allow"}, "allow(passthrough)")


@pytest.mark.parametrize(
    "literal",
    [b"18446744073709551616", b"-9223372036854775809", b"1" * 40, b"NaN", b"Infinity", b"-Infinity", b"1e999"],
)
@pytest.mark.parametrize("where", ["body", "messages"])
def test_numbers_that_would_not_survive_a_rewrite_pass_through(shorten: Served, literal: bytes, where: str) -> None:
    if where == "body":
        raw = call_bytes(b'"seed":' + literal + b",")
    else:
        pair = json.dumps(TOOL_PAIR).encode().replace(b'"input": {}', b'"input": {"n": ' + literal + b"}")
        raw = call_bytes(messages=pair)
    reply, outcome = shorten.outcome_of(raw)
    assert (reply.status, reply.json(), outcome) == (200, {"action": "allow"}, "allow(passthrough)")


@pytest.mark.parametrize("literal", [b"18446744073709551615", b"-9223372036854775808", b"9007199254740993"])
def test_the_widest_integers_orjson_reads_come_back_exactly(shorten: Served, literal: bytes) -> None:
    raw = call_bytes(b'"seed":' + literal + b",", session=f"wide-{literal.decode()}")
    reply, outcome = shorten.outcome_of(raw)
    assert outcome == "modify"
    assert b'"seed":' + literal + b"," in reply.body
    assert check_answer(reply, parsed(raw)) == "modify"


@pytest.fixture(scope="module")
def small_limit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    app = Served(tmp_path_factory.mktemp("small"), max_decoded_bytes=MIB)
    yield app
    app.close()


def _zeros(coding: str, size: int = 64 * MIB) -> bytes:
    if coding == "gzip":
        squeeze = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        return b"".join(squeeze.compress(bytes(MIB)) for _ in range(size // MIB)) + squeeze.flush()
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(bytes(size))
    return brotli.compress(bytes(size), quality=1)


@pytest.mark.parametrize("chain", [["gzip"], ["zstd"], ["br"], ["zstd", "gzip"], ["br", "br"]])
def test_decompression_bombs_are_too_large(
    small_limit: Served, chain: list[str], request: pytest.FixtureRequest
) -> None:
    bomb = _zeros(chain[0])
    for coding in chain[1:]:
        bomb = client.encode_body(bomb, coding)
    started = time.monotonic()
    reply, outcome = small_limit.outcome_of(bomb, {"Content-Encoding": ", ".join(chain)})
    seconds = time.monotonic() - started
    assert (reply.status, reply.json(), outcome) == (200, {"action": "allow"}, "allow(too-large)")
    report.record(request, wire_bytes=len(bomb), expands_to_mib=64, limit_mib=1, answered_s=round(seconds, 3))


# -- a smaller number against the real server -----------------------------------------------


def real_request(hookd: Hookd, body: bytes, headers: dict[str, str] | None = None) -> Reply:
    return http_request(hookd.port, body, headers, "POST", "/")


@pytest.mark.slow
def test_real_server_any_hook_call_within_the_contract(real: Hookd, request: pytest.FixtureRequest) -> None:
    seen: dict[str, int] = {}

    @examples(40)
    @given(call=hook_calls())
    def check(call: Any) -> None:
        raw = to_json(call, ascii_only=False)
        action = check_answer(real_request(real, raw), parsed(raw))
        seen[action] = seen.get(action, 0) + 1

    check()
    report.record(request, examples=sum(seen.values()), answers=seen, **real_health(real))
    assert real_health(real) == {"healthz": 200, "readyz": 200, "worker_restarts": 0}


@pytest.mark.slow
def test_real_server_keeps_hostile_fields_through_a_modify(real: Hookd, request: pytest.FixtureRequest) -> None:
    """A conversation real headroom always compresses, wrapped in hostile fields: every modify
    must carry them back exactly."""
    seen: dict[str, int] = {}

    @examples(20)
    @given(extras=JSON_OBJECT, metadata=JSON_OBJECT, word=TEXT, ascii_only=st.booleans())
    def check(extras: dict[str, Any], metadata: dict[str, Any], word: str, ascii_only: bool) -> None:
        messages = [
            {"role": "user", "content": "show the log"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": log_lines(word, 400)}],
            },
            {"role": "assistant", "content": "Looking."},
            {"role": "user", "content": "and?"},
        ]
        body = {
            **{k: v for k, v in extras.items() if k != "messages"},
            "model": "claude-sonnet-4-5",
            "messages": messages,
        }
        raw = to_json({"metadata": metadata, "request_body": body}, ascii_only)
        action = check_answer(real_request(real, raw), parsed(raw))
        seen[action] = seen.get(action, 0) + 1

    check()
    report.record(request, examples=sum(seen.values()), answers=seen, **real_health(real))
    assert seen.get("modify", 0) >= sum(seen.values()) // 2, seen
    assert real_health(real) == {"healthz": 200, "readyz": 200, "worker_restarts": 0}


@pytest.mark.slow
def test_real_server_raw_bytes_in_any_content_encoding(real: Hookd, request: pytest.FixtureRequest) -> None:
    seen: dict[str, int] = {}

    @examples(40)
    @given(wire=wire_bodies())
    def check(wire: tuple[bytes, str | None]) -> None:
        body, header = wire
        headers = {"Content-Encoding": header} if header is not None else {}
        action = check_wire_answer(real_request(real, body, headers), body, header)
        seen[action] = seen.get(action, 0) + 1

    check()
    report.record(request, examples=sum(seen.values()), answers=seen, **real_health(real))
    assert real_health(real) == {"healthz": 200, "readyz": 200, "worker_restarts": 0}


@pytest.mark.slow
def test_real_server_deep_nesting_and_odd_numbers(real: Hookd) -> None:
    cases = [
        call_bytes(messages=b'[{"role":"user","content":[{"type":"text","text":"y","x":' + nested(1000) + b"}]}]"),
        call_bytes(b'"tool_schema":' + nested(1000) + b","),
        call_bytes(b'"seed":18446744073709551616,'),
        call_bytes(b'"seed":NaN,'),
        call_bytes(b'"note":"caf\xe9",'),
    ]
    for raw in cases:
        reply = real_request(real, raw)
        assert (reply.status, reply.json()) == (200, {"action": "allow"})
    assert real_health(real) == {"healthz": 200, "readyz": 200, "worker_restarts": 0}


def real_health(hookd: Hookd) -> dict[str, Any]:
    metrics = http_request(hookd.port, b"", None, "GET", "/metrics").body.decode()
    return {
        "healthz": hookd.get("/healthz")[0],
        "readyz": hookd.get("/readyz")[0],
        "worker_restarts": report.metric(metrics, "hookd_worker_restarts_total"),
    }
