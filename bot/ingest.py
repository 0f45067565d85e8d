"""Frames from a meeting-bot service (Recall.ai, Attendee), forwarded by the server as binary messages on the
bot's signaling socket (core/frames.py; the server side is signaling/ingest.py).

The students are already on the ClassRoom's roster (the server seats them and sends the usual `participant`
messages); this only feeds their frames into the same FrameMailbox as WebRTC video. The image stays encoded
here: the inference thread decodes it (bot/analyzer.py), so the event loop never pays for a PNG.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from bot.analyzer import PendingFrame
from core import frames

if TYPE_CHECKING:
    from bot.peer import BotPeer

log = logging.getLogger("classmood.bot.ingest")


class IngestFrames:
    """Per bot: binary frames in, PendingFrames out; a student without frames for bot.stall_seconds is shown
    as not connected (like a stalled WebRTC track) until frames resume."""

    def __init__(self, bot: BotPeer) -> None:
        self.bot = bot
        self.last: dict[str, float] = {}        # peer id -> monotonic time of its last frame
        self.frames = 0
        self.refused = 0
        self._sweeper: asyncio.Task | None = None

    def on_binary(self, data: bytes) -> None:
        bot, room = self.bot, self.bot.room
        try:
            peer, t, image = frames.unpack(data)
        except ValueError as exc:
            self.refused += 1
            if self.refused <= 3 or self.refused % 100 == 0:
                log.warning("room %s: binary message ignored: %s (#%d)", bot.room_id, exc, self.refused)
            return
        if room is None or not room.wants_video(peer):
            return                               # left or opted out while the frame was on its way
        now = time.monotonic()
        if peer not in self.last or now - self.last[peer] > bot.settings.bot.stall_seconds:
            room.mark_connected(peer, True)
        self.last[peer] = now
        self.frames += 1
        bot.mailbox.put((bot.room_id, peer), PendingFrame(image, t, now))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = bot.spawn(self._sweep())

    async def _sweep(self) -> None:
        stall = self.bot.settings.bot.stall_seconds
        while self.last and self.bot.room is not None:
            await asyncio.sleep(min(1.0, stall / 2))
            room, now = self.bot.room, time.monotonic()
            for peer, seen in list(self.last.items()):
                if now - seen > stall:
                    del self.last[peer]
                    if room is not None:
                        room.mark_connected(peer, False)
