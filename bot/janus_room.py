"""Bring your own Janus room: the bot's students come from a VideoRoom that another app created.

    python -m bot join --room R --token TEACHER_TOKEN --janus ws://HOST:8188/ --janus-room 1234 [--pin P]

The bot still joins classmood room R (its teacher page gets the live state and the alerts, the session is
stored and reviewable), but its video comes from the given Janus VideoRoom: it joins that room as a
participant named "classmood assistant (expression analysis)", never publishes, and subscribes to the
VIDEO of every publisher except
- the teacher (`--janus-teacher NAME`, the publisher with that display name, case-insensitive),
- anyone whose display name contains an opt-out tag (`[no-analysis]`, `(no analysis)`, `#optout`),
- other bots (display names starting with "classmood").
Publishers that appear, leave, rename or opt out are followed from Janus's own events.
Consent: where the room has a text channel (a TextRoom of the same id on that Janus, or --janus-textroom
ID), the bot posts a notice there when it joins and greets each newcomer with how to opt out.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import json
import secrets

from aiortc import RTCPeerConnection, RTCSessionDescription

from bot.ice_filter import decline_extensions
from core.optout import GREETING, NOTICE, OPT_OUT, analysable  # noqa: F401  (re-exported: tests and callers use them here)
from signaling.janus import JanusClient, JanusError, Message

if TYPE_CHECKING:
    from bot.peer import BotPeer

log = logging.getLogger("classmood.bot.janus_room")

DISPLAY = "classmood assistant (expression analysis)"
NO_SUCH_ROOM, UNAUTHORIZED = 426, 433
TEXTROOM = "janus.plugin.textroom"


class JanusRoomError(RuntimeError):
    """The external room cannot be joined (no such room, wrong PIN or secret, Janus down)."""


def student_name(display: str) -> str:
    return " ".join(display.split())[:60] or "?"


class JanusRoomFeeds:
    """Follows the publishers of one external VideoRoom and hands their video to a BotPeer."""

    def __init__(self, url: str, room: str | int, *, pin: str = "", api_secret: str = "",
                 teacher: str = "", textroom: str | int | None = None, temporal: int = 1) -> None:
        """temporal: the temporal layer of each publisher's low simulcast layer the bot receives
        (core.simulcast.temporal_layer_for(bot.sample_hz))."""
        self.bot: BotPeer | None = None       # set by the BotPeer that uses these feeds, once it has its room
        self.url = url
        self.room = room
        self.pin = pin
        self.api_secret = api_secret
        self.teacher = teacher
        self.temporal = temporal
        self.client: JanusClient | None = None
        self.handle: int | None = None
        self.private_id: Any = None
        self.feeds: dict[str, dict[str, Any]] = {}        # feed id -> publisher (display, streams)
        self.subscriptions: dict[str, int] = {}            # feed id -> subscriber handle
        self._lost = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self.textroom = room if textroom is None else textroom     # "" = do not post notices
        self.chat: TextChannel | None = None
        self.greeted: set[str] = set()

    async def attach(self, bot: BotPeer) -> None:
        """The bot has its ClassRoom: analyse the publishers already there, then follow the room."""
        self.bot = bot
        for publisher in list(self.feeds.values()):
            await self._publisher(publisher)
        if self._runner is None:
            self._runner = asyncio.ensure_future(self.run())

    async def connect(self) -> None:
        """Join the room; raises JanusRoomError with the reason (room, PIN, secret, Janus down)."""
        self._lost.clear()
        client = JanusClient(self.url, self.api_secret, on_event=self._on_event, on_lost=self._lost.set)
        try:
            await client.connect()
            handle = await client.attach()
            join: Message = {"request": "join", "ptype": "publisher", "room": self.room, "display": DISPLAY}
            if self.pin:
                join["pin"] = self.pin
            data, _ = await client.request(handle, join)
        except JanusError as exc:
            await client.close()
            if exc.code == NO_SUCH_ROOM:
                raise JanusRoomError(f"Janus at {self.url} has no VideoRoom {self.room!r}") from None
            if exc.code == UNAUTHORIZED:
                raise JanusRoomError(f"VideoRoom {self.room!r} refused the bot: wrong or missing PIN (--pin)") from None
            if exc.code == 403:
                raise JanusRoomError(f"Janus at {self.url} needs an API secret: --janus-api-secret") from None
            raise JanusRoomError(f"joining VideoRoom {self.room!r} at {self.url} failed: {exc.reason}") from None
        self.client, self.handle = client, handle
        self.private_id = data.get("private_id")
        log.info("joined Janus VideoRoom %s at %s as %r", self.room, self.url, DISPLAY)
        if self.textroom != "":
            self.chat = await TextChannel.open(client, self.textroom, self.pin)
            if self.chat is not None:
                self.chat.post(NOTICE)
            else:
                log.warning("VideoRoom %s has no text channel: the bot cannot announce itself; the teacher must "
                            "tell the class that the assistant is present and how to opt out", self.room)
        for publisher in data.get("publishers") or []:
            self.greeted.add(str(publisher.get("id")))    # the notice above is for everyone already there
            await self._publisher(publisher)

    async def run(self) -> None:
        """Stay in the room; rejoin with backoff when Janus goes away (its restart loses all handles)."""
        backoff = 0.5
        while True:
            await self._lost.wait()
            log.warning("lost Janus at %s; rejoining VideoRoom %s", self.url, self.room)
            for feed in list(self.feeds):
                await self._gone(feed)
            while True:
                await asyncio.sleep(backoff)
                try:
                    await self.connect()
                    backoff = 0.5
                    break
                except JanusRoomError as exc:
                    log.warning("%s; retrying", exc)
                    backoff = min(backoff * 2, 10.0)

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
        for feed in list(self.feeds):
            await self._gone(feed)
        if self.chat is not None:
            await self.chat.close()
        if self.client is not None:
            if self.handle is not None and self.client.connected:
                try:
                    await self.client.request(self.handle, {"request": "leave"}, timeout=3)
                except JanusError:
                    pass
            await self.client.close()

    # ---- Janus events ----------------------------------------------------------------------------------
    def _on_event(self, handle: int, message: Message) -> None:
        if handle != self.handle:
            return
        data = ((message.get("plugindata") or {}).get("data")) or {}
        for publisher in data.get("publishers") or []:
            asyncio.ensure_future(self._publisher(publisher))
        for key in ("unpublished", "leaving"):
            feed = data.get(key)
            if feed is not None and feed != "ok":
                asyncio.ensure_future(self._gone(str(feed)))
        if data.get("videoroom") == "event" and isinstance(data.get("display"), str) and data.get("id") is not None:
            # A rename (e.g. a student adds the opt-out tag): re-evaluate that publisher.
            feed = str(data["id"])
            if feed in self.feeds:
                asyncio.ensure_future(self._publisher({**self.feeds[feed], "display": data["display"]}))

    async def _publisher(self, publisher: dict[str, Any]) -> None:
        feed = str(publisher.get("id"))
        display = str(publisher.get("display") or "")
        if feed not in self.greeted:
            self.greeted.add(feed)
            if self.chat is not None and not display.lower().startswith("classmood"):
                self.chat.post(GREETING.format(name=student_name(display)))
        previous = self.feeds.get(feed)
        self.feeds[feed] = {**publisher, "id": publisher.get("id"), "display": display}
        bot = self.bot
        room = bot.room if bot is not None else None
        if room is None:
            return      # analysed once the bot has its room (attach)
        wanted = analysable(display, self.teacher)
        videos = [s for s in publisher.get("streams") or [] if s.get("type") == "video" and not s.get("disabled")]
        if feed not in room.students:
            room.add_student(feed, student_name(display), wanted)
        elif previous is not None and previous.get("display") != display:
            room.set_consent(feed, wanted)
        if not wanted:
            await self._unsubscribe(feed)
            # Display names are people's names: the feed id at INFO (core/logs.py), the name only when debugging.
            log.info("VideoRoom %s: feed %s is not analysed (teacher, opted out or a bot)", self.room, feed)
            log.debug("VideoRoom %s: feed %s is %r", self.room, feed, display)
            return
        if feed in self.subscriptions or not videos:
            return
        await self._subscribe(feed, [str(s["mid"]) for s in videos if s.get("mid") is not None])

    async def _subscribe(self, feed: str, mids: list[str]) -> None:
        client, bot = self.client, self.bot
        if client is None or bot is None:
            return
        feed_id = self.feeds[feed]["id"]
        streams: list[Message] = [{"feed": feed_id, "mid": mid, "substream": 0, "temporal": self.temporal}
                                  for mid in mids] \
            or [{"feed": feed_id}]
        join: Message = {"request": "join", "ptype": "subscriber", "room": self.room, "streams": streams}
        if self.private_id is not None:
            join["private_id"] = self.private_id     # rooms with require_pvtid accept only members' subscribers
        if self.pin:
            join["pin"] = self.pin
        handle: int | None = None
        try:
            handle = await client.attach()
            _, jsep = await client.request(handle, join)
            if not jsep:
                raise JanusError(500, "no offer")
            pc = RTCPeerConnection()
            await bot.drop_peer(feed)
            bot.pcs[feed] = pc

            @pc.on("track")
            def on_track(track: Any) -> None:
                if track.kind == "video":     # (the bot asked for video only; anything else is ignored)
                    bot.consumers[feed] = bot.spawn(bot.consume(feed, track))

            bot.drop_when_failed(feed, pc)

            await pc.setRemoteDescription(RTCSessionDescription(decline_extensions(jsep["sdp"]), "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await client.request(handle, {"request": "start"}, jsep={"type": "answer", "sdp": pc.localDescription.sdp})
            self.subscriptions[feed] = handle
            log.info("VideoRoom %s: analysing feed %s", self.room, feed)
        except JanusError as exc:
            # Dropping the peer has the bot check, a few seconds later, whether the student is still in class
            # without video, and then ask again (BotPeer._check_lost_later); a Janus that went away is rejoined
            # as a whole by run().
            log.warning("VideoRoom %s: subscribing to %s failed: %s", self.room, feed, exc)
            if handle is not None:
                with contextlib.suppress(JanusError):
                    await client.detach(handle)
            await bot.drop_peer(feed)

    async def resubscribe(self, feed: str) -> None:
        """The bot lost its connection for this feed (ICE consent, a bot short of CPU) while the publisher stayed:
        Janus was told nothing, so drop the old subscription there and subscribe again."""
        publisher = self.feeds.get(feed)
        if publisher is None:
            return      # gone meanwhile
        # Not _unsubscribe: the bot has dropped this peer already, and dropping it again would start another loss check.
        handle = self.subscriptions.pop(feed, None)
        if handle is not None and self.client is not None and self.client.connected:
            try:
                await self.client.detach(handle)
            except JanusError as exc:
                log.debug("VideoRoom %s: detaching the lost subscription to %s: %s", self.room, feed, exc)
        log.info("VideoRoom %s: subscribing to feed %s again", self.room, feed)
        await self._publisher(publisher)

    async def _unsubscribe(self, feed: str) -> None:
        handle = self.subscriptions.pop(feed, None)
        if self.bot is not None:
            await self.bot.drop_peer(feed)
        if handle is not None and self.client is not None and self.client.connected:
            try:
                await self.client.detach(handle)
            except JanusError:
                pass

    async def _gone(self, feed: str) -> None:
        self.feeds.pop(feed, None)
        await self._unsubscribe(feed)
        if self.bot is not None and self.bot.room is not None:
            self.bot.room.remove_student(feed)


class TextChannel:
    """The room's TextRoom (Janus's chat plugin) over a data channel: the bot posts its consent notices."""

    def __init__(self, pc: RTCPeerConnection, channel: Any, room: str | int) -> None:
        self.pc, self.channel, self.room = pc, channel, room

    @classmethod
    async def open(cls, client: JanusClient, room: str | int, pin: str = "") -> TextChannel | None:
        """Join the TextRoom `room`; None when that Janus has no TextRoom plugin or no such room."""
        try:
            handle = await client.attach(TEXTROOM)
            _, jsep = await client.request(handle, {"request": "setup"})
        except JanusError as exc:
            log.info("no TextRoom at %s (%s)", client.url, exc.reason)
            return None
        if not jsep:
            return None
        pc = RTCPeerConnection()
        channel = pc.createDataChannel("JanusDataChannel")
        opened, joined = asyncio.Event(), asyncio.get_running_loop().create_future()
        channel.on("open", opened.set)

        @channel.on("message")
        def on_message(raw: Any) -> None:
            try:
                reply = json.loads(raw)
            except (TypeError, ValueError):
                return
            if reply.get("transaction") == "join" and not joined.done():
                joined.set_result(reply)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(jsep["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            await client.request(handle, {"request": "ack"}, jsep={"type": "answer", "sdp": pc.localDescription.sdp})
            await asyncio.wait_for(opened.wait(), 10)
            join = {"textroom": "join", "transaction": "join", "room": room, "display": DISPLAY,
                    "username": f"classmood-{secrets.token_hex(4)}"}
            if pin:
                join["pin"] = pin
            channel.send(json.dumps(join))
            reply = await asyncio.wait_for(joined, 10)
        except (JanusError, asyncio.TimeoutError, ValueError) as exc:
            log.info("joining TextRoom %s failed: %s", room, exc or type(exc).__name__)
            await pc.close()
            return None
        if reply.get("textroom") != "success":
            log.info("TextRoom %s refused the bot: %s", room, reply.get("error"))
            await pc.close()
            return None
        log.info("joined TextRoom %s: consent notices go there", room)
        return cls(pc, channel, room)

    def post(self, text: str) -> None:
        if self.channel.readyState == "open":
            self.channel.send(json.dumps({"textroom": "message", "transaction": secrets.token_hex(4),
                                          "room": self.room, "text": text}))

    async def close(self) -> None:
        await self.pc.close()
