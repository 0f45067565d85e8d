"""Ingest from meeting-bot services: the students' video of a Zoom / Google Meet / Teams class, sent by
Recall.ai or Attendee (a bot those services place in the meeting) to this server.

    POST   /api/rooms/{room}/ingest  {"service": "recall"|"attendee"}  -> {"url": "ws(s)://.../ingest/recall/SECRET", "service"}
    DELETE /api/rooms/{room}/ingest?service=recall                     -> {"ok": true, "revoked": bool}
    GET    /api/rooms/{room}/ingest                                    -> {"services": {...}, "counters": {...}}
    POST   /api/rooms/{room}/ingest/consent {"peer_id", "analysis"}    -> the teacher turns one student's analysis off/on
    WS     /ingest/{service}/{secret}                                  <- the service connects here

All API calls need the room's teacher token. The secret is per room and service; only its sha256 is kept (in
this server's memory: a restart revokes every URL). A new URL for a service revokes the previous one; a revoked
or wrong URL is accepted as a WebSocket and closed with 4401 at once, nothing read or stored.

Every message is validated and size-limited (`ingest.*` settings): JSON object, known shapes, the image's
magic bytes, its size read from the header (never decoded here), a complete file, at most `ingest.max_fps`
frames per participant per second (the excess is dropped and counted). Participants become students of the
classmood room (`rc-<id>` / `at-<id>`), seated like browser students, so the bot and the teachers get the
usual `participant` joined/left/consent messages; the host is the teacher and is never seated or analysed;
screen shares are ignored; a name with an opt-out tag (bot/janus_room.py's `analysable`) or the teacher's
switch turns analysis off, and then no frame of that student leaves this server. Webcam frames go to the
room's bot as binary messages (core/frames.py). Bad input costs one message (logged, counted), never the
connection, except a message over the size limit (closed with 1009 by aiohttp).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import secrets
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import aiohttp
from aiohttp import WSMsgType, web

from core import frames, images
from core.optout import GREETING, NOTICE, analysable   # shared with bot/janus_room.py: a name is every platform's channel
from core.protocol import CloseCode, websocket_url
from signaling import protocol
from signaling.auth import same, token_hash
from signaling.protocol import ProtocolError
from signaling.rooms import Peer, RateLimit, Room, RoomFull, TooManyRooms
from signaling.state import ServerState, state_of

log = logging.getLogger("classmood.signaling.ingest")

SERVICES = ("recall", "attendee")
PREFIX = {"recall": "rc", "attendee": "at"}
CLOCK_SKEW_S = 10.0          # a service's capture time further than this from ours is replaced by ours
LOG_EVERY = 100              # repeated refusals of one kind: the first few, then every 100th, are logged


class IngestError(ValueError):
    """A message the server refuses; `reason` is the counter it goes to."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Someone:
    """A meeting participant as the service describes them."""
    id: str
    name: str
    is_host: bool = False
    platform: str | None = None
    named: bool = True               # False: the message gave no name (Attendee's frames), so "Guest" is a stand-in


@dataclass
class Event:
    kind: str                        # join | leave | update | frame
    who: Someone
    t: float | None = None           # capture time, epoch seconds
    image: bytes | None = None
    source: str = "webcam"           # webcam | screenshare
    bot_id: str | None = None        # Attendee: the bot to post chat messages as


