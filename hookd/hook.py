"""The hook handler: one request flows read -> decode -> parse -> route -> compress -> validate
-> answer -> record.

Every step that can fail ends in a well-formed answer; the only non-200 statuses are the
contract's own: 401 without the hook token (when one is set), 405 for a method other than
POST, 415 for a coding we do not decode.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
from aiohttp import web

from hookd import auth, codings, protocol, sticky, summary, validate
from hookd.affinity import session_key
from hookd.compressor import Compressor, CompressorError, Job, Overloaded, Result
from hookd.config import Store
from hookd.conversation import Conversations, Turn
from hookd.deferred import Quiet
from hookd.ledger import Facts, Ledger, Notebook
from hookd.metrics import Metrics
from hookd.settings import Settings

log = logging.getLogger("hookd")
T = TypeVar("T")

# Decoding and encoding bodies above this size run in a thread (the codecs release the GIL), so
# one large conversation does not stall every other request on the event loop.
OFFLOAD_BYTES = 1024 * 1024
JSON = "application/json"
MIB = 1024 * 1024
COLD_SECONDS_PER_MB = 0.75
# Messages of history sent to the worker with the new ones, beyond headroom's protected window.
CONTEXT_MESSAGES = 8


def affinity_wait(limit: float, body_bytes: int) -> float:
    """How long to wait for the session's busy worker: never longer than recompressing this body
    cold elsewhere would take (bench/replay.py: ~0.7 s per MB against ~60 ms for a warm turn of
    the same 1.1 MB conversation), and never past the operator's limit."""
    return min(limit, COLD_SECONDS_PER_MB * body_bytes / MIB)


class Draining(Exception):
    """Shutdown's drain time ran out while the request was still being compressed."""


class ReadError(Exception):
    """The client did not deliver its body (timeout, reset, bad framing)."""


class Answer:
    """An HTTP answer before it is written: status, body and the outcome to record."""

    def __init__(
        self,
        outcome: str,
        body: bytes = protocol.ALLOW,
        status: int = 200,
        close: bool = False,
        sent: list[Any] | None = None,
    ) -> None:
        self.outcome = outcome
        self.body = body
        self.status = status
        self.close = close
        # For `modify`: the messages that go upstream, for the conversation's record.
        self.sent = sent or []
        # Work to start once the answer is written (a rewrite candidate), if any.
        self.after: Callable[[], Awaitable[None]] | None = None


async def offload(size: int, fn: Callable[..., T], *args: Any) -> T:
    if size >= OFFLOAD_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


async def read_body(request: web.Request, settings: Settings) -> bytearray:
    """The body as it crossed the wire, under the caps (`--read-timeout`, `max_wire_bytes`)."""
    limit = settings.max_wire_bytes
    if request.content_length is not None and request.content_length > limit:
        raise codings.TooLarge(f"Content-Length {request.content_length} exceeds {limit}")
    body = bytearray()
    try:
        async with asyncio.timeout(settings.read_timeout):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise codings.TooLarge(f"body exceeds {limit} bytes")
    except codings.TooLarge:
        raise
    except TimeoutError:
        raise ReadError(f"body not received within {settings.read_timeout} s") from None
    except (ConnectionError, asyncio.IncompleteReadError, web.HTTPException) as exc:
        raise ReadError(str(exc) or type(exc).__name__) from None
    except Exception as exc:
        # aiohttp reports a broken chunked body or an early hang-up as ClientPayloadError
        # and friends; whatever the class, the body did not arrive.
        raise ReadError(f"{type(exc).__name__}: {exc}") from None
    return body


