"""The WebSocket relay: /ws (students, teachers, the bot of each room) and /ws/worker (bot workers).

A connection goes hello -> admit (credentials, a seat in the room, welcome) -> serve (validated
messages, one handler per type in HANDLERS) -> leave. Who may talk to whom is decided here: students
signal only the bot, the bot signals only students, live state/alerts/session from the bot go only
to sockets that presented the teacher token.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable

from aiohttp import WSMsgType, web

from signaling import ingest, protocol
from signaling.auth import same, token_hash
from signaling.forwarded import address_block
from signaling.middleware import client_of, with_headers
from signaling.protocol import MEDIA_TYPES, CloseCode, ErrorCode, MessageType, ProtocolError, Role
from signaling.rooms import Peer, RateLimit, Room, RoomFull, TooManyRooms, new_id
from signaling.state import ServerState, state_of

log = logging.getLogger("classmood.signaling")
BOT_RATE_FACTOR = 10   # the bot speaks for a whole class: 10x a browser's message rate and burst


# ---- socket plumbing -------------------------------------------------------------------------
async def open_socket(state: ServerState, request: web.Request, max_size: int) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=state.cfg.heartbeat_seconds or None, max_msg_size=max_size)
    with_headers(ws)
    await ws.prepare(request)
    state.sockets.add(ws)
    return ws


def aborter(request: web.Request) -> Callable[[], None]:
    """Drops the TCP connection (a peer that stops reading must not hold the server's queue)."""
    def abort() -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()
    return abort


async def reject(ws: web.WebSocketResponse, code: str, text: str, close_code: int) -> None:
    try:
        if not ws.closed:
            await ws.send_json(protocol.error(code, text))
            await ws.close(code=close_code)
    except (ConnectionError, RuntimeError, asyncio.TimeoutError):
        pass


async def read_hello(state: ServerState, request: web.Request, ws: web.WebSocketResponse,
                     where: str) -> dict[str, Any] | None:
    """The validated hello, or None after answering/closing (or when the socket went away)."""
    cfg, pending = state.cfg, state.pending_hellos
    block = address_block(client_of(request))
    if pending.get(block, 0) >= cfg.max_pending_hellos_per_address:
        log.warning("%s: %s has %d sockets waiting for hello; refusing another", where, block, pending[block])
        await reject(ws, ErrorCode.BUSY, "too many connections from your address: try again shortly",
                     CloseCode.TRY_AGAIN_LATER)
        return None
    pending[block] = pending.get(block, 0) + 1
    try:
        return await _read_hello(state, ws, where)
    finally:
        pending[block] -= 1
        if pending[block] <= 0:
            del pending[block]


async def _read_hello(state: ServerState, ws: web.WebSocketResponse, where: str) -> dict[str, Any] | None:
    cfg = state.cfg
    try:
        # One deadline for the whole read: ws.receive(timeout=...) restarts its timer after every
        # ping a client sends, so a socket that pings and never says hello would stay forever.
        msg = await asyncio.wait_for(ws.receive(), cfg.hello_timeout_seconds)
    except asyncio.TimeoutError:
        log.info("%s: no hello within %.0f s; closing", where, cfg.hello_timeout_seconds)
        await reject(ws, ErrorCode.TIMEOUT, f"no hello within {cfg.hello_timeout_seconds:.0f} s", CloseCode.TIMEOUT)
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        log.info("%s: socket closed before hello", where)
        return None
    try:
        if msg.type != WSMsgType.TEXT:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "messages are JSON text frames")
        return protocol.parse_hello_raw(msg.data, cfg.max_message_bytes)
    except ProtocolError as exc:
        log.info("%s: bad hello (%s)", where, exc.code)
        await reject(ws, exc.code, exc.message, CloseCode.BAD_HELLO)
        return None


