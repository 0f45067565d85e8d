"""The meeting: who publishes in a room, who may watch whom, and which students the bot receives.

The server hands every media message of a room member here (publish, subscribe, answer, ...) and tells
it about arrivals, departures and consent changes; this module makes the Janus calls through `Sfu`.
Rules it enforces, whatever a page does:
- teachers watch everyone; students watch the teachers (and each other with `students_see_students`);
  nobody subscribes to a feed they may not see, and only room members (and the bot) subscribe at all;
- the bot gets the VIDEO of every publishing student whose analysis is on (lowest simulcast layer),
  never audio, never teachers; an opt-out detaches its subscription inside Janus at once, while the
  student stays visible to the class.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from core.settings import ServerSettings
from signaling import protocol
from signaling.protocol import ErrorCode, MessageType
from signaling.janus import JanusError, JanusUnavailable
from signaling.rooms import Peer, Room
from signaling.sfu import Sfu

log = logging.getLogger("classmood.meeting")

BOT = "bot"             # the bot's subscriber name in the SFU: a replacing bot inherits nothing stale
# Janus's simulcast substream for each quality a page asks for (meeting.js sends two layers, 0 low and 1 high; for
# 2 Janus sends the highest layer there is).
SUBSTREAMS = {"low": 0, "high": 2}
RESUBSCRIBE_DELAY_S = 2.0


@dataclass
class MeetingRoom:
    publishers: dict[str, str] = field(default_factory=dict)    # peer -> role ("teacher" | "student"), media up
    starting: dict[str, str] = field(default_factory=dict)      # published, media not flowing yet
    bot_feeds: set[str] = field(default_factory=set)            # students the bot is subscribed to
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)     # bot subscription changes, one at a time


class Meeting:
    def __init__(self, sfu: Sfu, rooms: Callable[[], Iterable[Room]], *, students_see_students: bool = False,
                 publish: dict[str, Any] | None = None, bot_temporal_layer: int = 1,
                 gallery_low_from: int = ServerSettings.meeting_gallery_low_from) -> None:
        """bot_temporal_layer: how much of a student's low simulcast layer the bot receives
        (core.simulcast.temporal_layer_for(bot.sample_hz)). gallery_low_from: pages watching this many feeds or
        more ask for the low layer of their small tiles (0 = never; see meeting.js)."""
        self.sfu = sfu
        self.rooms = rooms                      # the live rooms (for a media reset)
        self.students_see_students = students_see_students
        self.bot_temporal_layer = bot_temporal_layer
        self.gallery_low_from = max(0, int(gallery_low_from))
        self.publish_constraints = publish or {"width": 640, "height": 480, "fps": 15, "simulcast": True}
        self.state: dict[str, MeetingRoom] = {}
        self._live: dict[str, Room] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        sfu.on_lost = self._janus_lost
        sfu.on_ready = self._janus_back
        sfu.on_hangup = self._hangup
        sfu.on_feed_up = self._feed_up

    # ---- what clients are told ----------------------------------------------------------------------
    def welcome_media(self) -> dict[str, Any]:
        return {"mode": "sfu", "students_see_students": self.students_see_students,
                "publish": self.publish_constraints, "gallery_low_from": self.gallery_low_from}

    def _room(self, room: Room) -> MeetingRoom:
        self._live[room.room_id] = room
        return self.state.setdefault(room.room_id, MeetingRoom())

    def may_watch(self, room: Room, viewer: Peer, feed: str) -> bool:
        role = self._room(room).publishers.get(feed)
        if role is None or feed == viewer.peer_id:
            return False
        if viewer.role == "teacher":
            return True
        return viewer.role == "student" and (role == "teacher" or self.students_see_students)

    def feeds_for(self, room: Room, viewer: Peer) -> list[dict[str, str]]:
        members = {p.peer_id: p for p in [*room.teachers.values(), *room.students.values()]}
        return [{"peer_id": peer, "name": members[peer].name if members[peer].role == "student" else "Teacher",
                 "role": role}
                for peer, role in self._room(room).publishers.items()
                if peer in members and self.may_watch(room, viewer, peer)]

    def announce(self, room: Room) -> None:
        for member in [*room.teachers.values(), *room.students.values()]:
            member.send(protocol.message(MessageType.FEEDS, feeds=self.feeds_for(room, member)))

    # ---- events from the server -------------------------------------------------------------------------
    def joined(self, room: Room, peer: Peer) -> None:
        """After the welcome: a member learns the feeds it may watch; a bot gets its students' video."""
        if peer.role == "bot":
            self._spawn(self._bot_arrived(room))
        else:
            peer.send(protocol.message(MessageType.FEEDS, feeds=self.feeds_for(room, peer)))

    def left(self, room: Room, peer: Peer) -> None:
        state = self._room(room)
        if peer.role == "bot":
            self._spawn(self._drop_bot_feeds(room))
            return
        state.starting.pop(peer.peer_id, None)
        was_publishing = state.publishers.pop(peer.peer_id, None) is not None
        state.bot_feeds.discard(peer.peer_id)
        self._spawn(self._leave(room, peer.peer_id, was_publishing))

    def consent_changed(self, room: Room, peer: Peer) -> None:
        self._spawn(self.sync_bot(room))

    def handle(self, room: Room, peer: Peer, data: dict[str, Any]) -> None:
        """A media message of a member (validated by signaling.protocol)."""
        self._spawn(self._handle(room, peer, data))

    def resubscribe_bot_soon(self, room: Room, feed: str) -> None:
        self._spawn(self.resubscribe_bot(room, feed))

    async def resubscribe_bot(self, room: Room, feed: str) -> None:
        """The bot lost its connection to a feed it is subscribed to (a bot short of CPU misses ICE consent
        checks; a network fault): hang the old subscription up and offer it again, if the bot may still have it."""
        state = self._room(room)
        async with state.lock:
            if feed not in state.bot_feeds:
                return          # not the bot's (any more): sync_bot decides what it gets
            state.bot_feeds.discard(feed)
            try:
                await self.sfu.unsubscribe(room.room_id, BOT, feed)
            except JanusError as exc:
                log.debug("room %s: hanging up the bot's lost subscription to %s: %s", room.room_id, feed, exc)
        log.info("room %s: the bot lost its connection to %s; offering it again", room.room_id, feed)
        await self.sync_bot(room)

    def bot_answer_soon(self, room: Room, feed: str, sdp: str) -> None:
        self._spawn(self.bot_answer(room, feed, sdp))

    async def bot_answer(self, room: Room, feed: str, sdp: str) -> None:
        try:
            await self.sfu.start_subscription(room.room_id, BOT, feed, sdp)
        except JanusError as exc:
            log.warning("room %s: starting the bot's subscription to %s failed: %s", room.room_id, feed, exc)

    # ---- media requests ---------------------------------------------------------------------------------
    async def _handle(self, room: Room, peer: Peer, data: dict[str, Any]) -> None:
        kind = data["type"]
        try:
            if kind == MessageType.PUBLISH:
                answer = await self.sfu.publish(room.room_id, peer.peer_id, peer.name or peer.role, data["sdp"])
                if peer.closing or peer not in room.peers():   # left while Janus was answering
                    await self.sfu.leave(room.room_id, peer.peer_id)
                    return
                state = self._room(room)
                # A re-publish replaces the feed: until its media flows, nobody can subscribe to it.
                was_up = state.publishers.pop(peer.peer_id, None) is not None
                state.bot_feeds.discard(peer.peer_id)
                state.starting[peer.peer_id] = peer.role
                peer.send(protocol.message(MessageType.PUBLISHED, sdp=answer))
                if was_up:
                    self.announce(room)
            elif kind == MessageType.UNPUBLISH:
                state = self._room(room)
                state.starting.pop(peer.peer_id, None)
                if state.publishers.pop(peer.peer_id, None) is not None:
                    state.bot_feeds.discard(peer.peer_id)
                    self.announce(room)
                await self.sfu.unpublish(room.room_id, peer.peer_id)
            elif kind == MessageType.SUBSCRIBE:
                feed = data["feed"]
                if not self.may_watch(room, peer, feed):
                    peer.send(self._error(data, ErrorCode.BAD_TARGET, "you may not watch that feed (or it is not publishing)"))
                    return
                offer = await self.sfu.subscribe(room.room_id, peer.peer_id, feed,
                                                 substream=SUBSTREAMS.get(data.get("quality", "")))
                peer.send(protocol.message(MessageType.OFFER, feed=feed, sdp=offer))
            elif kind == MessageType.ANSWER:
                await self.sfu.start_subscription(room.room_id, peer.peer_id, data["feed"], data["sdp"])
            elif kind == MessageType.UNSUBSCRIBE:
                await self.sfu.unsubscribe(room.room_id, peer.peer_id, data["feed"])
        except JanusUnavailable:
            peer.send(self._error(data, ErrorCode.MEDIA_UNAVAILABLE, "audio and video are reconnecting; please wait"))
        except JanusError as exc:
            log.warning("room %s: %s of %s %s failed: %s", room.room_id, kind, peer.role, peer.peer_id, exc)
            peer.send(self._error(data, ErrorCode.MEDIA_FAILED, f"the media server refused the {kind} ({exc.reason[:120]})"))

    @staticmethod
    def _error(data: dict[str, Any], code: str, text: str) -> dict[str, Any]:
        """An error that says which request failed (and for which feed), so a page retries just that."""
        out = protocol.error(code, text)
        out["request"] = data["type"]
        if "feed" in data:
            out["feed"] = data["feed"]
        return out

    async def _leave(self, room: Room, peer_id: str, was_publishing: bool) -> None:
        try:
            await self.sfu.leave(room.room_id, peer_id)
        except JanusError as exc:
            log.debug("room %s: leaving %s: %s", room.room_id, peer_id, exc)
        if was_publishing:
            self.announce(room)
        if room.size() == 0:
            await self.close_room(room.room_id)

    async def close_room(self, room_id: str) -> None:
        self.state.pop(room_id, None)
        self._live.pop(room_id, None)
        try:
            await self.sfu.close_room(room_id)
        except JanusError as exc:
            log.debug("closing the Janus room %s: %s", room_id, exc)

    # ---- the bot's subscriptions --------------------------------------------------------------------------
    async def _bot_arrived(self, room: Room) -> None:
        await self._drop_bot_feeds(room)      # a replacing bot gets fresh offers, not the old bot's
        await self.sync_bot(room)

    async def _drop_bot_feeds(self, room: Room) -> None:
        state = self._room(room)
        async with state.lock:
            for feed in list(state.bot_feeds):
                state.bot_feeds.discard(feed)
                try:
                    await self.sfu.unsubscribe(room.room_id, BOT, feed)
                except JanusError:
                    pass

    async def sync_bot(self, room: Room) -> None:
        """Make the bot's subscriptions match the publishing students whose analysis is on."""
        state = self._room(room)
        async with state.lock:
            bot = room.bot
            wanted = set() if bot is None else {
                peer for peer, role in state.publishers.items()
                if role == "student" and peer in room.students and room.students[peer].analysis}
            for feed in sorted(state.bot_feeds - wanted):
                state.bot_feeds.discard(feed)
                try:
                    await self.sfu.unsubscribe(room.room_id, BOT, feed)   # hangs up inside Janus
                    log.info("room %s: the bot no longer receives %s", room.room_id, feed)
                except JanusError as exc:
                    log.debug("room %s: unsubscribing the bot from %s: %s", room.room_id, feed, exc)
            for feed in sorted(wanted - state.bot_feeds):
                try:
                    offer = await self.sfu.subscribe(room.room_id, BOT, feed, video_only=True,
                                                     low_temporal=self.bot_temporal_layer)
                except JanusError as exc:
                    log.warning("room %s: subscribing the bot to %s failed: %s", room.room_id, feed, exc)
                    continue
                state.bot_feeds.add(feed)
                assert bot is not None
                bot.send(protocol.signal_from(feed, {"type": "offer", "sdp": offer}))

    # ---- Janus going away and coming back -----------------------------------------------------------------
    def _janus_lost(self) -> None:
        log.warning("the media server is gone: audio/video paused in %d room(s); reconnecting", len(self.state))
        for state in self.state.values():
            state.publishers.clear()
            state.starting.clear()
            state.bot_feeds.clear()
        for room in self._live_rooms():
            self.announce(room)

    def _janus_back(self) -> None:
        rooms = self._live_rooms()
        log.info("the media server is back: asking %d room(s) to publish again", len(rooms))
        for room in rooms:
            for member in [*room.teachers.values(), *room.students.values()]:
                member.send(protocol.message(MessageType.MEDIA, event="reset"))

    def _live_rooms(self) -> list[Room]:
        live = {room.room_id: room for room in self.rooms()}
        return [room for room_id, room in live.items() if room_id in self.state or room.size()]

    def _feed_up(self, room_id: str, peer: str) -> None:
        room, state = self._live.get(room_id), self.state.get(room_id)
        if room is None or state is None or peer not in state.starting:
            return
        role = state.starting.pop(peer)
        state.publishers[peer] = role
        log.info("room %s: %s %s publishes", room_id, role, peer)
        self.announce(room)
        if role == "student":
            self._spawn(self.sync_bot(room))

    def _hangup(self, room_id: str, peer: str, feed: str | None) -> None:
        room = self._live.get(room_id)
        state = self.state.get(room_id)
        if room is None or state is None:
            return
        if feed is None:
            # The publisher's own connection ended (closed tab, ICE failure): its feed is gone.
            state.starting.pop(peer, None)
            if state.publishers.pop(peer, None) is not None:
                state.bot_feeds.discard(peer)
                self._spawn(self.sfu.unpublish(room_id, peer))
                self.announce(room)
        elif peer == BOT and feed in state.bot_feeds:
            state.bot_feeds.discard(feed)
            self._spawn(self._resync_later(room))

    async def _resync_later(self, room: Room) -> None:
        await asyncio.sleep(RESUBSCRIBE_DELAY_S)
        await self.sync_bot(room)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("meeting task failed", exc_info=task.exception())

    async def stop_tasks(self) -> None:
        """Server shutdown: pending Janus calls are abandoned (the Sfu's owner closes it)."""
        for task in list(self._tasks):
            task.cancel()
