"""classmood rooms as Janus VideoRooms. The server makes every Janus call for its room members.

Browsers and the bot never hold a Janus secret: they send SDP to the classmood server, which publishes
and subscribes on their behalf through here. So the server alone decides who may publish, who may see
whom, and that the bot gets the video (never the audio) of consenting students only; an opt-out detaches
the bot's subscription inside Janus itself.

    sfu = Sfu(url, api_secret, admin_key)
    await sfu.start()                                            # JanusUnavailable with the URL if down
    answer = await sfu.publish(room, peer, name, offer_sdp)
    offer = await sfu.subscribe(room, subscriber, feed, video_only=True, low_temporal=1)
    await sfu.start_subscription(room, subscriber, feed, answer_sdp)

Janus lost (killed, restarted): every handle is gone. `on_lost()` runs at once, the Sfu reconnects with
backoff, and `on_ready()` runs again once Janus answers: the owner then asks its clients to publish and
subscribe anew.
"""
from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

from signaling.janus import JanusClient, JanusError, JanusUnavailable, Message

log = logging.getLogger("classmood.sfu")

ROOM_EXISTS = 427
NO_SUCH_ROOM = 426
_MLINE = re.compile(r"^m=(\w+) ", re.M)
_MID = re.compile(r"^a=mid:(\S+)", re.M)


def media_mids(sdp: str) -> dict[str, list[str]]:
    """{'audio': [mid...], 'video': [mid...]} of an SDP, in m-line order (for video-only subscriptions)."""
    mids: dict[str, list[str]] = {}
    sections = re.split(r"(?m)^(?=m=)", sdp)
    for section in sections[1:]:
        kind = _MLINE.match(section)
        mid = _MID.search(section)
        if kind and mid and "a=inactive" not in section and "a=recvonly" not in section:
            mids.setdefault(kind.group(1), []).append(mid.group(1))
    return mids