# ---- /ws/worker ------------------------------------------------------------------------------
async def ws_worker(request: web.Request) -> web.WebSocketResponse:
    state = state_of(request)
    cfg, registry = state.cfg, state.registry
    ws = await open_socket(state, request, cfg.max_message_bytes)
    worker: Peer | None = None
    try:
        hello = await read_hello(state, request, ws, "/ws/worker")
        if hello is None:
            return ws
        if hello["role"] != Role.WORKER or not same(hello["key"], cfg.worker_key):
            log.warning("/ws/worker: refused a worker with a wrong key (from %s)", client_of(request))
            await reject(ws, ErrorCode.UNAUTHORIZED, "wrong worker key", CloseCode.UNAUTHORIZED)
            return ws
        # The worker's own id when it sent one: its room leases in the database are under that id.
        worker = Peer(hello.get("worker") or new_id(), Role.WORKER.value, ws, abort=aborter(request))
        worker.start()
        registry.add_worker(worker)
        worker.send(protocol.welcome(worker.peer_id, Role.WORKER.value))
        log.info("bot worker %s connected (%d connected)", worker.peer_id, len(registry.workers))
        rate = RateLimit(cfg.messages_per_second, cfg.message_burst)
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            if not rate.allow():
                worker.send(protocol.error(ErrorCode.RATE_LIMITED, "too many messages"))
                worker.close(CloseCode.LIMIT)
                break
            try:
                if protocol.parse(msg.data, Role.WORKER, cfg.max_message_bytes)["type"] == MessageType.PING:
                    worker.send(protocol.message(MessageType.PONG))
            except ProtocolError as exc:
                worker.send(protocol.error(exc.code, exc.message))
    except (ConnectionError, RuntimeError) as exc:
        log.info("/ws/worker: socket ended: %s", exc)
    finally:
        if worker is not None:
            registry.remove_worker(worker)
            await worker.stop()
            log.info("bot worker %s disconnected (%d connected)", worker.peer_id, len(registry.workers))
    return ws


# ---- /ws -------------------------------------------------------------------------------------
async def ws_room(request: web.Request) -> web.WebSocketResponse:
    state = state_of(request)
    cfg = state.cfg
    # The bot's live state may be larger than a browser's message; per-role limits are applied after hello.
    ws = await open_socket(state, request, max(cfg.max_message_bytes, cfg.max_bot_message_bytes))
    peer: Peer | None = None
    room: Room | None = None
    try:
        hello = await read_hello(state, request, ws, "/ws")
        if hello is None:
            return ws
        if hello["role"] == Role.WORKER:
            await reject(ws, ErrorCode.BAD_FIELD, "bot workers connect to /ws/worker", CloseCode.BAD_HELLO)
            return ws
        room, peer = await admit(state, request, ws, hello)
        if room is not None and peer is not None:
            await serve(state, room, peer, ws)
    except (ConnectionError, RuntimeError) as exc:
        log.info("/ws: socket ended: %s", exc)
    except Exception:     # e.g. the store failed while loading the room: this socket only
        log.exception("/ws: the connection failed")
        await reject(ws, ErrorCode.INTERNAL, "the server could not handle this connection", CloseCode.INTERNAL_ERROR)
    finally:
        if peer is not None and room is not None:
            leave(state, room, peer)
            await peer.stop()
    return ws


async def admit(state: ServerState, request: web.Request, ws: web.WebSocketResponse,
                hello: dict[str, Any]) -> tuple[Room | None, Peer | None]:
    cfg = state.cfg
    role = hello["role"]
    try:
        room = await state.live_room(hello["room"])
    except TooManyRooms:
        await reject(ws, ErrorCode.SERVER_FULL, "too many live rooms on this server", CloseCode.SERVER_FULL)
        return None, None
    if room is None:
        log.info("/ws: %s hello for an unknown room", role)
        await reject(ws, ErrorCode.UNKNOWN_ROOM, "no such room", CloseCode.UNKNOWN_ROOM)
        return None, None
    if role == Role.STUDENT:
        ok = same(hello["key"], room.join_key)
    elif role == Role.TEACHER:
        ok = same(token_hash(hello["token"]), room.teacher_token_hash)
    else:
        # The bot: the room's bot token (sent to a worker by an invite), or the teacher token together
        # with the operator's worker key. The teacher token alone is not enough: whoever holds the
        # teacher link could otherwise take the bot's seat and receive every student's camera.
        ok = same(hello["token"], room.bot_token) or (
            same(token_hash(hello["token"]), room.teacher_token_hash)
            and same(hello.get("key", ""), cfg.worker_key))
    if not ok:
        log.warning("room %s: a %s presented a wrong key/token (from %s)", room.room_id, role, client_of(request))
        await reject(ws, ErrorCode.UNAUTHORIZED, "wrong key or token for this room", CloseCode.UNAUTHORIZED)
        return None, None
    if ws.closed:   # went away while the room was being loaded
        log.info("room %s: %s left during the handshake", room.room_id, role)
        return None, None
    if role == Role.STUDENT and state.joins is not None and not state.joins.allow(client_of(request), room.room_id):
        log.warning("room %s: student join rate exceeded (from %s); refused", room.room_id, client_of(request))
        await reject(ws, ErrorCode.RATE_LIMITED, "too many students joining at once: try again in a few seconds",
                     CloseCode.LIMIT)
        return None, None
    peer = Peer(new_id(), role, ws, hello.get("name", ""), hello.get("analysis", True), abort=aborter(request))
    try:
        replaced = state.registry.join(room, peer)
    except RoomFull:
        log.warning("room %s is full; a %s was refused", room.room_id, role)
        await reject(ws, ErrorCode.ROOM_FULL, "this room is full", CloseCode.LIMIT)
        return None, None
    peer.start()
    bot_id = room.bot.peer_id if room.bot else None
    welcome = functools.partial(protocol.welcome, peer.peer_id, role, ice_servers=state.ice_servers_for(peer.peer_id),
                                video=state.video, bot=bot_id, session_id=room.session_id, media=state.media())
    if role == Role.STUDENT:
        peer.send(welcome())
        to_watchers(room, protocol.participant("joined", peer.peer_id, peer.name, peer.analysis))
    elif role == Role.TEACHER:
        peer.send(welcome(participants=room.participants()))
        if room.last_state is not None:
            peer.send(room.last_state)
    else:
        if replaced is not None:  # a restarted bot takes over the room and its session
            log.info("room %s: bot %s replaced by %s", room.room_id, replaced.peer_id, peer.peer_id)
            replaced.send(protocol.error(ErrorCode.REPLACED, "another bot joined this room"))
            replaced.close(CloseCode.REPLACED)
        peer.send(welcome(participants=room.participants()))
        to_students_and_teachers(room, protocol.bot_presence(peer.peer_id))
    if room.meeting is not None:
        room.meeting.joined(room, peer)
    log.info("room %s: %s %s joined (%d connected)", room.room_id, role, peer.peer_id, room.size())
    return room, peer


