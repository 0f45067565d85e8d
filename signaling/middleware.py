"""What every response goes through: security headers, the client's address, the access log."""
from __future__ import annotations

import re
from typing import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler, Middleware

from signaling.forwarded import Network as IPNetwork
from signaling.forwarded import client_address

# connect-src: 'self' covers same-origin http(s) only; the page's WebSocket to this same server needs its
# ws(s):// origin spelled out (own_origin_csp), never "ws: wss:", which would let a script talk to any host.
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SERVER_NAME = "classmood"     # the Server header: no product versions to look up vulnerabilities by
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=()",   # a meeting needs both
    "Cross-Origin-Opener-Policy": "same-origin",
}

INGEST_SECRET = re.compile(r"^(/ingest/[^/]*/)[^/]+")   # the secret in a meeting-bot service's URL (signaling/ingest.py)
# request key: the client's address, past trusted reverse proxies (None: unknown, e.g. a unix socket)
CLIENT: web.RequestKey[str | None] = web.RequestKey("client")


def client_of(request: web.BaseRequest) -> str:
    """The address limits and logs use (set by the client_address middleware; the peer otherwise)."""
    return request.get(CLIENT) or request.remote or "?"


class AccessLogger(AbstractAccessLogger):
    """Access log without query strings (student links carry the join key in `?k=`) or ingest secrets."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info("%s %s %s %s %.1fms", client_of(request), request.method,
                         INGEST_SECRET.sub(r"\1***", request.path),
                         response.status, time * 1000)


@web.middleware
async def security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    if not response.prepared:      # streamed responses (CSV, WebSocket) set theirs before prepare
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    if isinstance(response, web.HTTPException):
        raise response
    return response


def client_address_middleware(trusted: list[IPNetwork]) -> Middleware:
    @web.middleware
    async def resolve_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        request[CLIENT] = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted)
        return await handler(request)
    return resolve_client


def own_origin_csp(public_url: str, scheme: str, host: str | None) -> str:
    """CSP whose connect-src allows WebSockets to this server only: the origin of server.public_url when
    set, else the host the request came to (a Host header that is not a plain host[:port] gets no entry)."""
    if public_url:
        parts = urlsplit(public_url)
        scheme, host = parts.scheme, parts.netloc
    if not host or not _HOST.match(host):
        return CSP
    ws = "wss" if scheme == "https" else "ws"
    return CSP.replace("connect-src 'self'", f"connect-src 'self' {ws}://{host}")


def response_headers(public_url: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """on_response_prepare: every response the app sends (WebSocket, streamed CSV, static files too)
    names no server version, and a page's CSP allows sockets to this server's own origin only."""
    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_NAME
        if "Content-Security-Policy" in response.headers:
            response.headers["Content-Security-Policy"] = own_origin_csp(public_url, request.scheme, request.host)
    return prepare


def with_headers(response: web.StreamResponse) -> web.StreamResponse:
    """PAGE_HEADERS on a response that is prepared by its handler (the middleware comes too late)."""
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response