@dataclass
class SfuRoom:
    room_id: str
    created: bool = False
    publishers: dict[str, int] = field(default_factory=dict)           # peer -> Janus handle
    mids: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # peer -> media mids of its feed
    subscriptions: dict[tuple[str, str], int] = field(default_factory=dict)  # (subscriber, feed) -> handle
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Sfu:
    def __init__(self, url: str, api_secret: str = "", admin_key: str = "", *, max_publishers: int = 210,
                 bitrate: int = 512_000, on_lost: Callable[[], None] | None = None,
                 on_ready: Callable[[], None] | None = None,
                 on_hangup: Callable[[str, str, str | None], None] | None = None,
                 on_feed_up: Callable[[str, str], None] | None = None) -> None:
        self.url = url
        self.api_secret = api_secret
        self.admin_key = admin_key
        self.max_publishers = max_publishers
        self.bitrate = bitrate
        self.on_lost = on_lost
        self.on_ready = on_ready
        self.on_hangup = on_hangup       # (room, peer, feed or None): a publisher's or subscriber's media ended
        self.on_feed_up = on_feed_up     # (room, peer): a publisher's media flows; only now can others subscribe
        self.rooms: dict[str, SfuRoom] = {}
        self._handles: dict[int, tuple[str, str, str | None]] = {}   # handle -> (room, peer, feed or None)
        self._client: JanusClient | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._closing = False
        self.generation = 0              # +1 each time Janus is (re)connected: old handles are void

    @property
    def ready(self) -> bool:
        return self._client is not None and self._client.connected

    async def start(self, timeout: float = 5.0) -> None:
        """Connect once; raises JanusUnavailable (naming the URL) or JanusError (e.g. a wrong secret)."""
        await self._connect(timeout)

    async def check(self) -> None:
        """Create and destroy a probe room: proves the admin key before the first class needs it."""
        probe = SfuRoom(f"classmood-probe-{id(self):x}")
        await self._ensure_created(probe)
        await self._destroy(probe)

    async def close(self) -> None:
        self._closing = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        if self._client is not None:
            for room in list(self.rooms.values()):
                await self._destroy(room)
            await self._client.close()
        self._client = None

    async def _connect(self, timeout: float) -> None:
        client = JanusClient(self.url, self.api_secret, on_event=self._on_event, on_lost=self._lost)
        await client.connect(timeout)
        self._client = client
        self.generation += 1
        log.info("connected to Janus at %s", self.url)

    def _lost(self) -> None:
        self.rooms.clear()
        self._handles.clear()
        if self._closing:
            return
        if self.on_lost is not None:
            self.on_lost()
        if self._reconnect is None or self._reconnect.done():
            self._reconnect = asyncio.ensure_future(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        backoff = 0.5
        old = self._client
        if old is not None:
            await old.close()
        while not self._closing:
            try:
                await self._connect(5.0)
                if self.on_ready is not None:
                    self.on_ready()
                return
            except JanusError as exc:
                log.warning("Janus at %s not back yet (%s); retrying in %.1f s", self.url, exc.reason, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _janus(self) -> JanusClient:
        if self._client is None or not self._client.connected:
            raise JanusUnavailable(f"not connected to Janus at {self.url}")
        return self._client

    def _on_event(self, handle: int, message: Message) -> None:
        owner = self._handles.get(handle)
        if owner is None:
            return
        if message.get("janus") == "webrtcup" and owner[2] is None:
            if self.on_feed_up is not None:
                self.on_feed_up(owner[0], owner[1])
        elif message.get("janus") == "hangup":
            room_id, peer, feed = owner
            log.info("room %s: Janus hung up %s of %s (%s)", room_id, "subscription to " + feed if feed else
                     "the feed", peer, message.get("reason"))
            if self.on_hangup is not None:
                self.on_hangup(room_id, peer, feed)

    # ---- rooms ------------------------------------------------------------------------------------
    def _room(self, room_id: str) -> SfuRoom:
        room = self.rooms.get(room_id)
        if room is None:
            room = self.rooms[room_id] = SfuRoom(room_id)
        return room

    async def _ensure_created(self, room: SfuRoom) -> None:
        if room.created:
            return
        janus = self._janus()
        handle = await janus.attach()
        try:
            await janus.request(handle, {
                "request": "create", "room": room.room_id, "admin_key": self.admin_key, "permanent": False,
                "is_private": True, "publishers": self.max_publishers, "bitrate": self.bitrate,
                "fir_freq": 10, "videocodec": "vp8", "audiocodec": "opus", "notify_joining": False})
        except JanusError as exc:
            if exc.code != ROOM_EXISTS:
                raise
        finally:
            await janus.detach(handle)
        room.created = True

    async def _destroy(self, room: SfuRoom) -> None:
        janus = self._client
        if janus is None or not janus.connected or not room.created:
            return
        try:
            handle = await janus.attach()
            try:
                await janus.request(handle, {"request": "destroy", "room": room.room_id, "admin_key": self.admin_key})
            finally:
                await janus.detach(handle)
        except JanusError as exc:
            log.debug("destroying Janus room %s: %s", room.room_id, exc)

    async def close_room(self, room_id: str) -> None:
        room = self.rooms.pop(room_id, None)
        if room is not None:
            for handle in [*room.publishers.values(), *room.subscriptions.values()]:
                self._handles.pop(handle, None)
            await self._destroy(room)

    # ---- publishing -------------------------------------------------------------------------------
    async def publish(self, room_id: str, peer: str, display: str, offer_sdp: str) -> str:
        """Publish `peer`'s media (its SDP offer) into the room; returns Janus's SDP answer."""
        room = self._room(room_id)
        async with room.lock:
            await self._ensure_created(room)
            await self._unpublish(room, peer)
            janus = self._janus()
            handle = await janus.attach()
            self._handles[handle] = (room_id, peer, None)
            try:
                data, jsep = await janus.request(handle, {
                    "request": "joinandconfigure", "ptype": "publisher", "room": room_id, "id": peer,
                    "display": display, "audio": True, "video": True},
                    # meeting.js lists its simulcast layers low first ("l;h"); Janus assumes high first unless told,
                    # and then gave substream 0 (the bot's, and small tiles') the HIGH layer.
                    jsep={"type": "offer", "sdp": offer_sdp, "rid_order": "lmh"})
            except BaseException:
                self._handles.pop(handle, None)
                await self._quiet_detach(handle)
                raise
            if not jsep or jsep.get("type") != "answer":
                self._handles.pop(handle, None)
                await self._quiet_detach(handle)
                raise JanusError(500, f"Janus sent no answer to the offer ({data.get('videoroom')})")
            room.publishers[peer] = handle
            room.mids[peer] = media_mids(offer_sdp)
            return str(jsep["sdp"])

    async def unpublish(self, room_id: str, peer: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            async with room.lock:
                await self._unpublish(room, peer)

    async def _unpublish(self, room: SfuRoom, peer: str) -> None:
        handle = room.publishers.pop(peer, None)
        room.mids.pop(peer, None)
        if handle is not None:
            self._handles.pop(handle, None)
            await self._quiet_detach(handle)
        # Janus ends the subscriptions to a feed that is gone; forget our handles of them.
        for key in [k for k in room.subscriptions if k[1] == peer]:
            sub = room.subscriptions.pop(key)
            self._handles.pop(sub, None)
            await self._quiet_detach(sub)

    def publishing(self, room_id: str, peer: str) -> bool:
        room = self.rooms.get(room_id)
        return room is not None and peer in room.publishers

    # ---- subscribing ------------------------------------------------------------------------------
    async def subscribe(self, room_id: str, subscriber: str, feed: str, *, video_only: bool = False,
                        low_temporal: int | None = None, substream: int | None = None) -> str:
        """Subscribe `subscriber` to `feed`; returns Janus's SDP offer (answer it with start_subscription).

        video_only: the feed's video stream(s) only (the bot never receives audio). low_temporal: the lowest
        simulcast layer only, up to this temporal layer (core.simulcast.temporal_layer_for: what the bot's
        sampling rate needs). substream: that simulcast layer, all its frames (0 = low, 2 = the highest sent).
        Neither: what Janus sends by default (the highest layer). A page that wants another layer for a tile
        subscribes again (meeting.js)."""
        room = self.rooms.get(room_id)
        if room is None or feed not in room.publishers:
            raise JanusError(NO_SUCH_ROOM, f"{feed} is not publishing")
        async with room.lock:
            await self._unsubscribe(room, subscriber, feed)
            mids = room.mids.get(feed, {})
            if video_only:
                if not mids.get("video"):
                    raise JanusError(NO_SUCH_ROOM, f"{feed} publishes no video")
                streams: list[Message] = [{"feed": feed, "mid": mid} for mid in mids["video"]]
            else:
                streams = [{"feed": feed}]
            if low_temporal is not None:
                for stream in streams:
                    stream.update({"substream": 0, "temporal": low_temporal})
            elif substream is not None:
                for stream in streams:
                    stream["substream"] = substream
            janus = self._janus()
            handle = await janus.attach()
            self._handles[handle] = (room_id, subscriber, feed)
            try:
                _, jsep = await janus.request(handle, {"request": "join", "ptype": "subscriber", "room": room_id,
                                                       "streams": streams, "use_msid": False})
            except BaseException:
                self._handles.pop(handle, None)
                await self._quiet_detach(handle)
                raise
            if not jsep or jsep.get("type") != "offer":
                self._handles.pop(handle, None)
                await self._quiet_detach(handle)
                raise JanusError(500, "Janus sent no offer for the subscription")
            room.subscriptions[(subscriber, feed)] = handle
            return str(jsep["sdp"])

    async def start_subscription(self, room_id: str, subscriber: str, feed: str, answer_sdp: str) -> None:
        room = self.rooms.get(room_id)
        handle = room.subscriptions.get((subscriber, feed)) if room else None
        if handle is None:
            raise JanusError(NO_SUCH_ROOM, f"no pending subscription of {subscriber} to {feed}")
        await self._janus().request(handle, {"request": "start"}, jsep={"type": "answer", "sdp": answer_sdp})

    async def unsubscribe(self, room_id: str, subscriber: str, feed: str) -> None:
        room = self.rooms.get(room_id)
        if room is not None:
            async with room.lock:
                await self._unsubscribe(room, subscriber, feed)

    async def _unsubscribe(self, room: SfuRoom, subscriber: str, feed: str) -> None:
        handle = room.subscriptions.pop((subscriber, feed), None)
        if handle is not None:
            self._handles.pop(handle, None)
            await self._quiet_detach(handle)

    def subscribed(self, room_id: str, subscriber: str, feed: str) -> bool:
        room = self.rooms.get(room_id)
        return room is not None and (subscriber, feed) in room.subscriptions

    async def leave(self, room_id: str, peer: str) -> None:
        """A member left: its feed and all its subscriptions end."""
        room = self.rooms.get(room_id)
        if room is None:
            return
        async with room.lock:
            await self._unpublish(room, peer)
            for key in [k for k in room.subscriptions if k[0] == peer]:
                await self._unsubscribe(room, *key)

    async def _quiet_detach(self, handle: int) -> None:
        client = self._client
        if client is None or not client.connected:
            return
        try:
            await client.detach(handle)
        except JanusError as exc:
            log.debug("detach %s: %s", handle, exc)