async def serve(state: ServerState, room: Room, peer: Peer, ws: web.WebSocketResponse) -> None:
    cfg = state.cfg
    is_bot = peer.role == Role.BOT
    limit = cfg.max_bot_message_bytes if is_bot else cfg.max_message_bytes
    factor = BOT_RATE_FACTOR if is_bot else 1
    rate = RateLimit(cfg.messages_per_second * factor, cfg.message_burst * factor)
    # A teacher joining a class of N subscribes N times and answers N offers at once: media messages
    # have their own budget, sized by the room, so they neither trip nor widen the general limit.
    media_rate = RateLimit(cfg.messages_per_second, 2 * cfg.max_participants_per_room + cfg.message_burst)
    async for msg in ws:
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            if msg.type == WSMsgType.ERROR:
                log.info("room %s: %s %s socket error: %s", room.room_id, peer.role, peer.peer_id, ws.exception())
            break
        if peer.closing:
            break
        if not rate.allow():
            log.warning("room %s: %s %s sent too many messages; closing", room.room_id, peer.role, peer.peer_id)
            peer.send(protocol.error(ErrorCode.RATE_LIMITED, "too many messages"))
            peer.close(CloseCode.LIMIT)
            break
        try:
            data = protocol.parse(msg.data, peer.role, limit)
            if data["type"] in MEDIA_TYPES:
                rate.refund()
                if not media_rate.allow():
                    raise ProtocolError(ErrorCode.RATE_LIMITED, "too many audio/video requests; slow down")
            handle(room, peer, data)
        except ProtocolError as exc:
            peer.send(protocol.error(exc.code, exc.message))
        except Exception:  # a bug must cost one message, not the connection or the room
            log.exception("room %s: handling a %s message failed", room.room_id, peer.role)
            peer.send(protocol.error(ErrorCode.INTERNAL, "the server could not handle that message"))


def leave(state: ServerState, room: Room, peer: Peer) -> None:
    if not state.registry.leave(room, peer):
        log.info("room %s: %s %s disconnected (no longer seated)", room.room_id, peer.role, peer.peer_id)
        return
    if room.meeting is not None:
        room.meeting.left(room, peer)
    if peer.role == Role.STUDENT:
        to_watchers(room, protocol.participant("left", peer.peer_id, peer.name, peer.analysis))
    elif peer.role == Role.BOT:
        to_students_and_teachers(room, protocol.bot_presence(None))
    log.info("room %s: %s %s left (%d connected)", room.room_id, peer.role, peer.peer_id, room.size())


# ---- fan-out ---------------------------------------------------------------------------------
def to_watchers(room: Room, message: dict[str, Any]) -> None:
    """The bot and the teachers (presence and consent)."""
    for target in room.watchers():
        target.send(message)


def to_teachers(room: Room, message: dict[str, Any]) -> None:
    for target in list(room.teachers.values()):
        target.send(message)


def to_students_and_teachers(room: Room, message: dict[str, Any]) -> None:
    for other in [*room.students.values(), *room.teachers.values()]:
        other.send(message)


# ---- messages after hello: one handler per type ----------------------------------------------
# A handler gets a message already validated for the sender's role by protocol.parse (INBOUND), and
# raises ProtocolError to answer the sender with an error (the connection stays open).
Handler = Callable[[Room, Peer, dict[str, Any]], None]


