"""Limits at the connection level, below HTTP: how long a client may take to send its first request head,
and how many connections one address (IPv6: its /64) may hold open.

aiohttp has no header-read timeout of its own: its keep-alive timer starts when the connection opens (so a
silent connection closes after `keepalive_timeout`), but that timer is also the idle timeout between
requests, and with aiohttp's default (an hour) 300 connections trickling one header byte every 5 s stayed
open for minutes (issue 23). So:
- `server.idle_timeout_seconds` is aiohttp's keep-alive timeout (create_app passes it in `handler_args`):
  a connection that has not sent a complete request head that long after its last response is closed;
  data trickling in does not extend it.
- `server.header_timeout_seconds`: a new connection whose first request head is not complete by then is
  cut, whatever it has sent (the watchdog below; a request reaching the app counts as complete).
- `server.max_connections_per_address`: beyond it, a new connection from that address is cut at once.
  Behind a trusted reverse proxy the TCP peer is the proxy, so its connections are counted under the
  forwarded client address once their first request shows it (and refused with 429 beyond the cap); a
  proxy that multiplexes several clients over one upstream connection is counted by the client of the
  latest request on it.
- Bodies: the only handler that reads one (POST /api/rooms) reads it within `server.body_timeout_seconds`.

ServerRunner is a drop-in for web.AppRunner that installs the watchdog on the server it creates; an app
served by a plain AppRunner still gets the idle timeout, but no header watchdog or connection cap.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from signaling.forwarded import Network, address_block

log = logging.getLogger("classmood.signaling")


class ConnectionGuard:
    def __init__(self, header_timeout: float, max_per_address: int, trusted: Sequence[Network] = ()) -> None:
        self.header_timeout = header_timeout
        self.max_per_address = max_per_address
        self.trusted = list(trusted)
        self.open: dict[str, int] = {}                 # open connections per address block
        self._block: dict[Any, str | None] = {}        # handler -> the block it is counted under (None: a proxy's, not yet known)
        self._timers: dict[Any, asyncio.TimerHandle] = {}
        self._warned: set[str] = set()                 # blocks at their cap that were logged (once per episode)

    # ---- hooks on aiohttp's web.Server --------------------------------------------------------------
    def install(self, server: web.Server) -> None:
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.connection_made(handler, transport)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self.connection_lost(handler)
            lost(handler, exc)
        server.connection_made = connection_made      # type: ignore[method-assign]
        server.connection_lost = connection_lost      # type: ignore[method-assign]

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, (tuple, list)) and peer else None
        block = None if self._is_proxy(host) else address_block(host)
        if block is not None and not self._count(block):
            transport.abort()                          # never counted: connection_lost finds nothing to undo
            return
        self._block[handler] = block
        if self.header_timeout > 0:
            self._timers[handler] = asyncio.get_running_loop().call_later(
                self.header_timeout, self._head_deadline, handler, transport)

    def connection_lost(self, handler: Any) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        block = self._block.pop(handler, None)
        if block is not None:
            self._uncount(block)

    def _head_deadline(self, handler: Any, transport: asyncio.Transport) -> None:
        self._timers.pop(handler, None)
        log.info("closing a connection from %s: no complete request within %.0f s",
                 self._block.get(handler) or "a proxy", self.header_timeout)
        transport.abort()

    # ---- from the app, once a request head is complete ---------------------------------------------
    def request_started(self, request: web.BaseRequest, client: str) -> bool:
        """Called by the middleware for every request. False: the connection is over its address's cap
        (a proxied connection that just showed whose it is)."""
        handler = request.protocol
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        if handler not in self._block:
            return True                                # served by a plain AppRunner: no accounting
        current = self._block[handler]
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        if current is not None or not self._is_proxy(peer[0] if peer else None):
            return True
        block = address_block(client)
        if not self._count(block):
            return False
        self._block[handler] = block
        return True

    # ---- counting ------------------------------------------------------------------------------------
    def _count(self, block: str) -> bool:
        n = self.open.get(block, 0)
        if self.max_per_address > 0 and n >= self.max_per_address:
            if block not in self._warned:
                self._warned.add(block)
                log.warning("%s has %d connections open (server.max_connections_per_address); refusing more",
                            block, n)
            return False
        self.open[block] = n + 1
        return True

    def _uncount(self, block: str) -> None:
        n = self.open.get(block, 0) - 1
        if n <= 0:
            self.open.pop(block, None)
        else:
            self.open[block] = n
        if n < self.max_per_address:
            self._warned.discard(block)

    def _is_proxy(self, host: str | None) -> bool:
        if not self.trusted or not host:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted if net.version == ip.version)


GUARD_KEY = web.AppKey("connection_guard", ConnectionGuard)


def guard_middleware(guard: ConnectionGuard) -> Middleware:
    from signaling.middleware import client_of

    @web.middleware
    async def guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not guard.request_started(request, client_of(request)):
            refused = web.json_response({"error": "too many connections from your address"}, status=429,
                                        headers={"Retry-After": "10"})
            refused.force_close()
            return refused
        return await handler(request)
    return guarded


class ServerRunner(web.AppRunner):
    """web.AppRunner plus the connection guard of an app made by signaling.app.create_app."""

    async def setup(self) -> None:
        await super().setup()
        guard = self.app.get(GUARD_KEY)
        if guard is not None and self.server is not None:
            guard.install(self.server)
