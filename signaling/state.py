"""ServerState: everything one signaling app holds, in one typed object stored on the app.

Handlers are plain module-level functions; they find the state with `state_of(request)` (or
`app[STATE_KEY]`), so a new route or message handler needs no closure over create_app's locals.
"""
from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from core.settings import ServerSettings, Settings
from signaling import protocol
from signaling.auth import bot_token_for
from signaling.joins import JoinLimits
from signaling.meeting import Meeting
from signaling.rooms import RateLimit, Registry, Room
from signaling.store import Store
from signaling.turn import turn_server, turn_urls


@dataclass
class ServerState:
    settings: Settings
    store: Store
    registry: Registry
    static: Path                           # the pages and their assets (resolved, for the traversal check)
    ice_servers: list[dict[str, Any]]      # sent in every welcome
    video: dict[str, int]                  # capture constraints sent in every welcome
    bot_token_secret: str                  # what bot tokens are derived from (signaling.auth.bot_token_for)
    sockets: weakref.WeakSet = field(default_factory=weakref.WeakSet)   # open WebSockets, closed at shutdown
    room_buckets: dict[str, RateLimit] = field(default_factory=dict)    # room creations per address block
    pending_hellos: dict[str, int] = field(default_factory=dict)        # sockets awaiting hello per address block
    meeting: Meeting | None = None         # rooms are meetings on this SFU (None: students send video to the bot)
    joins: JoinLimits | None = None        # student join rates per address and per room (set by create_app)

    @property
    def cfg(self) -> ServerSettings:
        return self.settings.server

    def new_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> Room:
        return Room(room_id, title, join_key, teacher_token_hash,
                    bot_token=bot_token_for(room_id, self.bot_token_secret), meeting=self.meeting)

    def ice_servers_for(self, peer_id: str) -> list[dict[str, Any]]:
        """welcome.ice_servers: server.ice_servers plus, with server.turn_urls, TURN credentials minted for
        this connection alone (signaling/turn.py)."""
        urls = turn_urls(self.cfg.turn_urls)
        if not urls or not self.cfg.turn_secret:
            return self.ice_servers
        return [*self.ice_servers, turn_server(urls, self.cfg.turn_secret, self.cfg.turn_ttl_seconds, peer_id)]

    def media(self) -> dict[str, Any] | None:
        """welcome.media: how the rooms' audio and video flow."""
        return self.meeting.welcome_media() if self.meeting is not None else None

    # ---- rooms: memory first, then the store ---------------------------------------------------
    async def room_record(self, room_id: str) -> dict[str, Any] | None:
        room = self.registry.get(room_id)
        if room is not None:
            return {"room_id": room.room_id, "title": room.title, "join_key": room.join_key,
                    "teacher_token_hash": room.teacher_token_hash}
        if not protocol.is_id(room_id):
            return None
        return await asyncio.to_thread(self.store.get_room, room_id)

    async def live_room(self, room_id: str) -> Room | None:
        """The live room (loaded from the store if needed). Raises TooManyRooms."""
        room = self.registry.get(room_id)
        if room is None:
            record = await asyncio.to_thread(self.store.get_room, room_id)
            if record is None:
                return None
            room = self.registry.add(self.new_room(room_id, record.get("title") or "", record["join_key"],
                                                   record["teacher_token_hash"]))
        return room


STATE_KEY = web.AppKey("state", ServerState)
# Kept for callers that only need one part (tests read the registry)
SETTINGS_KEY = web.AppKey("settings", Settings)
REGISTRY_KEY = web.AppKey("registry", Registry)
SOCKETS_KEY = web.AppKey("sockets", weakref.WeakSet)


def state_of(request: web.Request) -> ServerState:
    return request.app[STATE_KEY]