def handle(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    HANDLERS[data["type"]](room, peer, data)


def on_ping(_room: Room, peer: Peer, _data: dict[str, Any]) -> None:
    peer.send(protocol.message(MessageType.PONG))


def on_signal(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    if room.meeting is not None:
        # In a meeting, video reaches the bot through the SFU: the bot answers the SFU's offers.
        if peer.role != Role.BOT or room.bot is not peer or data["data"]["type"] != "answer":
            raise ProtocolError(ErrorCode.BAD_TARGET, "in a meeting, video goes through the media server: publish it")
        room.meeting.bot_answer_soon(room, data["to"], data["data"]["sdp"])
        return
    target: Peer | None = None
    if peer.role == Role.STUDENT and not peer.analysis:
        # Backs up the bot's own check: an opted-out student's camera never reaches the assistant.
        raise ProtocolError(ErrorCode.OPTED_OUT, "analysis is off for you: turn it on before sending video")
    if peer.role == Role.STUDENT and room.bot is not None and data["to"] == room.bot.peer_id:
        target = room.bot
    elif peer.role == Role.BOT and room.bot is peer:
        target = room.students.get(data["to"])
    if target is None:
        raise ProtocolError(ErrorCode.BAD_TARGET, "students may signal only the bot, the bot only students of its room")
    target.send(protocol.signal_from(peer.peer_id, data["data"]))


def on_consent(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    if peer.analysis != data["analysis"]:
        peer.analysis = data["analysis"]
        log.info("room %s: student %s analysis %s", room.room_id, peer.peer_id, "on" if peer.analysis else "off")
    to_watchers(room, protocol.participant("consent", peer.peer_id, peer.name, peer.analysis))
    if room.meeting is not None:
        room.meeting.consent_changed(room, peer)


def on_control(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    if room.bot is None:
        raise ProtocolError(ErrorCode.NO_BOT, "the assistant is not in the room")
    room.bot.send(protocol.control_from(peer.peer_id, data))


def from_serving_bot(handler: Handler) -> Handler:
    """Only the bot that holds the room's seat may speak for it (a replaced one is still connected)."""
    def checked(room: Room, peer: Peer, data: dict[str, Any]) -> None:
        if room.bot is not peer:
            raise ProtocolError(ErrorCode.REPLACED, "this bot no longer serves the room")
        handler(room, peer, data)
    return checked


def on_media(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    """publish, unpublish, subscribe, unsubscribe, answer: the meeting makes the SFU calls."""
    if room.meeting is None:
        raise ProtocolError(ErrorCode.BAD_TYPE, "this server has no media server: video goes to the bot directly")
    if peer.role == Role.BOT:
        if room.bot is not peer:
            raise ProtocolError(ErrorCode.REPLACED, "this bot no longer serves the room")
        room.meeting.resubscribe_bot_soon(room, data["feed"])
        return
    room.meeting.handle(room, peer, data)


@from_serving_bot
def on_session(room: Room, peer: Peer, data: dict[str, Any]) -> None:
    if data["session_id"] == room.ended_session:
        # A bot that was away when the teacher ended the class: that session is over, it must not go on.
        peer.send(protocol.message(MessageType.CLASS_ENDED, session_id=data["session_id"], ended_at=None))
        peer.close(CloseCode.ENDED)
        return
    if room.session_id != data["session_id"]:
        room.session_id = data["session_id"]
        log.info("room %s: session %s", room.room_id, room.session_id)
    to_teachers(room, protocol.message(MessageType.SESSION, session_id=room.session_id))


@from_serving_bot
def on_state(room: Room, _peer: Peer, data: dict[str, Any]) -> None:
    room.last_state = protocol.message(MessageType.STATE, state=data["state"])
    to_teachers(room, room.last_state)


@from_serving_bot
def on_alert(room: Room, _peer: Peer, data: dict[str, Any]) -> None:
    to_teachers(room, protocol.message(MessageType.ALERT, alert=data["alert"]))
    ingest.on_alert(room, data["alert"])     # a meeting on Zoom/Teams via Attendee: also a DM to the host


# Every type in protocol.INBOUND has its handler here (tests/test_signaling.py checks they match).
HANDLERS: dict[str, Handler] = {
    MessageType.PING: on_ping,
    MessageType.SIGNAL: on_signal,
    MessageType.CONSENT: on_consent,
    MessageType.CONTROL: on_control,
    MessageType.SESSION: on_session,
    MessageType.STATE: on_state,
    MessageType.ALERT: on_alert,
    **{kind: on_media for kind in MEDIA_TYPES},
}
