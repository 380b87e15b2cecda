"""Frames between hookd and a worker: a 4-byte big-endian length, then that many bytes of JSON.

Bytes, not pickles: a worker that goes wrong can at worst send bytes that fail to parse, which the
front end treats as a failed call, and neither side ever unpickles what the other wrote.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import orjson

HEADER = struct.Struct(">I")
# Two 50 MiB bodies' worth of messages plus slack; a length past this means the stream is garbled.
MAX_FRAME = 256 * 1024 * 1024


class FrameError(Exception):
    """The peer sent something that is not a frame."""


def header_for(payload: bytes) -> bytes:
    return HEADER.pack(len(payload))


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    return length


def loads(payload: bytes | bytearray) -> dict[str, Any]:
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise FrameError("frame is not a JSON object")
    return value


def encode(message: dict[str, Any]) -> bytes:
    payload = orjson.dumps(message)
    return header_for(payload) + payload


async def read(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next frame, for the front end's side (asyncio); IncompleteReadError at the end."""
    header = await reader.readexactly(HEADER.size)
    return loads(await reader.readexactly(frame_length(header)))


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    """Blocking send, for the worker side."""
    payload = orjson.dumps(message)
    sock.sendall(header_for(payload))
    sock.sendall(payload)


def receive(sock: socket.socket) -> dict[str, Any] | None:
    """Blocking receive, for the worker side; None when the front end has closed the socket."""
    header = _read_exactly(sock, HEADER.size)
    if header is None:
        return None
    payload = _read_exactly(sock, frame_length(header))
    if payload is None:
        raise FrameError("socket closed inside a frame")
    return loads(payload)


def _read_exactly(sock: socket.socket, size: int) -> bytearray | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    received = 0
    while received < size:
        count = sock.recv_into(view[received:])
        if count == 0:
            return None
        received += count
    return buffer