# ---- parsers: the services' message shapes (tests/fixtures/ingest/README.md says where each comes from) ----
def _obj(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise IngestError("bad_message", f"{where} must be an object")
    return value


def _participant_id(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise IngestError("bad_message", "participant id must be a number or a string")
    text = str(value)
    if not 1 <= len(text) <= 128:
        raise IngestError("bad_message", "participant id must be 1..128 characters")
    return text


def _someone(raw: dict[str, Any], pid: Any, name: Any, is_host: Any, platform: Any) -> Someone:
    if name is not None and not isinstance(name, str):
        raise IngestError("bad_message", "participant name must be a string or null")
    if is_host is not None and not isinstance(is_host, bool):
        raise IngestError("bad_message", "is_host must be a boolean")
    if platform is not None and not isinstance(platform, str):
        raise IngestError("bad_message", "platform must be a string or null")
    try:
        clean = protocol.clean_name(name or "")
    except ProtocolError:
        clean = ""
    return Someone(_participant_id(pid), clean or "Guest", bool(is_host), platform, named=bool(clean))


def _image(value: Any, magic: str) -> bytes:
    if not isinstance(value, str):
        raise IngestError("bad_message", f"the {magic} image must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise IngestError("bad_image", "the image is not valid base64") from None


def _iso_time(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


RECALL_EVENTS = {"participant_events.join": "join", "participant_events.leave": "leave",
                 "participant_events.update": "update", "video_separate_png.data": "frame"}


def parse_recall(message: dict[str, Any]) -> Event | None:
    """Recall.ai real-time endpoint: {"event", "data": {"data": {...}, "bot": {...}, ...}}; None: an event we
    do not use (Recall adds events over time)."""
    kind = RECALL_EVENTS.get(message.get("event"))  # type: ignore[arg-type]
    if not isinstance(message.get("event"), str):
        raise IngestError("bad_message", "event must be a string")
    if kind is None:
        return None
    inner = _obj(_obj(message.get("data"), "data").get("data"), "data.data")
    p = _obj(inner.get("participant"), "data.data.participant")
    who = _someone(p, p.get("id"), p.get("name"), p.get("is_host", False), p.get("platform"))
    stamp = inner.get("timestamp")
    t = _iso_time(stamp.get("absolute")) if isinstance(stamp, dict) else None
    if kind != "frame":
        return Event(kind, who, t)
    source = inner.get("type", "webcam")
    if source not in ("webcam", "screenshare"):
        raise IngestError("bad_message", "data.data.type must be webcam or screenshare")
    return Event(kind, who, t, _image(inner.get("buffer"), "PNG"), source)


# Attendee: field names in one place; re-check them against Attendee's docs before production (README there).
AT_TRIGGER = "trigger"
AT_BOT_ID = "bot_id"
# "realtime_video.per_participant" is the shape of Attendee's docs (docs.attendee.dev, guides/realtimevideo:
# data = {"participant_uuid", "frame": base64 JPEG, "format": "jpeg", "source": "webcam"|"screenshare"});
# "realtime_video.frame" with names and a host flag is the earlier assumed shape, still accepted.
AT_FRAME_TRIGGERS = ("realtime_video.per_participant", "realtime_video.frame")
AT_EVENTS = {"participant_events.join": "join", "participant_events.leave": "leave",
             "participant_events.update": "update"}
AT_PARTICIPANT = "participant"                              # nested object {"id", "name", "is_host"} ...
AT_PARTICIPANT_ID, AT_PARTICIPANT_NAME = "participant_id", "participant_name"     # ... or flat fields
AT_PARTICIPANT_UUID = "participant_uuid"                      # the documented frame's only participant field
AT_IS_HOST = "is_host"
AT_TIMESTAMP_MS = "timestamp_ms"
AT_IMAGE_FIELDS = ("image", "frame")                        # base64 JPEG
AT_SOURCE_FIELDS = ("source", "type")                       # "webcam" | "screenshare"
AT_PLATFORM = "platform"


def parse_attendee(message: dict[str, Any]) -> Event | None:
    """Attendee real-time websocket: {"bot_id", "trigger", "data": {...}}; None: a trigger we do not use."""
    trigger = message.get(AT_TRIGGER)
    if not isinstance(trigger, str):
        raise IngestError("bad_message", f"{AT_TRIGGER} must be a string")
    kind = "frame" if trigger in AT_FRAME_TRIGGERS else AT_EVENTS.get(trigger)
    if kind is None:
        return None
    data = _obj(message.get("data"), "data")
    nested = data.get(AT_PARTICIPANT)
    if isinstance(nested, dict):
        who = _someone(nested, nested.get("id", nested.get("uuid")), nested.get("name"),
                       nested.get(AT_IS_HOST, data.get(AT_IS_HOST, False)), nested.get(AT_PLATFORM))
    else:
        pid = data.get(AT_PARTICIPANT_ID, data.get(AT_PARTICIPANT_UUID))
        who = _someone(data, pid, data.get(AT_PARTICIPANT_NAME), data.get(AT_IS_HOST, False), data.get(AT_PLATFORM))
    stamp = data.get(AT_TIMESTAMP_MS)
    t = float(stamp) / 1000.0 if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None
    bot_id = message.get(AT_BOT_ID) if isinstance(message.get(AT_BOT_ID), str) else None
    if kind != "frame":
        return Event(kind, who, t, bot_id=bot_id)
    source = next((data[k] for k in AT_SOURCE_FIELDS if k in data), "webcam")
    if source not in ("webcam", "screenshare"):
        raise IngestError("bad_message", "source must be webcam or screenshare")
    raw = next((data[k] for k in AT_IMAGE_FIELDS if k in data), None)
    return Event(kind, who, t, _image(raw, "JPEG"), source, bot_id)


PARSERS: dict[str, Callable[[dict[str, Any]], Event | None]] = {"recall": parse_recall, "attendee": parse_attendee}


def student_id(service: str, service_id: str) -> str:
    """A stable classmood id matching the protocol's id pattern (`rc-42`); ids that do not fit are hashed."""
    candidate = f"{PREFIX[service]}-{service_id}"
    if protocol.is_id(candidate):
        return candidate
    return f"{PREFIX[service]}-" + hashlib.sha256(service_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


# ---- seats: a meeting participant as a student of the classmood room ---------------------------------------
class NullSocket:
    """What a seated meeting participant 'receives': nothing (they are not connected to us)."""
    closed = False

    async def send_str(self, data: str) -> None:
        return None

    async def send_bytes(self, data: bytes) -> None:
        return None

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        return True


class MeetingPeer(Peer):
    """A meeting participant seated as a student: messages to students (the bot's presence) have nowhere to
    go, so nothing is queued and no writer task runs."""

    def __init__(self, peer_id: str, name: str, analysis: bool, owner: IngestConnection) -> None:
        super().__init__(peer_id, "student", NullSocket(), name, analysis)
        self.owner = owner       # the service connection that seated it (a reconnected one takes it over)

    def start(self) -> None:
        return None

    def send(self, message: dict[str, Any]) -> bool:
        return not self.closing

    def send_frame(self, data: bytes) -> bool:
        return False


@dataclass
class Seat:
    who: Someone
    peer_id: str
    peer: Peer | None = None          # None for the host (the teacher) and for anyone refused a seat
    rate: RateLimit | None = None


# ---- Attendee's chat API ----------------------------------------------------------------------------------
PRIVATE_CHAT_PLATFORMS = ("zoom", "teams")     # Google Meet has no private chat: alerts are then not posted


class AttendeeChat:
    """Posts into the meeting through Attendee's API. The notice and greetings go to everyone; alerts only
    as a direct message to the host, and not at all where the platform has no private chat."""

    def __init__(self, api_url: str, api_key: str, platform: str) -> None:
        self.api_url, self.api_key, self.platform = api_url.rstrip("/"), api_key, platform
        self.bot_id: str | None = None
        self.host: str | None = None              # the host's participant id (to_user_uuid)
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()
        self.posted = 0

    def can_whisper(self) -> bool:
        return self.host is not None and self.platform in PRIVATE_CHAT_PLATFORMS

    def post(self, text: str, to: str | None = None) -> None:
        if self.bot_id is None or len(self._tasks) >= 32:       # bounded: a slow API must not pile up posts
            log.warning("attendee chat: message not posted (%s)", "no bot id yet" if self.bot_id is None else "backlog")
            return
        task = asyncio.ensure_future(self._post(text[:1000], to))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, text: str, to: str | None) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        body: dict[str, Any] = {"text": text}
        if to is not None:
            body["to_user_uuid"] = to
        url = f"{self.api_url}/api/v1/bots/{self.bot_id}/send_chat_message"
        try:
            async with self._http.post(url, json=body, headers={"Authorization": f"Token {self.api_key}"}) as r:
                if r.status >= 300:
                    log.warning("attendee chat: HTTP %d from %s", r.status, self.api_url)
                else:
                    self.posted += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            log.warning("attendee chat: posting failed (%s)", exc or type(exc).__name__)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._http is not None:
            await self._http.close()


# ---- one service connection -------------------------------------------------------------------------------
class IngestConnection:
    def __init__(self, state: ServerState, hub: IngestHub, room: Room, service: str, secret_hash: str) -> None:
        self.state, self.hub, self.room, self.service, self.secret_hash = state, hub, room, service, secret_hash
        self.parse = PARSERS[service]
        self.seats: dict[str, Seat] = {}
        self.counters = hub.counters.setdefault(room.room_id, Counter())
        cfg = state.settings.ingest
        self.limits = cfg
        self.chat: AttendeeChat | None = None
        if service == "attendee" and cfg.attendee_api_url:
            self.chat = AttendeeChat(cfg.attendee_api_url, cfg.attendee_api_key, cfg.attendee_platform)
        self.ws: web.WebSocketResponse | None = None

    def refuse(self, reason: str, message: str) -> None:
        self.counters[reason] += 1
        n = self.counters[reason]
        if n <= 3 or n % LOG_EVERY == 0:
            log.warning("ingest %s room %s: %s (%s #%d)", self.service, self.room.room_id, message, reason, n)

    def on_text(self, raw: str) -> None:
        try:
            message = json.loads(raw)
        except (ValueError, RecursionError):
            self.refuse("bad_json", "a message is not JSON")
            return
        if not isinstance(message, dict):
            self.refuse("bad_message", "a message is not a JSON object")
            return
        try:
            event = self.parse(message)
        except IngestError as exc:
            self.refuse(exc.reason, str(exc))
            return
        if event is None:
            name = message.get("event", message.get(AT_TRIGGER))
            self.refuse("unknown_event", f"event {str(name)[:60]!r} ignored")
            return
        self.counters["messages"] += 1
        self.handle(event)

    def handle(self, event: Event) -> None:
        self._follow_room()
        if self.chat is not None and event.bot_id and self.chat.bot_id is None:
            self.chat.bot_id = event.bot_id
            self.chat.post(NOTICE)
        if event.who.platform and self.chat is not None and not self.chat.platform:
            self.chat.platform = event.who.platform.lower()
        if event.kind == "leave":
            seat = self.seats.pop(event.who.id, None)
            if seat is not None:
                self._unseat(seat)
            return
        seat = self.seats.get(event.who.id) or self._seat(event.who)
        # A message without a name (Attendee's documented frames carry only participant_uuid) never renames
        # anybody: the name, and the opt-out tag in it, come from the participant events.
        if event.who.named and (event.kind == "update" or event.who.name != seat.who.name):
            self._rename(seat, event.who)
        if event.kind == "frame":
            self._frame(seat, event)

    # -- roster
    def _seat(self, who: Someone) -> Seat:
        seat = Seat(who, student_id(self.service, who.id),
                    rate=RateLimit(self.limits.max_fps, max(1.0, self.limits.max_fps)))
        self.seats[who.id] = seat
        if who.is_host:
            if self.chat is not None:
                self.chat.host = who.id
            log.info("ingest %s room %s: the host (teacher) is in the meeting; never analysed", self.service,
                     self.room.room_id)
            return seat
        room = self.room
        existing = room.students.get(seat.peer_id)
        if isinstance(existing, MeetingPeer):
            # The service reconnected before its old socket was found dead: take the participant over, so
            # that the old connection's end does not unseat them.
            existing.owner, seat.peer = self, existing
            return seat
        analysis = self._analysis(seat.peer_id, who.name)
        peer = MeetingPeer(seat.peer_id, who.name, analysis, self)
        try:
            self.state.registry.join(room, peer)
        except RoomFull:
            self.refuse("room_full", f"room full: participant {who.id!r} not seated")
            return seat
        seat.peer = peer
        _to_watchers(room, protocol.participant("joined", peer.peer_id, peer.name, peer.analysis))
        # Names stay out of INFO logs: retention and delete must cover everything that names a student.
        log.info("ingest %s room %s: participant joined as %s (analysis %s)", self.service, room.room_id,
                 peer.peer_id, "on" if analysis else "off")
        log.debug("ingest %s room %s: %s is %r", self.service, room.room_id, peer.peer_id, who.name)
        if self.chat is not None:
            self.chat.post(GREETING.format(name=who.name))
        return seat

    def _analysis(self, peer_id: str, name: str) -> bool:
        return analysable(name, "") and (self.room.room_id, peer_id) not in self.hub.teacher_off

    def _rename(self, seat: Seat, who: Someone) -> None:
        seat.who = Someone(seat.who.id, who.name, seat.who.is_host or who.is_host, who.platform)
        if seat.peer is None:
            return
        analysis = self._analysis(seat.peer_id, who.name)
        if seat.peer.name != who.name or seat.peer.analysis != analysis:
            seat.peer.name, seat.peer.analysis = who.name, analysis
            _to_watchers(self.room, protocol.participant("consent", seat.peer_id, who.name, analysis))

    def _unseat(self, seat: Seat) -> None:
        peer = seat.peer
        if not isinstance(peer, MeetingPeer) or peer.owner is not self or self.room.students.get(peer.peer_id) is not peer:
            return
        if self.state.registry.leave(self.room, peer):
            _to_watchers(self.room, protocol.participant("left", peer.peer_id, peer.name, peer.analysis))
        peer.closing = True
        log.info("ingest %s room %s: %s left", self.service, self.room.room_id, peer.peer_id)

    def _follow_room(self) -> None:
        """The room object changes when it was unloaded and reloaded: seat everyone again in the new one."""
        live = self.state.registry.get(self.room.room_id)
        if live is None or live is self.room:
            return
        self.room = live
        for seat in self.seats.values():
            if seat.peer is not None:
                seat.peer = None
                self.seats[seat.who.id] = self._seat(seat.who)

    # -- frames
    def _frame(self, seat: Seat, event: Event) -> None:
        self.counters["frames"] += 1
        if seat.who.is_host:
            self.counters["host_frames"] += 1          # the teacher: never analysed
            return
        if event.source != "webcam":
            self.counters["screenshare_frames"] += 1
            return
        assert event.image is not None
        try:      # the header only (cheap): a bad frame does not use up the participant's frame budget
            images.check(event.image, self.limits.max_width, self.limits.max_height)
        except images.BadImage as exc:
            self.refuse("bad_image", f"frame of {seat.peer_id} skipped: {exc}")
            return
        if seat.rate is not None and not seat.rate.allow():
            self.refuse("over_rate", f"{seat.peer_id} sends more than {self.limits.max_fps:g} frames/s; excess dropped")
            return
        peer = seat.peer
        if peer is None or not peer.analysis:
            self.counters["not_analysed"] += 1          # opted out: the frame never leaves this server
            return
        bot = self.room.bot
        if bot is None:
            self.counters["no_bot"] += 1
            return
        now = time.time()
        t = event.t if event.t is not None and abs(event.t - now) <= CLOCK_SKEW_S else now
        if bot.send_frame(frames.pack(seat.peer_id, t, event.image)):
            self.counters["forwarded"] += 1
        else:
            self.refuse("bot_backlog", "the bot is not keeping up; frame dropped")

    async def close(self) -> None:
        for seat in list(self.seats.values()):
            self._unseat(seat)
        self.seats.clear()
        if self.chat is not None:
            await self.chat.close()


def _to_watchers(room: Room, message: dict[str, Any]) -> None:
    for target in room.watchers():
        target.send(message)


# ---- the hub: secrets, live connections, teacher switches -----------------------------------------------
@dataclass
class IngestHub:
    secrets: dict[str, tuple[str, str]] = field(default_factory=dict)     # sha256(secret) -> (room_id, service)
    current: dict[tuple[str, str], str] = field(default_factory=dict)     # (room_id, service) -> sha256(secret)
    connections: set[IngestConnection] = field(default_factory=set)
    teacher_off: set[tuple[str, str]] = field(default_factory=set)        # (room_id, peer_id) the teacher turned off
    counters: dict[str, Counter] = field(default_factory=dict)            # per room: frames, refusals by reason

    def create(self, room_id: str, service: str) -> str:
        self.revoke(room_id, service)
        secret = secrets.token_urlsafe(32)
        digest = token_hash(secret)
        self.secrets[digest] = (room_id, service)
        self.current[(room_id, service)] = digest
        return secret

    def revoke(self, room_id: str, service: str) -> bool:
        digest = self.current.pop((room_id, service), None)
        if digest is None:
            return False
        self.secrets.pop(digest, None)
        for conn in [c for c in self.connections if c.secret_hash == digest]:
            if conn.ws is not None:
                asyncio.ensure_future(conn.ws.close(code=CloseCode.UNAUTHORIZED, message=b"ingest URL revoked"))
        return True

    def lookup(self, service: str, secret: str) -> tuple[str, str] | None:
        """(room_id, sha256 of the secret) for a live secret of this service; None otherwise."""
        if not protocol.TOKEN_RE.match(secret):
            return None
        digest = token_hash(secret)
        entry = self.secrets.get(digest)
        if entry is None or entry[1] != service:
            return None
        # The dict finds the candidate by its hash; the comparison with the stored one is constant-time.
        if not same(self.current.get(entry, ""), digest):
            return None
        return entry[0], digest


INGEST_KEY = web.AppKey("ingest", IngestHub)
LIVE: weakref.WeakSet[IngestConnection] = weakref.WeakSet()   # every app's connections (relay's alert hook has no app)


def hub_of(app: web.Application) -> IngestHub:
    hub = app.get(INGEST_KEY)
    if hub is None:
        raise RuntimeError("create_app did not set up ingest")
    return hub


def setup(app: web.Application) -> None:
    """create_app's hook: the hub on the app."""
    app[INGEST_KEY] = IngestHub()


# ---- WebSocket: the service connects here ---------------------------------------------------------------
async def ws_ingest(request: web.Request) -> web.StreamResponse:
    service = request.match_info["service"]
    if service not in SERVICES:
        raise web.HTTPNotFound()
    state = state_of(request)
    hub = hub_of(request.app)
    cfg = state.settings.ingest
    ws = web.WebSocketResponse(heartbeat=state.cfg.heartbeat_seconds or None, max_msg_size=cfg.max_message_bytes)
    await ws.prepare(request)
    state.sockets.add(ws)
    found = hub.lookup(service, request.match_info["secret"])
    if found is None:
        log.warning("ingest %s: refused a connection with a wrong or revoked URL (from %s)", service, request.remote)
        await ws.close(code=CloseCode.UNAUTHORIZED, message=b"unknown or revoked ingest URL")
        return ws
    room_id, digest = found
    try:
        room = await state.live_room(room_id)
    except TooManyRooms:
        await ws.close(code=CloseCode.SERVER_FULL, message=b"server full")
        return ws
    if room is None:
        await ws.close(code=CloseCode.UNKNOWN_ROOM, message=b"unknown room")
        return ws
    conn = IngestConnection(state, hub, room, service, digest)
    conn.ws = ws
    hub.connections.add(conn)
    LIVE.add(conn)
    # The whole service stream: every participant at max_fps, plus events; a flood beyond is dropped.
    budget = cfg.max_fps * (state.cfg.max_participants_per_room + 10) + 20
    rate = RateLimit(budget, budget)
    log.info("ingest %s room %s: service connected", service, room_id)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if not rate.allow():
                    conn.refuse("over_rate", "too many messages; dropped")
                    continue
                try:
                    conn.on_text(msg.data)
                except Exception:       # a bug must cost one message, not the class
                    log.exception("ingest %s room %s: handling a message failed", service, room_id)
                    conn.counters["internal"] += 1
            elif msg.type == WSMsgType.BINARY:
                conn.refuse("bad_message", "binary message ignored (the services send JSON text)")
            else:
                if msg.type == WSMsgType.ERROR:
                    log.warning("ingest %s room %s: socket error (%s); closing", service, room_id, ws.exception())
                break
    except (ConnectionError, RuntimeError) as exc:
        log.info("ingest %s room %s: socket ended: %s", service, room_id, exc)
    finally:
        hub.connections.discard(conn)
        LIVE.discard(conn)
        await conn.close()
        log.info("ingest %s room %s: service disconnected (%s)", service, room_id,
                 dict(conn.counters))
    return ws


# ---- HTTP API (teacher token) ----------------------------------------------------------------------------
def ingest_url(request: web.Request, service: str, secret: str) -> str:
    base = state_of(request).cfg.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    return websocket_url(base, f"/ingest/{service}/{secret}")


async def create(request: web.Request) -> web.Response:
    from signaling.api import authorise, json_error, read_json_object
    room_id = request.match_info["room"]
    record = await authorise(request, room_id)
    if isinstance(record, web.Response):
        return record
    body = await read_json_object(request)
    if isinstance(body, web.Response):
        return body
    service = body.get("service")
    if service not in SERVICES:
        return json_error(400, f"service must be one of {', '.join(SERVICES)}")
    secret = hub_of(request.app).create(room_id, service)
    log.info("room %s: ingest URL for %s created (any previous one revoked)", room_id, service)
    return web.json_response({"url": ingest_url(request, service, secret), "service": service})


async def revoke(request: web.Request) -> web.Response:
    from signaling.api import authorise, json_error
    room_id = request.match_info["room"]
    record = await authorise(request, room_id)
    if isinstance(record, web.Response):
        return record
    service = request.query.get("service")
    if service not in SERVICES:
        return json_error(400, f"service must be one of {', '.join(SERVICES)}")
    revoked = hub_of(request.app).revoke(room_id, service)
    log.info("room %s: ingest URL for %s revoked (%s)", room_id, service, "was active" if revoked else "none active")
    return web.json_response({"ok": True, "revoked": revoked})


async def status(request: web.Request) -> web.Response:
    from signaling.api import authorise
    room_id = request.match_info["room"]
    record = await authorise(request, room_id)
    if isinstance(record, web.Response):
        return record
    hub = hub_of(request.app)
    services = {s: {"active": (room_id, s) in hub.current,
                    "connected": sum(1 for c in hub.connections if c.room.room_id == room_id and c.service == s)}
                for s in SERVICES}
    return web.json_response({"services": services, "counters": dict(hub.counters.get(room_id, {})),
                              "analysis_off": sorted(p for r, p in hub.teacher_off if r == room_id)})


async def consent(request: web.Request) -> web.Response:
    """The teacher turns analysis off (or back on) for a meeting participant: a switch the student link's page
    cannot offer in someone else's meeting."""
    from signaling.api import authorise, json_error, read_json_object
    room_id = request.match_info["room"]
    record = await authorise(request, room_id)
    if isinstance(record, web.Response):
        return record
    body = await read_json_object(request)
    if isinstance(body, web.Response):
        return body
    peer_id, analysis = body.get("peer_id"), body.get("analysis")
    if not isinstance(peer_id, str) or not protocol.is_id(peer_id) \
            or not peer_id.startswith(tuple(f"{p}-" for p in PREFIX.values())):
        return json_error(400, "peer_id must be the id of a meeting participant (rc-... or at-...)")
    if not isinstance(analysis, bool):
        return json_error(400, "analysis must be true or false")
    hub = hub_of(request.app)
    if analysis:
        hub.teacher_off.discard((room_id, peer_id))
    else:
        hub.teacher_off.add((room_id, peer_id))
    for conn in [c for c in hub.connections if c.room.room_id == room_id]:
        for seat in conn.seats.values():
            if seat.peer_id == peer_id and seat.peer is not None:
                conn._rename(seat, seat.who)      # recomputes analysis (name tag and the teacher's switch)
    log.info("room %s: the teacher turned analysis %s for %s", room_id, "on" if analysis else "off", peer_id)
    return web.json_response({"ok": True, "peer_id": peer_id, "analysis": analysis})


def on_alert(room: Room, alert: dict[str, Any]) -> None:
    """relay.on_alert's hook: with Attendee's chat, the alert also goes to the host as a direct message."""
    for conn in list(LIVE):
        if conn.room is room and conn.chat is not None:
            if conn.chat.can_whisper():
                conn.chat.post(f"classmood: {alert.get('message', 'alert')}", to=conn.chat.host)
            else:
                conn.counters["alerts_not_posted"] += 1   # no private chat on this platform (or host unknown)

