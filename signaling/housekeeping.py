"""Background duties of the server: the retention sweep, dismissing lonely bots, closing sockets at shutdown.

Each is an aiohttp hook taking the app (cleanup contexts start with the app and stop with it).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from aiohttp import web

from core.errors import describe
from signaling import protocol
from signaling.protocol import CloseCode, ErrorCode
from signaling.state import STATE_KEY

log = logging.getLogger("classmood.signaling")
RETENTION_CHECK_SECONDS = 3600.0


async def close_sockets(app: web.Application) -> None:
    """on_shutdown: every open WebSocket gets 1001 going away (clients reconnect to the next server)."""
    open_sockets = [ws for ws in list(app[STATE_KEY].sockets) if not ws.closed]
    if open_sockets:
        log.info("closing %d socket(s) for shutdown", len(open_sockets))
    await asyncio.gather(*(ws.close(code=CloseCode.GOING_AWAY, message=b"server shutdown")
                           for ws in open_sockets), return_exceptions=True)


async def erase_expired_sessions(app: web.Application) -> AsyncIterator[None]:
    """storage.retention_days: erase expired sessions at start and then hourly."""
    state = app[STATE_KEY]
    days = state.settings.storage.retention_days

    async def loop() -> None:
        while True:
            try:
                erased = await asyncio.to_thread(state.store.delete_sessions_before, time.time() - days * 86400)
                if erased:
                    log.info("retention: erased %d session(s) older than %g days", len(erased), days)
            except Exception as exc:      # a database outage must not end the policy for good
                log.warning("retention: could not erase expired sessions (%s); retrying in an hour",
                            describe(exc))
            await asyncio.sleep(RETENTION_CHECK_SECONDS)
    task = asyncio.ensure_future(loop()) if days > 0 else None
    yield
    if task is not None:
        task.cancel()


async def dismiss_lonely_bots(app: web.Application) -> AsyncIterator[None]:
    """A bot left alone (no student, no teacher) for server.room_idle_seconds is dismissed: its session
    ends (reviewable and erasable) and the room, its bot and their resources are freed."""
    state = app[STATE_KEY]
    idle = state.cfg.room_idle_seconds

    async def loop() -> None:
        while True:
            await asyncio.sleep(min(60.0, max(0.2, idle / 4)))
            for room in state.registry.lonely_bots(idle):
                if room.bot is None:
                    continue
                log.info("room %s: nobody with the bot for %.0f s; dismissing it", room.room_id, idle)
                room.bot.send(protocol.error(ErrorCode.IDLE, f"nobody has been in the room for {idle:.0f} s"))
                room.bot.close(CloseCode.IDLE)
                room.alone_since = None
    task = asyncio.ensure_future(loop())
    yield
    task.cancel()
