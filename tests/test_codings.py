"""Content codings: request bodies decode within the 50 MiB cap, answers encode for standard decoders."""

from __future__ import annotations

import gzip
import os
import struct
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import brotli
import pytest
import zstandard

from hookd import codings
from hookd.codings import CorruptBody, TooLarge, UnsupportedCoding

MIB = 1024 * 1024
LIMIT = 50 * MIB
PAYLOAD = b'{"request_body": {"messages": [' + b'{"role": "user", "content": "hello"}, ' * 500 + b"{}]}}"


def gzip_bytes(data: bytes) -> bytes:
    return gzip.compress(data)


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def br_bytes(data: bytes) -> bytes:
    return brotli.compress(data)


ENCODERS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip_bytes, "zstd": zstd_bytes, "br": br_bytes}


def decode(body: bytes, header: str, limit: int = LIMIT) -> bytes:
    """What the server does with a body and its Content-Encoding header."""
    return bytes(codings.decode(body, codings.parse_content_encoding(header), limit))


# --- parse_content_encoding ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, []),
        ("", []),
        ("identity", []),
        ("gzip", ["gzip"]),
        ("x-gzip", ["gzip"]),
        ("GZip", ["gzip"]),
        ("zstd", ["zstd"]),
        ("br", ["br"]),
        ("gzip, zstd", ["gzip", "zstd"]),
        ("gzip,identity , br", ["gzip", "br"]),
    ],
)
def test_parse_content_encoding_lists_codings_in_applied_order(header: str | None, expected: list[str]) -> None:
    assert codings.parse_content_encoding(header) == expected


@pytest.mark.parametrize("header", ["compress", "deflate", "foo", "gzip, deflate", "x-compress"])
def test_parse_content_encoding_rejects_codings_we_do_not_decode(header: str) -> None:
    with pytest.raises(UnsupportedCoding):
        codings.parse_content_encoding(header)


def test_unsupported_coding_names_the_offending_coding() -> None:
    with pytest.raises(UnsupportedCoding, match="deflate"):
        codings.parse_content_encoding("gzip, deflate")


# --- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_round_trip_in_each_coding(coding: str) -> None:
    assert decode(ENCODERS[coding](PAYLOAD), coding) == PAYLOAD


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_round_trip_of_incompressible_data(coding: str) -> None:
    data = os.urandom(300 * 1024)
    assert decode(ENCODERS[coding](data), coding) == data


def test_identity_body_comes_back_unchanged() -> None:
    assert decode(PAYLOAD, "identity") == PAYLOAD
    assert decode(PAYLOAD, "") == PAYLOAD


def test_x_gzip_is_gzip() -> None:
    assert decode(gzip_bytes(PAYLOAD), "x-gzip") == PAYLOAD


def test_stacked_codings_are_undone_last_applied_first() -> None:
    # "gzip, zstd": the sender gzipped first, then zstd-compressed the gzip stream.
    body = zstd_bytes(gzip_bytes(PAYLOAD))
    assert decode(body, "gzip, zstd") == PAYLOAD


def test_stacked_codings_in_the_wrong_order_are_corrupt() -> None:
    body = zstd_bytes(gzip_bytes(PAYLOAD))
    with pytest.raises(CorruptBody):
        decode(body, "zstd, gzip")


def test_three_stacked_codings() -> None:
    body = br_bytes(zstd_bytes(gzip_bytes(PAYLOAD)))
    assert decode(body, "gzip, zstd, br") == PAYLOAD


def test_multi_member_gzip_is_decoded_whole() -> None:
    body = gzip_bytes(b"first member, ") + gzip_bytes(b"second member, ") + gzip_bytes(b"third")
    assert decode(body, "gzip") == b"first member, second member, third"


def test_multi_frame_zstd_is_decoded_whole() -> None:
    body = zstd_bytes(b"first frame, ") + zstd_bytes(b"second frame")
    assert decode(body, "zstd") == b"first frame, second frame"


def test_many_small_zstd_frames_are_decoded_in_order() -> None:
    parts = [b"part %d;" % i for i in range(300)]
    body = b"".join(zstd_bytes(part) for part in parts)
    assert decode(body, "zstd") == b"".join(parts)


def test_zstd_skippable_frame_is_skipped() -> None:
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"meta"
    assert decode(skippable + zstd_bytes(PAYLOAD), "zstd") == PAYLOAD


@pytest.mark.parametrize("coding", ["zstd", "br"])
def test_compressed_empty_payload_round_trips(coding: str) -> None:
    assert decode(ENCODERS[coding](b""), coding) == b""


