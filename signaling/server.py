"""The signaling server's public entry point: `create_app(settings, store=..., static_dir=...)`.

Kept so that callers (bot/__main__.py, signaling/__main__.py, tests) import one stable name; the server
itself is split by concern, see signaling/app.py. docs/architecture.md is the contract.
"""
from __future__ import annotations

from signaling.app import STATIC_DIR, create_app
from signaling.auth import bot_token_for, token_hash
from signaling.guard import ServerRunner
from signaling.middleware import CSP, PAGE_HEADERS, AccessLogger
from signaling.state import REGISTRY_KEY, SETTINGS_KEY, SOCKETS_KEY, STATE_KEY, ServerState
from signaling.store import Store

__all__ = ["create_app", "ServerRunner", "AccessLogger", "Store", "token_hash", "bot_token_for", "CSP", "PAGE_HEADERS",
           "STATIC_DIR", "ServerState", "STATE_KEY", "SETTINGS_KEY", "REGISTRY_KEY", "SOCKETS_KEY"]
