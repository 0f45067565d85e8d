"""Background duties of the server: the retention sweep, dismissing lonely bots, handing the rooms of a dead
bot worker to live ones, closing sockets at shutdown.

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
from signaling.rooms import INVITE_PENDING_S, TooManyRooms
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
                # ended_at: when the last person left, the class's true end (the bot ends its session then,
                # not server.room_idle_seconds later).
                alone_for = time.monotonic() - (room.alone_since or time.monotonic())
                room.bot.send({**protocol.error(ErrorCode.IDLE, f"nobody has been in the room for {idle:.0f} s"),
                               "ended_at": time.time() - alone_for})
                room.bot.close(CloseCode.IDLE)
                room.alone_since = None
                room.session_id = None     # over: the next invite starts a new session
                try:     # and nobody is sent back to the room when the bot's lease runs out
                    await asyncio.to_thread(state.store.release_room, room.room_id)
                except Exception as exc:
                    log.warning("room %s: could not release its assignment (%s)", room.room_id, describe(exc))
    task = asyncio.ensure_future(loop())
    yield
    task.cancel()


REASSIGN_CHECK_SECONDS = 1.0     # how often the server looks for expired leases (at most; see below)


async def reassign_orphaned_rooms(app: web.Application) -> AsyncIterator[None]:
    """A bot worker renews the lease of each room it serves in the database (room_assignments); one that
    stops (kill -9, a frozen machine, cut off from the database) stops renewing. Every second this server
    claims rooms whose lease ran out, atomically (another server instance never claims the same room), for
    its least busy connected worker, and sends that worker the room's bot token as an ordinary invite; the
    new bot continues the room's session (resume_or_start_session), the students re-offer their video to it.
    A worker that was only slow and still holds the room learns at its next renewal that it lost the room
    and leaves (its socket would otherwise be replaced by the new bot's hello: 4409)."""
    state = app[STATE_KEY]
    period = min(REASSIGN_CHECK_SECONDS, state.cfg.worker_lease_seconds / 5)

    async def reassign() -> int:
        moved = 0
        while True:
            workers = state.registry.pick_workers()
            if not workers:
                return moved            # the leases stay expired until a worker connects
            worker = workers[0]
            row = await asyncio.to_thread(state.store.claim_expired_room, worker.peer_id, time.time(),
                                          time.time() + INVITE_PENDING_S)
            if row is None:
                return moved
            room_id = str(row["room_id"])
            try:
                room = await state.live_room(room_id)
            except TooManyRooms:
                room = None
            if room is None:             # erased meanwhile, or this server is full: try again next round
                log.warning("room %s: cannot reassign it here (unknown room or server full)", room_id)
                if (await asyncio.to_thread(state.store.get_room, room_id)) is None:
                    await asyncio.to_thread(state.store.release_room, room_id)
                return moved
            if room.session_id is None and row.get("session_id"):
                # A restarted server: the session the dead worker was recording is in the database only.
                room.session_id = str(row["session_id"])
            if worker.send(protocol.invite(room.room_id, room.bot_token)):
                room.worker_id, room.invited_at = worker.peer_id, time.monotonic()
                moved += 1
                log.warning("room %s: the lease of worker %s ran out; invited worker %s (session %s)", room_id,
                            row.get("worker_id"), worker.peer_id, room.session_id or "new")

    async def loop() -> None:
        while True:
            await asyncio.sleep(period)
            try:
                await reassign()
            except Exception as exc:    # a database outage: leases cannot be read; the next round retries
                log.warning("could not check the bot workers' leases (%s)", describe(exc))
    task = asyncio.ensure_future(loop())
    yield
    task.cancel()
