"""Secrets: token hashes, the derived bot token, constant-time comparison, the Bearer header."""
from __future__ import annotations

import base64
import hashlib
import hmac

from aiohttp import web

from signaling import protocol


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bot_token_for(room_id: str, secret: str) -> str:
    """The room's bot token (what an invite hands a worker): derived, not random, so that a bot can
    rejoin its room after the server restarts or unloads the room. Only the server and the workers know
    the secret (the worker key), and workers are already trusted with every invite."""
    digest = hmac.new(secret.encode("utf-8", "surrogatepass"), b"classmood bot token\x00" + room_id.encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def same(a: str, b: str) -> bool:
    """Constant-time equality of two secrets (a timing difference would leak how much of a guess is right)."""
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and protocol.TOKEN_RE.match(value) else None
