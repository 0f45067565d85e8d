"""The aiohttp signaling server: rooms and secret tokens, the WebSocket relay, pages and the review API.

Who may talk to whom is decided here and only here: students signal only the bot, the bot signals
only students, live state/alerts/session from the bot go only to sockets that presented the teacher
token. docs/architecture.md is the contract; signaling/protocol.py validates every inbound message.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from core.errors import describe
from core.settings import ServerSettings, Settings
from signaling import protocol
from signaling.forwarded import address_block, client_address
from signaling.meeting import Meeting
from signaling.protocol import ProtocolError
from signaling.rooms import Peer, RateLimit, Registry, Room, RoomFull, TooManyRooms, new_id
from signaling.sfu import Sfu
from signaling.store import Store

__all__ = ["create_app", "AccessLogger", "Store", "token_hash", "CSP"]

log = logging.getLogger("classmood.signaling")
STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_BODY = 4096
CSV_CHUNK_LINES = 2000
RETENTION_CHECK_SECONDS = 3600.0
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Permissions-Policy": "camera=(self), microphone=(self), geolocation=()",   # a meeting needs both
    "Cross-Origin-Opener-Policy": "same-origin",
}
# WebSocket close codes (4400..4499: do not retry with the same credentials)
CLOSE_BAD_HELLO, CLOSE_UNAUTHORIZED, CLOSE_UNKNOWN_ROOM, CLOSE_TIMEOUT = 4400, 4401, 4404, 4408
CLOSE_REPLACED, CLOSE_IDLE, CLOSE_LIMIT, CLOSE_SERVER_FULL = 4409, 4410, 4429, 4503

SETTINGS_KEY = web.AppKey("settings", Settings)
REGISTRY_KEY = web.AppKey("registry", Registry)
SOCKETS_KEY = web.AppKey("sockets", weakref.WeakSet)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def bot_token_for(room_id: str, secret: str) -> str:
    """The room's bot token (what an invite hands a worker): derived, not random, so that a bot can
    rejoin its room after the server restarts or unloads the room. Only the server and the workers know
    the secret (the worker key), and workers are already trusted with every invite."""
    digest = hmac.new(secret.encode("utf-8", "surrogatepass"), b"classmood bot token\x00" + room_id.encode(),
                      hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


def bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and protocol.TOKEN_RE.match(value) else None


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


CLIENT = web.RequestKey("client", str)   # request key: the client's address, past trusted reverse proxies


def client_of(request: web.BaseRequest) -> str:
    """The address limits and logs use (set by the client_address middleware; the peer otherwise)."""
    return request.get(CLIENT) or request.remote or "?"


class AccessLogger(AbstractAccessLogger):
    """Access log without query strings (student links carry the join key in `?k=`)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:  # noqa: A002
        self.logger.info("%s %s %s %s %.1fms", client_of(request), request.method, request.path,
                         response.status, time * 1000)


@web.middleware
async def security_headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    if not response.prepared:      # streamed responses (CSV, WebSocket) set theirs before prepare
        for name, value in PAGE_HEADERS.items():
            response.headers.setdefault(name, value)
    if isinstance(response, web.HTTPException):
        raise response
    return response


def client_address_middleware(trusted: list):
    @web.middleware
    async def resolve_client(request: web.Request, handler):
        request[CLIENT] = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted)
        return await handler(request)
    return resolve_client