class Hook:
    def __init__(
        self,
        settings: Settings,
        compressor: Compressor,
        metrics: Metrics,
        store: Store,
        clock: Callable[[], float] = time.time,
        records: sticky.Records | None = None,
        ledger: Notebook | None = None,
    ) -> None:
        """`clock`: wall-clock seconds, which the cache model measures idle time with (the
        benchmarks replay recorded sessions on their own clock). `records`: where conversation
        records live; this process's memory unless given. `ledger`: where what each answered
        request did is noted; this process's memory unless given."""
        self.settings = settings
        self.compressor = compressor
        self.metrics = metrics
        self.store = store
        max_bytes = settings.sticky_max_mb * MIB
        if records is None:
            records = sticky.Memory(sticky.Store(max_bytes, settings.sticky_ttl, clock))
        self.conversations = Conversations(store, compressor, records, max_bytes, clock)
        # What each answered request did, for the provider's usage events to be matched to.
        self.ledger = ledger if ledger is not None else Ledger()
        metrics.sticky_bytes.set_function(lambda: records.bytes)
        metrics.sticky_conversations.set_function(lambda: len(records))
        # Set when a shutdown's drain time is up: calls still running are answered allow.
        self.drain_expired = asyncio.Event()
        self.background: set[asyncio.Future[None]] = set()
        # Whether a hook call is in progress: work nobody waits for waits for none to be.
        self.quiet = Quiet()

    async def hook(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        rec = summary.Record()
        self.metrics.inbound.inc()
        self.metrics.inbound_active.inc()
        try:
            with self.quiet.busy():
                try:
                    answer = await self.decide(request, rec)
                except Exception:
                    # The last line of fail-open: a bug of ours must still cost the user nothing.
                    log.exception("unexpected failure; answering allow")
                    answer = Answer("allow(error)")
                response = await self.respond(request, answer, rec)
            if answer.after is not None:
                self.start_background(answer.after)
            return response
        finally:
            rec.dur_ms = (time.perf_counter() - started) * 1000
            self.metrics.observe(rec)
            self.metrics.inbound_active.dec()
            self.metrics.inbound_completed.inc()
            if self.settings.verbose:
                sys.stdout.write(summary.line(rec) + "\n")
                sys.stdout.flush()

    def start_background(self, work: Callable[[], Awaitable[None]]) -> None:
        task = asyncio.ensure_future(work())
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[None]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background work failed", exc_info=task.exception())

    async def decide(self, request: web.Request, rec: summary.Record) -> Answer:
        if not auth.allowed(request, self.settings.hook_token):
            return Answer("401", b'{"error":"missing or wrong hook token"}', status=401)
        if request.method != "POST":
            return Answer("405", b'{"error":"the hook takes POST"}', status=405)
        try:
            coding_chain = codings.parse_content_encoding(request.headers.get("Content-Encoding"))
        except codings.UnsupportedCoding as exc:
            # A 415 with Accept-Encoding is RFC 7694's downgrade signal: the client retries with
            # a coding we take (or none). It is not a refusal of the request.
            body = orjson.dumps({"error": f"unsupported Content-Encoding {str(exc)!r}", "accept": codings.SUPPORTED})
            return Answer("reject(encoding)", body, status=415)
        rec.coding = "+".join(coding_chain) or "identity"

        read_started = time.perf_counter()
        try:
            wire = await read_body(request, self.settings)
        except codings.TooLarge:
            return Answer("allow(too-large)", close=True)
        except ReadError as exc:
            log.info("could not read a request body: %s", exc)
            return Answer("allow(read-error)", close=True)
        finally:
            rec.read_ms = (time.perf_counter() - read_started) * 1000
        rec.wire_bytes = len(wire)

        try:
            decoded = await offload(len(wire), codings.decode, wire, coding_chain, self.settings.max_decoded_bytes)
        except codings.TooLarge:
            return Answer("allow(too-large)")
        except codings.CorruptBody as exc:
            log.info("request body does not decode: %s", exc)
            return Answer("allow(decode-error)")
        del wire
        rec.in_bytes = len(decoded)

        try:
            # orjson holds the GIL, so a thread would add a hop and free nothing.
            call = protocol.parse(decoded)
        except protocol.Passthrough:
            return Answer("allow(passthrough)")
        del decoded
        rec.in_msgs = len(call.messages)
        rec.provider, rec.model = call.provider, call.model
        if not call.messages:
            return Answer("allow(noop)")
        return await self.compress(call, rec)

    async def compress(self, call: protocol.HookCall, rec: summary.Record) -> Answer:
        session = session_key(call.session_id, call.messages)
        turn = await self.conversations.begin(session, call)
        if turn is not None:
            await self.conversations.rewrite(turn, call, lambda sent: self.whole_job(call, session, sent, rec))
        prefix = turn.prefix if turn else []
        rec.frozen = len(prefix) - (len(turn.plan.forms) if turn and turn.plan else 0)
        outcome = await self.run_job(call, session, turn, rec)
        answer = outcome if isinstance(outcome, Answer) else self.answer_for(call, outcome, prefix, turn, rec)
        if turn is not None:
            changed = turn.previous is not None and (turn.previous.emitted or turn.plan is not None)
            if answer.outcome not in ("modify", "allow(noop)") and changed:
                answer = self.history_only(call, turn, answer, rec)
            answer.after = await self.remember(turn, call, answer, rec)
        facts = turn.facts if turn is not None and turn.facts else plain_facts(call, rec, answer.outcome)
        self.ledger.note(call.request_id, facts)
        return answer

    def history_only(self, call: protocol.HookCall, turn: Turn, failed: Answer, rec: summary.Record) -> Answer:
        """When the new messages could not be compressed, `allow` would send the original history
        and miss the provider's cache for all of it. Sending last turn's history again with the
        new messages untouched is as safe (those bytes were checked and sent before) and keeps
        the cache; the new messages then stay uncompressed, as the record promises."""
        messages = turn.prefix + call.messages[len(turn.prefix) :]
        try:
            validate.check(call.messages, messages)
            body = protocol.modify(call.body, messages)
        except (validate.InvalidOutput, protocol.Passthrough):
            return failed
        assert turn.previous is not None
        rec.tokens_in, rec.tokens_out = turn.previous.tokens_before, turn.previous.tokens_after
        log.info("sending last turn's history again after %s", failed.outcome)
        return Answer("modify(history)", body, sent=messages)

    def whole_job(self, call: protocol.HookCall, session: bytes, sent: list[Any], rec: summary.Record) -> Job:
        """The history as sent, whole, for the strong pipeline: a cold turn's rewrite."""
        wait = affinity_wait(self.store.values["affinity_wait"], rec.in_bytes)
        knobs = self.conversations.knobs()
        return Job(
            messages=sent, model=call.model, key=session, knobs=knobs, affinity_wait=wait, strong=True, count=True
        )

    async def run_job(
        self, call: protocol.HookCall, session: bytes, turn: Turn | None, rec: summary.Record
    ) -> Result | Answer:
        prefix = turn.prefix if turn else []
        if len(prefix) == len(call.messages):
            # The same request again (a client retry): everything was decided last time.
            return Result(messages=list(prefix))
        strong = turn is not None and turn.strong
        knobs = self.conversations.knobs() if strong else self.store.compress_knobs()
        # The worker needs only enough history to judge the new messages (the recent window
        # headroom protects, the tool calls their results answer); the rest stays here.
        context = prefix[max(0, len(prefix) - knobs["protect_recent"] - CONTEXT_MESSAGES) :]
        # Breakpoints go on again afterwards: headroom leaves a marked block alone (rewriting it
        # would bust a cache), but a new message is sent compressed from its first turn on, so
        # the provider only ever caches the compressed bytes.
        fresh = [sticky.strip_cache_control(m) for m in call.messages[len(prefix) :]] if turn else call.messages
        job = Job(
            messages=context + fresh,
            model=call.model,
            key=session,
            knobs=knobs,
            affinity_wait=affinity_wait(self.store.values["affinity_wait"], rec.in_bytes),
            frozen=len(context),
            offset=len(prefix) - len(context),
            dedup=strong,
        )
        try:
            result = await self.until_drained(self.compressor.compress(job))
        except Overloaded:
            return Answer("allow(overload)")
        except CompressorError as exc:
            log.warning("compression failed: %s", exc)
            return Answer("allow(error)")
        except Draining:
            return Answer("allow(shutdown)")
        rec.worker_ms, rec.slot, rec.cold = result.worker_ms, result.slot, result.cold
        self.metrics.markers_removed.inc(result.markers_removed)
        rec.model_limit, rec.placement, rec.wait_ms = result.model_limit, result.placement, result.wait_ms
        if result.tokens_before <= 0:
            # headroom swallows its own errors and reports zero tokens for them.
            return Answer("allow(error)")
        if not isinstance(result.messages, list) or len(result.messages) != len(job.messages):
            log.warning("worker output failed validation: %d messages became a different count", len(job.messages))
            return Answer("allow(invalid-output)")
        # Back to the whole conversation: the history as sent before, then the new messages.
        new = result.messages[job.frozen :]
        if fresh is not call.messages:
            originals = call.messages[len(prefix) :]
            new = [o if m is f else sticky.mark(m, o) for m, f, o in zip(new, fresh, originals, strict=True)]
        result.messages = prefix + new
        return result

    def answer_for(
        self, call: protocol.HookCall, result: Result, prefix: list[Any], turn: Turn | None, rec: summary.Record
    ) -> Answer:
        previous = turn.previous if turn else None
        rec.tokens_in = result.tokens_before + (previous.tokens_before if previous else 0)
        rec.tokens_out = result.tokens_after + (previous.tokens_after if previous else 0)
        if turn is not None and turn.plan is not None:
            rec.tokens_out = max(0, rec.tokens_out - turn.plan.saved_tokens)
        if rec.tokens_out >= rec.tokens_in:
            rec.tokens_out = rec.tokens_in
            return Answer("allow(noop)")
        messages = result.messages
        try:
            validate.check(call.messages, messages)
            body = protocol.modify(call.body, messages)
        except validate.InvalidOutput as exc:
            log.warning("worker output failed validation: %s", exc)
            rec.tokens_out = rec.tokens_in
            return Answer("allow(invalid-output)")
        except protocol.Passthrough:
            rec.tokens_out = rec.tokens_in
            return Answer("allow(passthrough)")
        return Answer("modify", body, sent=messages)

    async def remember(
        self, turn: Turn, call: protocol.HookCall, answer: Answer, rec: summary.Record
    ) -> Callable[[], Awaitable[None]] | None:
        """Record what went upstream this turn, whatever the outcome: a message sent as it came
        stays that way, so the provider's cached prefix never changes under it. Only when the
        history could not be sent as recorded is the conversation forgotten (the next turn then
        starts a fresh record from a full compression)."""
        sent: list[Any] | None
        if answer.outcome.startswith("modify"):
            sent = answer.sent
        else:
            # The history went out as the client sent it: no rewrite happened.
            turn.plan = None
            untouched = turn.previous is None or not turn.previous.emitted
            sent = call.messages if untouched else None
        if rec.tokens_in:
            counts = (rec.tokens_in, rec.tokens_out)
        elif turn.previous is not None:
            # Nothing was counted this turn (the worker failed): the history's counts stand.
            counts = (turn.previous.tokens_before, turn.previous.tokens_after)
        else:
            counts = (0, 0)
        return await self.conversations.end(turn, call, sent, counts, rec)

    async def respond(self, request: web.Request, answer: Answer, rec: summary.Record) -> web.StreamResponse:
        rec.outcome = answer.outcome
        rec.out_bytes = len(answer.body)
        response = web.Response(status=answer.status, content_type=JSON)
        body = answer.body
        if self.settings.accept_compressed:
            response.headers["Accept-Encoding"] = codings.ACCEPT_ENCODING
        if answer.status == 405:
            response.headers["Allow"] = "POST"
        if answer.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="hookd"'
        if answer.status == 415:
            # RFC 7694 section 3: the 415 lists what we do accept, whatever the flag says.
            response.headers["Accept-Encoding"] = codings.ACCEPT_ENCODING
        if self.settings.compress_response:
            response.headers["Vary"] = "Accept-Encoding"
            coding = codings.choose_response_coding(request.headers.get("Accept-Encoding"))
            if coding and len(body) >= codings.MIN_ENCODE_BYTES:
                body = await offload(len(body), codings.encode, body, coding)
                response.headers["Content-Encoding"] = coding
                rec.response_coding = coding
        response.body = body
        if answer.close:
            # The rest of an oversized or broken body is not worth reading: answer and hang up.
            response.force_close()
        write_started = time.perf_counter()
        try:
            await response.prepare(request)
            await response.write_eof()
        except (ConnectionError, RuntimeError) as exc:
            log.info("client went away before the answer was written: %s", exc)
        rec.write_ms = (time.perf_counter() - write_started) * 1000
        return response

    async def until_drained(self, call: Any) -> Any:
        """The compressor's answer, or Draining once a shutdown's drain time is up (the call
        itself runs on, shielded in the pool, and its worker is stopped with the pool)."""
        task = asyncio.ensure_future(call)
        expired = asyncio.ensure_future(self.drain_expired.wait())
        try:
            await asyncio.wait({task, expired}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            expired.cancel()
        if task.done():
            try:
                return task.result()
            finally:
                # A failure raised here holds this frame, which holds the task, which holds the
                # failure: a cycle that kept the whole conversation until the cyclic GC ran.
                del task
        task.add_done_callback(_ignore_outcome)
        raise Draining


def plain_facts(call: protocol.HookCall, rec: summary.Record, outcome: str) -> Facts:
    """Plain mode keeps no record of what was sent before, so it can say only what it removed."""
    removed = rec.tokens_in - rec.tokens_out if outcome.startswith("modify") else 0
    return Facts(call.provider, call.model, call.user, rec.tokens_in, rec.tokens_in - removed, 0, removed, 0)


def _ignore_outcome(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