def test_gzip_of_an_empty_payload_round_trips() -> None:
    assert decode(gzip_bytes(b""), "gzip") == b""


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_zero_byte_body_decodes_to_nothing(coding: str) -> None:
    assert decode(b"", coding) == b""


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_body_of_a_few_mib_round_trips(coding: str) -> None:
    data = (b"line of a long tool result %d\n" * 200_000)[: 5 * MIB]
    assert decode(ENCODERS[coding](data), coding) == data


# --- truncated and corrupt bodies -------------------------------------------------------------------


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated_body_is_corrupt(coding: str, keep: float) -> None:
    body = ENCODERS[coding](PAYLOAD + os.urandom(2000))
    with pytest.raises(CorruptBody):
        decode(body[: int(len(body) * keep)], coding)


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_body_missing_only_its_last_byte_is_corrupt(coding: str) -> None:
    body = ENCODERS[coding](PAYLOAD)
    with pytest.raises(CorruptBody):
        decode(body[:-1], coding)


def test_truncated_zstd_frame_after_a_complete_one_is_corrupt() -> None:
    second = zstd_bytes(PAYLOAD)
    with pytest.raises(CorruptBody):
        decode(zstd_bytes(b"complete") + second[: len(second) // 2], "zstd")


def test_truncated_second_gzip_member_is_corrupt() -> None:
    second = gzip_bytes(PAYLOAD)
    with pytest.raises(CorruptBody):
        decode(gzip_bytes(b"complete") + second[: len(second) // 2], "gzip")


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_plain_text_claiming_a_coding_is_corrupt(coding: str) -> None:
    with pytest.raises(CorruptBody):
        decode(b'{"action": "this was never compressed"}', coding)


def test_gzip_with_a_flipped_byte_fails_its_crc() -> None:
    body = bytearray(gzip_bytes(PAYLOAD))
    body[len(body) // 2] ^= 0xFF
    with pytest.raises(CorruptBody):
        decode(bytes(body), "gzip")


def test_gzip_with_a_wrong_crc_is_corrupt() -> None:
    body = bytearray(gzip_bytes(PAYLOAD))
    body[-8] ^= 0x01  # the CRC-32 in the trailer
    with pytest.raises(CorruptBody):
        decode(bytes(body), "gzip")


def test_zstd_with_a_bad_magic_number_is_corrupt() -> None:
    body = bytearray(zstd_bytes(PAYLOAD))
    body[0] ^= 0xFF
    with pytest.raises(CorruptBody):
        decode(bytes(body), "zstd")


def test_zstd_with_a_checksum_and_a_flipped_byte_is_corrupt() -> None:
    body = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(4000)))
    body[len(body) // 2] ^= 0xFF
    with pytest.raises(CorruptBody):
        decode(bytes(body), "zstd")


def test_brotli_with_trailing_garbage_is_corrupt() -> None:
    with pytest.raises(CorruptBody):
        decode(br_bytes(PAYLOAD) + b"garbage after the stream", "br")


def test_zstd_frame_asking_for_a_huge_window_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters(window_log=27)  # 128 MiB, past our 16 MiB cap
    compressor = zstandard.ZstdCompressor(compression_params=params).compressobj()
    body = compressor.compress(b"tiny") + compressor.flush()
    with pytest.raises(CorruptBody):
        decode(body, "zstd")


# --- size cap and decompression bombs ---------------------------------------------------------------


def zero_chunks(total: int = 1024 * MIB, step: int = MIB) -> Iterator[bytes]:
    chunk = bytes(step)
    for _ in range(total // step):
        yield chunk


def gzip_bomb() -> bytes:
    compressor = zlib.compressobj(level=1, wbits=16 + zlib.MAX_WBITS)
    parts = [compressor.compress(chunk) for chunk in zero_chunks()]
    return b"".join([*parts, compressor.flush()])


def zstd_bomb() -> bytes:
    compressor = zstandard.ZstdCompressor().compressobj()
    parts = [compressor.compress(chunk) for chunk in zero_chunks()]
    return b"".join([*parts, compressor.flush()])


def br_bomb() -> bytes:
    compressor = brotli.Compressor(quality=1)  # the default quality takes ~30 s on 1 GiB
    parts = [compressor.process(chunk) for chunk in zero_chunks()]
    return b"".join([*parts, compressor.finish()])


BOMBS: dict[str, Callable[[], bytes]] = {"gzip": gzip_bomb, "zstd": zstd_bomb, "br": br_bomb}


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    """1 GiB of zeros in each coding, built without ever holding the 1 GiB."""
    return {coding: build() for coding, build in BOMBS.items()}


def decode_measuring_peak(body: bytes, coding: str, limit: int) -> tuple[BaseException | None, int]:
    """Decode, returning what it raised and the peak bytes allocated while it ran."""
    raised: BaseException | None = None
    tracemalloc.start()
    try:
        codings.decode(body, [coding], limit)
    except Exception as exc:
        raised = exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return raised, peak


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_bomb_is_too_large(bombs: dict[str, bytes], coding: str) -> None:
    assert len(bombs[coding]) < 5 * MIB  # the point of a bomb: small on the wire
    raised, _ = decode_measuring_peak(bombs[coding], coding, LIMIT)
    assert isinstance(raised, TooLarge)


@pytest.mark.parametrize(
    "coding",
    [
        "gzip",
        "zstd",
        "br",
    ],
)
def test_bomb_decode_peak_memory_stays_under_100_mb(bombs: dict[str, bytes], coding: str) -> None:
    raised, peak = decode_measuring_peak(bombs[coding], coding, LIMIT)
    assert isinstance(raised, TooLarge)
    assert peak < 100_000_000, f"peak {peak / 1e6:.1f} MB"


def test_stacked_bomb_is_too_large(bombs: dict[str, bytes]) -> None:
    inner = bombs["gzip"]  # ~4.5 MiB of gzip, itself compressed again
    raised, _ = decode_measuring_peak(zstd_bytes(inner), "zstd", LIMIT)
    assert raised is None  # the outer layer alone is small
    with pytest.raises(TooLarge):
        decode(zstd_bytes(inner), "gzip, zstd")


@pytest.mark.parametrize(
    "coding",
    [
        "gzip",
        "zstd",
        "br",
    ],
)
def test_body_just_under_the_limit_decodes(coding: str) -> None:
    data = bytes(LIMIT - 1)
    assert len(codings.decode(ENCODERS[coding](data), [coding], LIMIT)) == LIMIT - 1


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_body_one_byte_over_a_small_limit_is_too_large(coding: str) -> None:
    data = os.urandom(1000)
    assert bytes(codings.decode(ENCODERS[coding](data), [coding], 1000)) == data
    with pytest.raises(TooLarge):
        codings.decode(ENCODERS[coding](data), [coding], 999)


# --- choose_response_coding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip", "gzip"),
        ("x-gzip", "gzip"),
        ("br", "br"),
        ("gzip, deflate, br, zstd", "zstd"),
        ("gzip, deflate, br", "br"),
        ("br;q=0.5, gzip;q=0.8", "gzip"),
        ("zstd;q=0.1, br;q=0.2, gzip;q=0.3", "gzip"),
        ("GZIP ; Q=0.5", "gzip"),
        ("*", "zstd"),
        ("*;q=0.5, gzip", "gzip"),
        ("zstd;q=0, *", "br"),
        ("identity", None),
        ("deflate, compress", None),
        ("gzip;q=0", None),
        ("*;q=0", None),
        ("", None),
        (None, None),
    ],
)
def test_choose_response_coding(accept: str | None, expected: str | None) -> None:
    assert codings.choose_response_coding(accept) == expected


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("gzip;q=abc", None),
        ("gzip;q=", None),
        ("gzip;q=nan", None),
        ("gzip;q=-1", None),
        ("gzip;q=7", "gzip"),
        ("zstd;q=bogus, gzip", "gzip"),
        ("br;q=1e400, gzip;q=0.9", "br"),
        ("gzip;level=9", "gzip"),
        (";;;,,,", None),
    ],
)
def test_choose_response_coding_survives_garbage_q_values(accept: str, expected: str | None) -> None:
    assert codings.choose_response_coding(accept) == expected


# --- encode -----------------------------------------------------------------------------------------


STANDARD_DECODERS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.decompress,
    "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
    "br": brotli.decompress,
}


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_encode_round_trips_with_standard_decoders(coding: str) -> None:
    encoded = codings.encode(PAYLOAD, coding)
    assert len(encoded) < len(PAYLOAD)
    assert STANDARD_DECODERS[coding](encoded) == PAYLOAD


@pytest.mark.parametrize("coding", ["gzip", "zstd", "br"])
def test_encode_round_trips_with_our_decoder(coding: str) -> None:
    assert decode(codings.encode(PAYLOAD, coding), coding) == PAYLOAD


def test_encoded_zstd_carries_its_content_size_for_one_shot_decoders() -> None:
    assert zstandard.ZstdDecompressor().decompress(codings.encode(PAYLOAD, "zstd")) == PAYLOAD


def test_everything_we_advertise_we_can_encode_and_decode() -> None:
    advertised = [name.strip() for name in codings.ACCEPT_ENCODING.split(",")]
    assert sorted(advertised) == sorted(codings.SUPPORTED)
    for coding in advertised:
        assert decode(codings.encode(PAYLOAD, coding), coding) == PAYLOAD
