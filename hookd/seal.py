"""What hookd puts in a shared store reveals nothing: the key file, sealed values, opaque names.

Conversation records hold what went upstream, so a Redis dump, a replica of it or `MONITOR` must
show nothing readable. Values are sealed with AES-GCM under a key derived from the operator's key
file, each bound to the place it is stored at (so a value copied to another key does not open),
and names are keyed digests, so no key name carries content, nor a plain digest of it that a
guess could be checked against.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MIN_KEY_BYTES = 32
NONCE = 12
# The first byte of every sealed value: a later format or key scheme can tell its own apart.
VERSION = b"\x01"
NAME_BYTES = 16


class KeyFileError(Exception):
    """The key file is missing, unreadable or too short to be a key."""


class Unreadable(Exception):
    """A sealed value that does not open with our key: another key, or not ours at all."""


def read_key(path: Path) -> bytes:
    """The key file's secret: at least 32 bytes, in any form (raw, hex, base64); surrounding
    whitespace is not part of it, so `openssl rand -base64 32 > FILE` works as it is."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise KeyFileError(
            f"key file {path} holds {len(secret)} bytes; it needs at least {MIN_KEY_BYTES} random ones "
            "(make one with: openssl rand -base64 32 > FILE)"
        )
    return secret


def _derive(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"hookd shared state: " + purpose).derive(secret)


class Sealer:
    def __init__(self, secret: bytes) -> None:
        # Separate keys for sealing and naming: neither use can say anything about the other.
        self.aead = AESGCM(_derive(secret, b"values v1"))
        self.naming = _derive(secret, b"names v1")

    def name(self, data: bytes) -> bytes:
        """A name for `data` that is the same on every replica with this key and means nothing
        to anyone without it."""
        return hashlib.blake2b(data, key=self.naming, digest_size=NAME_BYTES).digest()

    def seal(self, plain: bytes, place: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return VERSION + nonce + self.aead.encrypt(nonce, plain, place)

    def open(self, sealed: bytes, place: bytes) -> bytes:
        if sealed[:1] != VERSION or len(sealed) < 1 + NONCE:
            raise Unreadable("not a sealed value")
        try:
            return self.aead.decrypt(sealed[1 : 1 + NONCE], sealed[1 + NONCE :], place)
        except InvalidTag:
            raise Unreadable("sealed with another key, or altered") from None
