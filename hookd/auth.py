"""Who may call the hook and who may change its settings.

Aperture sends a hook's `apikey` as `Authorization: Bearer <key>` or `X-Api-Key: <key>`,
depending on the hook's `authorization` setting, so both are accepted. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
from pathlib import Path

from aiohttp import web


class TokenFileError(Exception):
    """The token file is missing, unreadable or empty."""


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    return token


def presented(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    api_key = request.headers.get("X-Api-Key", "").strip()
    return api_key or None


def allowed(request: web.Request, token: str | None) -> bool:
    """True when no token is required, or the request carries the right one."""
    if token is None:
        return True
    offered = presented(request)
    return offered is not None and hmac.compare_digest(offered.encode(), token.encode())


def from_loopback(request: web.Request) -> bool:
    try:
        return ipaddress.ip_address((request.remote or "").split("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
