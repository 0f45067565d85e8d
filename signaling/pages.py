"""The student, teacher and review pages and their static assets (signaling/static by default)."""
from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from signaling.state import state_of


def page(name: str) -> Handler:
    """A handler serving one page of the static folder (never cached: it carries the current scripts)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        path = state_of(request).static / name
        if not path.is_file():
            raise web.HTTPNotFound(text="page not installed")
        return web.FileResponse(path, headers={"Cache-Control": "no-store"})
    return handler


async def static_file(request: web.Request) -> web.StreamResponse:
    static = state_of(request).static
    name = request.match_info["name"]
    if not name or name.startswith(".") or any(c in name for c in "/\\\x00:") or ".." in name:
        raise web.HTTPNotFound()
    path = (static / name).resolve()
    if path.parent != static or not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
