"""The end of a class and what the teacher page reloads: POST /api/rooms/{room}/end (the End class button)
and GET /api/sessions/{sid}/alerts (the alert feed, acknowledgements included, after a reload).

Ending a class: everyone in the room gets `{"type":"class_ended","session_id","ended_at"}`; the bot ends
its session at that time and leaves (the server waits for it briefly, so its last writes land first);
every socket is then closed with 4411; the store marks the session ended at `ended_at` (so the review
shows it ended at once, even when the bot is gone or runs elsewhere); the room forgets the session, so
the next invite starts a new one instead of resuming this one.
"""
from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from signaling import protocol
from signaling.api import authorise, review_access
from signaling.protocol import CloseCode, MessageType
from signaling.rooms import Room
from signaling.state import state_of

log = logging.getLogger("classmood.signaling")
# How long End class waits for the bot to end its session and leave before closing its socket itself.
BOT_LEAVE_WAIT_S = 5.0


async def end_class(request: web.Request) -> web.Response:
    state = state_of(request)
    record = await authorise(request, request.match_info["room"])
    if isinstance(record, web.Response):
        return record
    room_id = record["room_id"]
    ended_at = time.time()
    # The class is over: no worker is to be sent back here when the bot's lease runs out.
    await asyncio.to_thread(state.store.release_room, room_id)
    room = state.registry.get(room_id)
    live_session = room.session_id if room is not None else None
    if room is not None:
        await _empty_the_room(room, ended_at)
    # The live session, or (no bot, e.g. after a server restart) any session of the room left open: the
    # teacher says the class is over, so the review must stop calling it ongoing.
    open_ids = [s["session_id"] for s in await asyncio.to_thread(state.store.list_sessions, room_id)
                if s.get("ended_at") is None]
    ended = [live_session] if live_session else []      # the bot may have stored its end already
    for sid in dict.fromkeys([*ended, *open_ids]):
        if await asyncio.to_thread(state.store.finish_session, sid, ended_at) and sid not in ended:
            ended.append(sid)
    log.info("room %s: the teacher ended the class (session %s)", room_id, live_session or "none")
    return web.json_response({"ok": True, "room": room_id, "session_id": live_session, "ended_at": ended_at,
                              "ended": ended})


async def _empty_the_room(room: Room, ended_at: float) -> None:
    notice = protocol.message(MessageType.CLASS_ENDED, session_id=room.session_id, ended_at=ended_at)
    bot = room.bot
    for peer in room.peers():
        peer.send(notice)
    if bot is not None:
        # The bot ends its session at ended_at and closes its socket; closing it from here first could
        # cut its last writes (another process) short.
        for _ in range(int(BOT_LEAVE_WAIT_S / 0.05)):
            if room.bot is not bot:
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("room %s: the bot did not leave within %.0f s of the class ending; closing it",
                        room.room_id, BOT_LEAVE_WAIT_S)
    # A bot that was reconnecting meanwhile still holds this session: relay.on_session sends it away.
    room.ended_session = room.session_id or room.ended_session
    room.session_id, room.last_state = None, None
    for peer in room.peers():
        peer.close(CloseCode.ENDED)


async def session_alerts(request: web.Request) -> web.Response:
    sid = request.match_info["sid"]
    access = await review_access(request, sid)
    if isinstance(access, web.Response):
        return access
    alerts = await asyncio.to_thread(state_of(request).store.session_alerts, sid)
    return web.json_response({"session_id": sid, "alerts": alerts})

