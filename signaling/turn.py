"""Per-connection TURN credentials, coturn's TURN REST API (coturn: use-auth-secret + static-auth-secret).

A static TURN username/password handed to every student (the compose file used to) lets anyone who once
joined a class relay traffic through the school's TURN server for ever. Instead the server mints, for each
connection, username "<expiry unix time>:<peer id>" and credential base64(HMAC-SHA1(secret, username));
coturn recomputes the HMAC with the shared secret and refuses a username whose time has passed.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from typing import Any


def turn_credential(secret: str, username: str) -> str:
    return base64.b64encode(hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()).decode()


def turn_server(urls: list[str], secret: str, ttl_seconds: float, who: str, now: float | None = None) -> dict[str, Any]:
    """One RTCIceServer entry for `who` (a peer id), valid for `ttl_seconds` from `now`."""
    expiry = int((time.time() if now is None else now) + ttl_seconds)
    username = f"{expiry}:{who}"
    return {"urls": list(urls), "username": username, "credential": turn_credential(secret, username)}


def turn_urls(setting: str) -> list[str]:
    """server.turn_urls, comma-separated."""
    return [u.strip() for u in setting.split(",") if u.strip()]
