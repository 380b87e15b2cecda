"""Content codings (RFC 7694): decode request bodies within a size cap, encode answers.

Decoding is hand-written around each library's incremental decoder rather than its one-shot call
because the one-shot calls (`zlib.decompress`, `ZstdDecompressor().decompress`, `brotli.decompress`)
have no output cap: a 1 GiB bomb would be fully materialised before we could look at its size.
Each loop below stops as soon as the decoded size passes the cap.
"""

from __future__ import annotations

import zlib

import brotli
import zstandard
from isal import igzip

SUPPORTED = ("zstd", "br", "gzip")
ACCEPT_ENCODING = "zstd, br, gzip"
ALIASES = {"x-gzip": "gzip"}

OUTPUT_STEP = 1024 * 1024
BROTLI_INPUT_STEP = 64 * 1024
# A zstd block decodes to at most 128 KiB and takes at least 4 bytes on the wire (an RLE block),
# so one input byte can never yield more than 32 KiB: 256 input bytes yield at most 8 MiB, which
# bounds each step's output (zstandard's incremental decoder has no output limit of its own).
ZSTD_INPUT_STEP = 256
# Legitimate senders stay far below this window (zstd level 19 uses 8 MiB); a frame asking for
# more is refused rather than allowed to allocate up to zstd's default 128 MiB.
ZSTD_MAX_WINDOW = 16 * 1024 * 1024

# Small answers (`{"action":"allow"}`) grow when encoded; only bodies above this are encoded.
MIN_ENCODE_BYTES = 1024


class UnsupportedCoding(Exception):
    """A Content-Encoding we do not decode: the caller should retry with one we advertise."""


class CorruptBody(Exception):
    """The body does not decode in the coding it claims."""


class TooLarge(Exception):
    """The decoded body passed the cap."""


def parse_content_encoding(header: str | None) -> list[str]:
    """The codings applied to the body, in the order they were applied; identity dropped."""
    if not header:
        return []
    codings = []
    for token in header.split(","):
        coding = token.strip().lower()
        coding = ALIASES.get(coding, coding)
        if coding in ("", "identity"):
            continue
        if coding not in SUPPORTED:
            raise UnsupportedCoding(coding)
        codings.append(coding)
    return codings


def decode(body: bytes | bytearray, codings: list[str], limit: int) -> bytes | bytearray:
    """Undo `codings` (last applied first), never holding more than `limit` + one step."""
    for coding in reversed(codings):
        body = DECODERS[coding](body, limit)
    return body


def _check(out: bytearray, limit: int) -> None:
    if len(out) > limit:
        raise TooLarge(f"decoded body exceeds {limit} bytes")


def _gunzip(data: bytes | bytearray, limit: int) -> bytearray:
    out = bytearray()
    pending: bytes | bytearray = data
    while pending:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            while not decoder.eof:
                chunk = decoder.decompress(pending, OUTPUT_STEP)
                out += chunk
                _check(out, limit)
                pending = decoder.unconsumed_tail
                if not (pending or chunk or decoder.eof):
                    raise CorruptBody("gzip stream is truncated")
        except zlib.error as exc:
            raise CorruptBody(f"gzip: {exc}") from None
        # RFC 1952 allows several members back to back; each starts a fresh decoder.
        pending = decoder.unused_data
    return out


def _unzstd(data: bytes | bytearray, limit: int) -> bytearray:
    out = bytearray()
    view = memoryview(data)
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    decoder = dctx.decompressobj()
    in_frame = False
    pos = 0
    try:
        while pos < len(view):
            chunk = view[pos : pos + ZSTD_INPUT_STEP]
            pos += len(chunk)
            out += decoder.decompress(chunk)
            in_frame = True
            _check(out, limit)
            if decoder.eof:
                # Frames may follow each other; rewind to where the next one starts.
                pos -= len(decoder.unused_data)
                decoder = dctx.decompressobj()
                in_frame = False
    except zstandard.ZstdError as exc:
        raise CorruptBody(f"zstd: {exc}") from None
    if in_frame:
        # The incremental decoder does not complain about a frame cut short; we do.
        raise CorruptBody("zstd frame is truncated")
    return out


def _unbrotli(data: bytes | bytearray, limit: int) -> bytearray:
    out = bytearray()
    decoder = brotli.Decompressor()
    view = memoryview(data)
    try:
        for pos in range(0, len(view), BROTLI_INPUT_STEP):
            out += decoder.process(bytes(view[pos : pos + BROTLI_INPUT_STEP]), output_buffer_limit=OUTPUT_STEP)
            _check(out, limit)
            while not decoder.can_accept_more_data():
                out += decoder.process(b"", output_buffer_limit=OUTPUT_STEP)
                _check(out, limit)
        # The decoder may still hold output after its input is all taken.
        while not decoder.is_finished() and (more := decoder.process(b"", output_buffer_limit=OUTPUT_STEP)):
            out += more
            _check(out, limit)
    except brotli.error as exc:
        raise CorruptBody(f"brotli: {exc}") from None
    if view and not decoder.is_finished():
        raise CorruptBody("brotli stream is truncated")
    return out


DECODERS = {"gzip": _gunzip, "zstd": _unzstd, "br": _unbrotli}


def choose_response_coding(accept_encoding: str | None) -> str | None:
    """The coding to answer in: the caller's highest q-value among ours, ties going zstd, br, gzip."""
    if not accept_encoding:
        return None
    weights: dict[str, float] = {}
    for item in accept_encoding.split(","):
        name, _, params = item.partition(";")
        name = ALIASES.get(name.strip().lower(), name.strip().lower())
        weights[name] = _q_value(params)
    best: str | None = None
    best_q = 0.0
    for coding in SUPPORTED:
        q = weights.get(coding, weights.get("*", 0.0))
        if q > best_q:
            best, best_q = coding, q
    return best


def _q_value(params: str) -> float:
    for param in params.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


def encode(body: bytes, coding: str) -> bytes:
    """The answer in `coding`, at the fastest level of each: the answer crosses loopback or a
    tailnet, and CPU spent here is latency added to every request (~2 ms per MB for each)."""
    if coding == "zstd":
        return zstandard.ZstdCompressor(level=1).compress(body)
    if coding == "br":
        return brotli.compress(body, quality=1)
    # ISA-L's gzip is 4x faster than zlib's at the same size (1.9 vs 7.1 ms for a 1.1 MB answer),
    # and gzip is what Aperture's Go client asks for.
    return igzip.compress(body, compresslevel=1)