def _with_headers(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in PAGE_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def create_app(settings: Settings, store: Store | None = None, static_dir: Path | None = None,
               sfu: Sfu | None = None) -> web.Application:
    """The signaling server. `store` defaults to an in-memory MemoryStore; `static_dir` to signaling/static.
    With `sfu` (a connected signaling.sfu.Sfu), every room is a meeting on Janus (signaling/meeting.py);
    without it, students send their video straight to the bot."""
    if store is None:
        from signaling.memory_store import MemoryStore
        store = MemoryStore()
    cfg: ServerSettings = settings.server
    ice_servers = settings.ice_servers()
    video = {"width": cfg.video_width, "height": cfg.video_height, "fps": cfg.video_fps}
    registry = Registry(cfg.max_rooms, cfg.max_participants_per_room, cfg.room_idle_seconds,
                        cfg.max_teachers_per_room)
    sockets: weakref.WeakSet = weakref.WeakSet()
    meeting = None if sfu is None else Meeting(
        sfu, lambda: list(registry.rooms.values()), students_see_students=cfg.students_see_students,
        publish={"width": cfg.meeting_video_width, "height": cfg.meeting_video_height,
                 "fps": cfg.meeting_video_fps, "simulcast": True})
    media = meeting.welcome_media() if meeting else None
    static = Path(static_dir or STATIC_DIR).resolve()
    app = web.Application(middlewares=[client_address_middleware(settings.trusted_proxy_networks()),
                                       security_headers], client_max_size=64 * 1024)
    app[SETTINGS_KEY] = settings
    app[REGISTRY_KEY] = registry
    app[SOCKETS_KEY] = sockets
    default_key = cfg.worker_key == ServerSettings.worker_key
    if default_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("server.worker_key is the development default on a non-loopback host: set your own")
    # The development key is public, so tokens derived from it would be guessable: with it, bot tokens
    # come from a secret of this process instead (they then do not survive a restart).
    bot_token_secret = secrets.token_urlsafe(32) if default_key else cfg.worker_key

    def new_room(room_id: str, title: str, join_key: str, teacher_token_hash: str) -> Room:
        return Room(room_id, title, join_key, teacher_token_hash, bot_token=bot_token_for(room_id, bot_token_secret))

    # ---- rooms: memory first, then the store ---------------------------------------------------
    async def room_record(room_id: str) -> dict[str, Any] | None:
        room = registry.get(room_id)
        if room is not None:
            return {"room_id": room.room_id, "title": room.title, "join_key": room.join_key,
                    "teacher_token_hash": room.teacher_token_hash}
        if not protocol.is_id(room_id):
            return None
        return await asyncio.to_thread(store.get_room, room_id)

    async def live_room(room_id: str) -> Room | None:
        """The live room (loaded from the store if needed). Raises TooManyRooms."""
        room = registry.get(room_id)
        if room is None:
            record = await asyncio.to_thread(store.get_room, room_id)
            if record is None:
                return None
            room = registry.add(new_room(room_id, record.get("title") or "", record["join_key"],
                                         record["teacher_token_hash"]))
        return room

    async def authorise(request: web.Request, room_id: str) -> web.Response | dict[str, Any]:
        """The room record if the request carries its teacher token; 401 / 404 otherwise."""
        token = bearer(request)
        if token is None:
            return json_error(401, "teacher token required (Authorization: Bearer TOKEN)")
        record = await room_record(room_id)
        if record is None:
            return json_error(404, "unknown room")
        if not _same(token_hash(token), record["teacher_token_hash"]):
            return json_error(401, "wrong teacher token for this room")
        return record

    def links(request: web.Request, room_id: str, join_key: str, token: str | None = None) -> dict[str, str]:
        # server.public_url when set; else the address the caller reached us on (not 0.0.0.0 or port 0)
        base = cfg.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
        out = {"student_url": f"{base}/join/{room_id}?k={join_key}"}
        if token:
            out.update(teacher_url=f"{base}/teach/{room_id}#t={token}", review_url=f"{base}/review/{room_id}#t={token}")
        return out

    # ---- pages -----------------------------------------------------------------------------------
    def page(name: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            path = static / name
            if not path.is_file():
                raise web.HTTPNotFound(text="page not installed")
            return web.FileResponse(path, headers={"Cache-Control": "no-store"})
        return handler

    async def static_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if not name or name.startswith(".") or any(c in name for c in "/\\\x00:") or ".." in name:
            raise web.HTTPNotFound()
        path = (static / name).resolve()
        if path.parent != static or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def policy(_request: web.Request) -> web.Response:
        """What the join page tells students before they join (nothing secret)."""
        return web.json_response({"retention_days": settings.storage.retention_days})

    async def healthz(_request: web.Request) -> web.Response:
        # media: the meeting's media server as this server sees it (sfu_connected false while Janus is away).
        media_state = {"mode": "sfu", "sfu_connected": sfu.ready} if sfu is not None else {"mode": "direct"}
        return web.json_response({"ok": True, "rooms": len(registry.rooms), "workers": len(registry.workers),
                                  "media": media_state})

    # ---- HTTP API --------------------------------------------------------------------------------
    room_buckets: dict[str, RateLimit] = {}

    def room_creation_allowed(address: str) -> bool:
        per_minute = cfg.rooms_per_minute_per_address
        if per_minute <= 0:
            return True                       # 0 = no limit (a trusted deployment behind its own gate)
        if len(room_buckets) > 10_000:        # bounded memory: forget addresses whose bucket has refilled
            for key in [k for k, b in room_buckets.items() if b.full()]:
                del room_buckets[key]
        bucket = room_buckets.setdefault(address_block(address), RateLimit(per_minute / 60.0, per_minute))
        return bucket.allow()

    async def create_room(request: web.Request) -> web.Response:
        if (request.content_length or 0) > MAX_BODY:
            return json_error(413, f"request body larger than {MAX_BODY} bytes")
        title = ""
        raw = await request.read() if request.can_read_body else b""    # capped by client_max_size (413)
        if len(raw) > MAX_BODY:
            return json_error(413, f"request body larger than {MAX_BODY} bytes")
        if raw.strip():
            try:
                body = json.loads(raw.decode("utf-8"))
            except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
                return json_error(400, "body must be JSON")
            if not isinstance(body, dict):
                return json_error(400, "body must be a JSON object")
            try:
                title = protocol.clean_title(body.get("title"))
            except ProtocolError:
                return json_error(400, f"title must be text of at most {protocol.MAX_TITLE} characters")
        if not room_creation_allowed(client_of(request)):
            log.warning("room creation rate limit hit by %s", client_of(request))
            return json_error(429, "too many rooms created from your address; wait a minute",
                              headers={"Retry-After": "60"})
        if not registry.has_capacity():
            return json_error(503, "too many live rooms on this server; try again later")
        room_id, join_key, token = new_id(), secrets.token_urlsafe(12), secrets.token_urlsafe(24)
        room = new_room(room_id, title, join_key, token_hash(token))
        try:
            await asyncio.to_thread(store.create_room, room_id, title, join_key, room.teacher_token_hash)
            registry.add(room)
        except TooManyRooms:
            return json_error(503, "too many live rooms on this server; try again later")
        except Exception:
            log.exception("creating room %s failed", room_id)
            return json_error(500, "the room could not be saved")
        log.info("room %s created", room_id)
        return web.json_response({"room": room_id, "title": title, "teacher_token": token,
                                  **links(request, room_id, join_key, token)})

    async def room_info(request: web.Request) -> web.Response:
        record = await authorise(request, request.match_info["room"])
        if isinstance(record, web.Response):
            return record
        room = registry.get(record["room_id"])
        return web.json_response({
            "room": record["room_id"], "title": record.get("title") or "",
            **links(request, record["room_id"], record["join_key"]),
            "bot": room.bot.peer_id if room and room.bot else None,
            "session_id": room.session_id if room else None,
            "participants": room.participants() if room else [],
            "teachers": len(room.teachers) if room else 0,
            "workers": len(registry.workers)})

    async def invite(request: web.Request) -> web.Response:
        record = await authorise(request, request.match_info["room"])
        if isinstance(record, web.Response):
            return record
        try:
            room = await live_room(record["room_id"])
        except TooManyRooms:
            return json_error(503, "too many live rooms on this server; try again later")
        if room is None:
            return json_error(404, "unknown room")
        if room.bot is not None:
            return web.json_response({"ok": True, "already_present": True, "bot": room.bot.peer_id})
        if room.invite_pending():
            return web.json_response({"ok": True, "already_invited": True})
        for worker in registry.pick_workers():
            if worker.send(protocol.invite(room.room_id, room.bot_token)):
                room.worker_id, room.invited_at = worker.peer_id, time.monotonic()
                log.info("room %s: invite sent to worker %s", room.room_id, worker.peer_id)
                return web.json_response({"ok": True, "worker": worker.peer_id})
        return json_error(503, "no bot worker is available: start one with `python -m bot worker`")

    async def review_access(request: web.Request, sid: str) -> web.Response | str:
        """The session's room id when the bearer token owns that room; else a 401 / 404 / 403 response."""
        token = bearer(request)
        if token is None:
            return json_error(401, "teacher token required (Authorization: Bearer TOKEN)")
        room_id = await asyncio.to_thread(store.session_room, sid) if protocol.is_id(sid) else None
        if room_id is None:
            return json_error(404, "unknown session")
        record = await room_record(room_id)
        if record is None or not _same(token_hash(token), record["teacher_token_hash"]):
            return json_error(403, "this token does not own that session")
        return room_id

    async def sessions(request: web.Request) -> web.Response:
        record = await authorise(request, request.match_info["room"])
        if isinstance(record, web.Response):
            return record
        return web.json_response({"room": record["room_id"], "retention_days": settings.storage.retention_days,
                                  "sessions": await asyncio.to_thread(store.list_sessions, record["room_id"])})

    async def review(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        access = await review_access(request, sid)
        if isinstance(access, web.Response):
            return access
        try:
            bucket = float(request.query.get("bucket", "10"))
        except ValueError:
            bucket = float("nan")
        if not 1.0 <= bucket <= 3600.0:
            return json_error(400, "bucket must be a number of seconds in [1, 3600]")
        data = await asyncio.to_thread(store.session_review, sid, bucket)
        return web.json_response(data) if data is not None else json_error(404, "unknown session")

    async def delete_session(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        room_id = await review_access(request, sid)
        if isinstance(room_id, web.Response):
            return room_id
        room = registry.get(room_id)
        if room is not None and room.bot is not None and room.session_id == sid:
            return json_error(409, "the assistant is still in the room recording this session; "
                                   "end the class (or let the assistant leave) first")
        if not await asyncio.to_thread(store.delete_session, sid):
            return json_error(404, "unknown session")
        log.info("room %s: session %s deleted by its teacher", room_id, sid)
        return web.json_response({"deleted": sid})

    def csv_handler(kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            sid = request.match_info["sid"]
            access = await review_access(request, sid)
            if isinstance(access, web.Response):
                return access
            lines: Iterator[str] = getattr(store, f"iter_{kind}_csv")(sid)
            response = _with_headers(web.StreamResponse(headers={
                "Content-Type": "text/csv; charset=utf-8", "Cache-Control": "no-store",
                "Content-Disposition": f'attachment; filename="classmood-{sid}-{kind}.csv"'}))
            try:
                await response.prepare(request)
                while True:
                    chunk = await asyncio.to_thread(_take, lines, CSV_CHUNK_LINES)
                    if not chunk:
                        break
                    await response.write("".join(chunk).encode("utf-8"))
                await response.write_eof()
            except (ConnectionError, RuntimeError) as exc:
                log.info("%s.csv download of session %s ended early: %s", kind, sid, exc)
            finally:
                close = getattr(lines, "close", None)
                if close is not None:      # release the database cursor behind the generator
                    await asyncio.to_thread(close)
            return response
        return handler

    # ---- WebSockets ------------------------------------------------------------------------------
    async def open_socket(request: web.Request, max_size: int) -> web.WebSocketResponse:
        ws = _with_headers(web.WebSocketResponse(heartbeat=cfg.heartbeat_seconds or None, max_msg_size=max_size))
        await ws.prepare(request)
        sockets.add(ws)
        return ws

    def aborter(request: web.Request):
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

    pending_hellos: dict[str, int] = {}

    async def read_hello(request: web.Request, ws: web.WebSocketResponse, where: str) -> dict[str, Any] | None:
        """The validated hello, or None after answering/closing (or when the socket went away)."""
        block = address_block(client_of(request))
        if pending_hellos.get(block, 0) >= cfg.max_pending_hellos_per_address:
            log.warning("%s: %s has %d sockets waiting for hello; refusing another", where, block,
                        pending_hellos[block])
            await reject(ws, "busy", "too many connections from your address: try again shortly",
                         WSCloseCode.TRY_AGAIN_LATER)
            return None
        pending_hellos[block] = pending_hellos.get(block, 0) + 1
        try:
            return await _read_hello(ws, where)
        finally:
            pending_hellos[block] -= 1
            if pending_hellos[block] <= 0:
                del pending_hellos[block]

    async def _read_hello(ws: web.WebSocketResponse, where: str) -> dict[str, Any] | None:
        try:
            # One deadline for the whole read: ws.receive(timeout=...) restarts its timer after every
            # ping a client sends, so a socket that pings and never says hello would stay forever.
            msg = await asyncio.wait_for(ws.receive(), cfg.hello_timeout_seconds)
        except asyncio.TimeoutError:
            log.info("%s: no hello within %.0f s; closing", where, cfg.hello_timeout_seconds)
            await reject(ws, "timeout", f"no hello within {cfg.hello_timeout_seconds:.0f} s", CLOSE_TIMEOUT)
            return None
        if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
            log.info("%s: socket closed before hello", where)
            return None
        try:
            if msg.type != WSMsgType.TEXT:
                raise ProtocolError("bad_message", "messages are JSON text frames")
            return protocol.parse_hello_raw(msg.data, cfg.max_message_bytes)
        except ProtocolError as exc:
            log.info("%s: bad hello (%s)", where, exc.code)
            await reject(ws, exc.code, exc.message, CLOSE_BAD_HELLO)
            return None

    async def ws_worker(request: web.Request) -> web.WebSocketResponse:
        ws = await open_socket(request, cfg.max_message_bytes)
        worker: Peer | None = None
        try:
            hello = await read_hello(request, ws, "/ws/worker")
            if hello is None:
                return ws
            if hello["role"] != "worker" or not _same(hello["key"], cfg.worker_key):
                log.warning("/ws/worker: refused a worker with a wrong key (from %s)", client_of(request))
                await reject(ws, "unauthorized", "wrong worker key", CLOSE_UNAUTHORIZED)
                return ws
            worker = Peer(new_id(), "worker", ws, abort=aborter(request))
            worker.start()
            registry.add_worker(worker)
            worker.send(protocol.welcome(worker.peer_id, "worker"))
            log.info("bot worker %s connected (%d connected)", worker.peer_id, len(registry.workers))
            rate = RateLimit(cfg.messages_per_second, cfg.message_burst)
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break
                if not rate.allow():
                    worker.send(protocol.error("rate_limited", "too many messages"))
                    worker.close(CLOSE_LIMIT)
                    break
                try:
                    if protocol.parse(msg.data, "worker", cfg.max_message_bytes)["type"] == "ping":
                        worker.send(protocol.message("pong"))
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

    async def ws_room(request: web.Request) -> web.WebSocketResponse:
        # The bot's live state may be larger than a browser's message; per-role limits are applied after hello.
        ws = await open_socket(request, max(cfg.max_message_bytes, cfg.max_bot_message_bytes))
        peer: Peer | None = None
        room: Room | None = None
        try:
            hello = await read_hello(request, ws, "/ws")
            if hello is None:
                return ws
            if hello["role"] == "worker":
                await reject(ws, "bad_field", "bot workers connect to /ws/worker", CLOSE_BAD_HELLO)
                return ws
            room, peer = await admit(request, ws, hello)
            if room is not None and peer is not None:
                await serve(room, peer, ws)
        except (ConnectionError, RuntimeError) as exc:
            log.info("/ws: socket ended: %s", exc)
        except Exception:     # e.g. the store failed while loading the room: this socket only
            log.exception("/ws: the connection failed")
            await reject(ws, "internal", "the server could not handle this connection", WSCloseCode.INTERNAL_ERROR)
        finally:
            if peer is not None and room is not None:
                leave(room, peer)
                await peer.stop()
        return ws

    async def admit(request: web.Request, ws: web.WebSocketResponse,
                    hello: dict[str, Any]) -> tuple[Room | None, Peer | None]:
        role = hello["role"]
        try:
            room = await live_room(hello["room"])
        except TooManyRooms:
            await reject(ws, "server_full", "too many live rooms on this server", CLOSE_SERVER_FULL)
            return None, None
        if room is None:
            log.info("/ws: %s hello for an unknown room", role)
            await reject(ws, "unknown_room", "no such room", CLOSE_UNKNOWN_ROOM)
            return None, None
        if role == "student":
            ok = _same(hello["key"], room.join_key)
        elif role == "teacher":
            ok = _same(token_hash(hello["token"]), room.teacher_token_hash)
        else:
            # The bot: the room's bot token (sent to a worker by an invite), or the teacher token together
            # with the operator's worker key. The teacher token alone is not enough: whoever holds the
            # teacher link could otherwise take the bot's seat and receive every student's camera.
            ok = _same(hello["token"], room.bot_token) or (
                _same(token_hash(hello["token"]), room.teacher_token_hash)
                and _same(hello.get("key", ""), cfg.worker_key))
        if not ok:
            log.warning("room %s: a %s presented a wrong key/token (from %s)", room.room_id, role, client_of(request))
            await reject(ws, "unauthorized", "wrong key or token for this room", CLOSE_UNAUTHORIZED)
            return None, None
        if ws.closed:   # went away while the room was being loaded
            log.info("room %s: %s left during the handshake", room.room_id, role)
            return None, None
        peer = Peer(new_id(), role, ws, hello.get("name", ""), hello.get("analysis", True), abort=aborter(request))
        try:
            replaced = registry.join(room, peer)
        except RoomFull:
            log.warning("room %s is full; a %s was refused", room.room_id, role)
            await reject(ws, "room_full", "this room is full", CLOSE_LIMIT)
            return None, None
        peer.start()
        bot_id = room.bot.peer_id if room.bot else None
        if role == "student":
            peer.send(protocol.welcome(peer.peer_id, role, ice_servers=ice_servers, video=video, bot=bot_id,
                                       session_id=room.session_id, media=media))
            to_watchers(room, protocol.participant("joined", peer.peer_id, peer.name, peer.analysis))
        elif role == "teacher":
            peer.send(protocol.welcome(peer.peer_id, role, ice_servers=ice_servers, video=video, bot=bot_id,
                                       session_id=room.session_id, participants=room.participants(), media=media))
            if room.last_state is not None:
                peer.send(room.last_state)
        else:
            if replaced is not None:  # a restarted bot takes over the room and its session
                log.info("room %s: bot %s replaced by %s", room.room_id, replaced.peer_id, peer.peer_id)
                replaced.send(protocol.error("replaced", "another bot joined this room"))
                replaced.close(CLOSE_REPLACED)
            peer.send(protocol.welcome(peer.peer_id, role, ice_servers=ice_servers, video=video, bot=bot_id,
                                       session_id=room.session_id, participants=room.participants(), media=media))
            presence = protocol.bot_presence(peer.peer_id)
            for other in [*room.students.values(), *room.teachers.values()]:
                other.send(presence)
        if meeting is not None:
            meeting.joined(room, peer)
        log.info("room %s: %s %s joined (%d connected)", room.room_id, role, peer.peer_id, room.size())
        return room, peer

    def to_watchers(room: Room, message: dict[str, Any]) -> None:
        for target in room.watchers():
            target.send(message)

    def to_teachers(room: Room, message: dict[str, Any]) -> None:
        for target in list(room.teachers.values()):
            target.send(message)

    async def serve(room: Room, peer: Peer, ws: web.WebSocketResponse) -> None:
        is_bot = peer.role == "bot"
        limit = cfg.max_bot_message_bytes if is_bot else cfg.max_message_bytes
        factor = 10 if is_bot else 1
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
                peer.send(protocol.error("rate_limited", "too many messages"))
                peer.close(CLOSE_LIMIT)
                break
            try:
                data = protocol.parse(msg.data, peer.role, limit)
                if data["type"] in protocol.MEDIA_TYPES:
                    rate.refund()
                    if not media_rate.allow():
                        raise ProtocolError("rate_limited", "too many audio/video requests; slow down")
                handle(room, peer, data)
            except ProtocolError as exc:
                peer.send(protocol.error(exc.code, exc.message))
            except Exception:  # a bug must cost one message, not the connection or the room
                log.exception("room %s: handling a %s message failed", room.room_id, peer.role)
                peer.send(protocol.error("internal", "the server could not handle that message"))

    def handle(room: Room, peer: Peer, data: dict[str, Any]) -> None:
        kind = data["type"]
        if kind == "ping":
            peer.send(protocol.message("pong"))
        elif kind in protocol.MEDIA_TYPES:
            if meeting is None:
                raise ProtocolError("bad_type", "this server has no media server: video goes to the bot directly")
            meeting.handle(room, peer, data)
        elif kind == "signal" and meeting is not None:
            # In a meeting, video reaches the bot through the SFU: the bot answers the SFU's offers.
            if peer.role != "bot" or room.bot is not peer or data["data"]["type"] != "answer":
                raise ProtocolError("bad_target", "in a meeting, video goes through the media server: publish it")
            asyncio.ensure_future(meeting.bot_answer(room, data["to"], data["data"]["sdp"]))
        elif kind == "signal":
            target: Peer | None = None
            if peer.role == "student" and not peer.analysis:
                # Backs up the bot's own check: an opted-out student's camera never reaches the assistant.
                raise ProtocolError("opted_out", "analysis is off for you: turn it on before sending video")
            if peer.role == "student" and room.bot is not None and data["to"] == room.bot.peer_id:
                target = room.bot
            elif peer.role == "bot" and room.bot is peer:
                target = room.students.get(data["to"])
            if target is None:
                raise ProtocolError("bad_target", "students may signal only the bot, the bot only students of its room")
            target.send(protocol.signal_from(peer.peer_id, data["data"]))
        elif kind == "consent":
            if peer.analysis != data["analysis"]:
                peer.analysis = data["analysis"]
                log.info("room %s: student %s analysis %s", room.room_id, peer.peer_id, "on" if peer.analysis else "off")
            to_watchers(room, protocol.participant("consent", peer.peer_id, peer.name, peer.analysis))
            if meeting is not None:
                meeting.consent_changed(room, peer)
        elif kind == "control":
            if room.bot is None:
                raise ProtocolError("no_bot", "the assistant is not in the room")
            room.bot.send(protocol.control_from(peer.peer_id, data))
        elif room.bot is not peer:
            raise ProtocolError("replaced", "this bot no longer serves the room")
        elif kind == "session":
            if room.session_id != data["session_id"]:
                room.session_id = data["session_id"]
                log.info("room %s: session %s", room.room_id, room.session_id)
            to_teachers(room, protocol.message("session", session_id=room.session_id))
        elif kind == "state":
            room.last_state = protocol.message("state", state=data["state"])
            to_teachers(room, room.last_state)
        elif kind == "alert":
            to_teachers(room, protocol.message("alert", alert=data["alert"]))

    def leave(room: Room, peer: Peer) -> None:
        if not registry.leave(room, peer):
            log.info("room %s: %s %s disconnected (no longer seated)", room.room_id, peer.role, peer.peer_id)
            return
        if meeting is not None:
            meeting.left(room, peer)
        if peer.role == "student":
            to_watchers(room, protocol.participant("left", peer.peer_id, peer.name, peer.analysis))
        elif peer.role == "bot":
            presence = protocol.bot_presence(None)
            for other in [*room.students.values(), *room.teachers.values()]:
                other.send(presence)
        log.info("room %s: %s %s left (%d connected)", room.room_id, peer.role, peer.peer_id, room.size())

    async def on_shutdown(_app: web.Application) -> None:
        open_sockets = [ws for ws in list(sockets) if not ws.closed]
        if open_sockets:
            log.info("closing %d socket(s) for shutdown", len(open_sockets))
        await asyncio.gather(*(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
                               for ws in open_sockets), return_exceptions=True)

    async def erase_expired_sessions(_app: web.Application):
        """storage.retention_days: erase expired sessions at start and then hourly."""
        days = settings.storage.retention_days

        async def loop() -> None:
            while True:
                try:
                    erased = await asyncio.to_thread(store.delete_sessions_before, time.time() - days * 86400)
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

    async def dismiss_lonely_bots(_app: web.Application):
        """A bot left alone (no student, no teacher) for server.room_idle_seconds is dismissed: its session
        ends (reviewable and erasable) and the room, its bot and their resources are freed."""
        idle = cfg.room_idle_seconds

        async def loop() -> None:
            while True:
                await asyncio.sleep(min(60.0, max(0.2, idle / 4)))
                for room in registry.lonely_bots(idle):
                    log.info("room %s: nobody with the bot for %.0f s; dismissing it", room.room_id, idle)
                    room.bot.send(protocol.error("idle", f"nobody has been in the room for {idle:.0f} s"))
                    room.bot.close(CLOSE_IDLE)
                    room.alone_since = None
        task = asyncio.ensure_future(loop())
        yield
        task.cancel()

    app.on_shutdown.append(on_shutdown)
    if meeting is not None:
        app.on_cleanup.append(lambda _app: meeting.stop_tasks())
    app.cleanup_ctx.append(erase_expired_sessions)
    app.cleanup_ctx.append(dismiss_lonely_bots)
    app.router.add_get("/", page("index.html"))
    app.router.add_get("/join/{room}", page("join.html"))
    app.router.add_get("/teach/{room}", page("teach.html"))
    app.router.add_get("/review/{room}", page("review.html"))
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/api/policy", policy)
    app.router.add_post("/api/rooms", create_room)
    app.router.add_get("/api/rooms/{room}", room_info)
    app.router.add_post("/api/rooms/{room}/invite", invite)
    app.router.add_get("/api/rooms/{room}/sessions", sessions)
    app.router.add_get("/api/sessions/{sid}/review", review)
    app.router.add_delete("/api/sessions/{sid}", delete_session)
    app.router.add_get("/api/sessions/{sid}/samples.csv", csv_handler("samples"))
    app.router.add_get("/api/sessions/{sid}/alerts.csv", csv_handler("alerts"))
    app.router.add_get("/ws", ws_room)
    app.router.add_get("/ws/worker", ws_worker)
    return app


def _take(iterator: Iterator[str], n: int) -> list[str]:
    out = []
    for line in iterator:
        out.append(line)
        if len(out) >= n:
            break
    return out
