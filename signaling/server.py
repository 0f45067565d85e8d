"""The aiohttp signaling server: rooms and secret tokens, the WebSocket relay, pages and the review API.

Who may talk to whom is decided here and only here: students signal only the bot, the bot signals
only students, live state/alerts from the bot go only to sockets that presented the teacher token.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from core.settings import Settings
from signaling import protocol
from signaling.protocol import ProtocolError
from signaling.store import Store

log = logging.getLogger("classmood.signaling")
STATIC_DIR = Path(__file__).resolve().parent / "static"
HELLO_TIMEOUT_S = 10.0
CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
       "connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SETTINGS_KEY = web.AppKey("settings", Settings)
HUB_KEY = web.AppKey("hub", object)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Peer:
    peer_id: str
    role: str
    ws: web.WebSocketResponse
    name: str = ""
    analysis: bool = True
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, message: dict[str, Any]) -> bool:
        if self.ws.closed:
            return False
        try:
            await self.ws.send_str(json.dumps(message))
            return True
        except (ConnectionError, RuntimeError) as exc:
            log.debug("send to %s failed: %s", self.peer_id, exc)
            return False


@dataclass
class Room:
    room_id: str
    title: str
    join_key: str
    teacher_token_hash: str
    bot_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    session_id: str | None = None
    bot: Peer | None = None
    teachers: dict[str, Peer] = field(default_factory=dict)
    students: dict[str, Peer] = field(default_factory=dict)
    last_state: dict[str, Any] | None = None

    def participants(self) -> list[dict[str, Any]]:
        return [{"peer_id": p.peer_id, "name": p.name, "analysis": p.analysis} for p in self.students.values()]

    def size(self) -> int:
        return len(self.students) + len(self.teachers) + (1 if self.bot else 0)


class RateLimit:
    """Token bucket: `burst` messages at once, `per_second` sustained."""

    def __init__(self, per_second: float, burst: float) -> None:
        self.per_second, self.burst = per_second, burst
        self.tokens, self.t = burst, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.per_second)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class Hub:
    """Live rooms (in memory, loaded from the store on first use) and connected bot workers."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.rooms: dict[str, Room] = {}
        self.workers: dict[str, Peer] = {}
        self.worker_load: dict[str, int] = {}

    async def room(self, room_id: str) -> Room | None:
        room = self.rooms.get(room_id)
        if room is None:
            record = await asyncio.to_thread(self.store.get_room, room_id)
            if record is None:
                return None
            room = self.rooms.setdefault(room_id, Room(room_id, record.get("title") or "", record["join_key"],
                                                       record["teacher_token_hash"]))
        return room

    async def teacher_room(self, room_id: str, token: str | None) -> Room | None:
        room = await self.room(room_id) if protocol.ID_RE.match(room_id or "") else None
        if room is None or not token or not hmac.compare_digest(token_hash(token), room.teacher_token_hash):
            return None
        return room


def new_id() -> str:
    return secrets.token_urlsafe(9)


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else None


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def security_headers(request: web.Request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Permissions-Policy", "camera=(self), microphone=()")
    if isinstance(response, web.HTTPException):
        raise response
    return response


def create_app(settings: Settings, store: Store | None = None, static_dir: Path | None = None) -> web.Application:
    if store is None:
        from signaling.memory_store import MemoryStore
        store = MemoryStore()
    app = web.Application(middlewares=[security_headers], client_max_size=64 * 1024)
    hub = Hub(settings, store)
    app[SETTINGS_KEY] = settings
    app[HUB_KEY] = hub
    static = (static_dir or STATIC_DIR).resolve()

    def page(name: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            path = static / name
            if not path.is_file():
                raise web.HTTPNotFound(text="page not installed")
            return web.FileResponse(path, headers={"Cache-Control": "no-store"})
        return handler

    async def static_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if "/" in name or "\\" in name or name.startswith(".") or ".." in name:
            raise web.HTTPNotFound()
        path = (static / name).resolve()
        if path.parent != static or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "rooms": len(hub.rooms), "workers": len(hub.workers)})

    def links(room: Room, token: str | None = None) -> dict[str, str]:
        base = settings.base_url()
        out = {"student_url": f"{base}/join/{room.room_id}?k={room.join_key}"}
        if token:
            out.update(teacher_url=f"{base}/teach/{room.room_id}#t={token}",
                       review_url=f"{base}/review/{room.room_id}#t={token}")
        return out

    async def create_room(request: web.Request) -> web.Response:
        if request.content_length and request.content_length > 4096:
            return json_error(413, "request too large")
        title = ""
        if request.can_read_body:
            try:
                body = json.loads((await request.content.read(4097)).decode("utf-8") or "{}")
            except (ValueError, UnicodeDecodeError):
                return json_error(400, "body must be JSON")
            if not isinstance(body, dict):
                return json_error(400, "body must be a JSON object")
            title = body.get("title") or ""
            if not isinstance(title, str) or len(title) > 120:
                return json_error(400, "title must be text of at most 120 characters")
            title = "".join(ch for ch in title if ch.isprintable()).strip()
        if len(hub.rooms) >= settings.server.max_rooms:
            return json_error(503, "too many active rooms on this server")
        room = Room(new_id(), title, secrets.token_urlsafe(12), "")
        token = secrets.token_urlsafe(24)
        room.teacher_token_hash = token_hash(token)
        await asyncio.to_thread(store.create_room, room.room_id, title, room.join_key, room.teacher_token_hash)
        hub.rooms[room.room_id] = room
        log.info("room %s created", room.room_id)
        return web.json_response({"room": room.room_id, "title": title, "teacher_token": token, **links(room, token)})

    async def room_info(request: web.Request) -> web.Response:
        room = await hub.teacher_room(request.match_info["room"], bearer(request))
        if room is None:
            return json_error(401, "unknown room or wrong teacher token")
        return web.json_response({"room": room.room_id, "title": room.title, **links(room),
                                  "bot": room.bot.peer_id if room.bot else None, "session_id": room.session_id,
                                  "participants": room.participants(), "workers": len(hub.workers)})

    async def invite(request: web.Request) -> web.Response:
        room = await hub.teacher_room(request.match_info["room"], bearer(request))
        if room is None:
            return json_error(401, "unknown room or wrong teacher token")
        if room.bot is not None:
            return web.json_response({"ok": True, "already_present": True, "bot": room.bot.peer_id})
        for worker_id in sorted(hub.workers, key=lambda w: hub.worker_load.get(w, 0)):
            if await hub.workers[worker_id].send(protocol.message("invite", room=room.room_id, token=room.bot_token)):
                hub.worker_load[worker_id] = hub.worker_load.get(worker_id, 0) + 1
                log.info("room %s: invite sent to worker %s", room.room_id, worker_id)
                return web.json_response({"ok": True})
        return json_error(503, "no bot worker is available: start one with `python -m bot worker`")

    async def review_room(request: web.Request, sid: str) -> web.Response | None:
        room_id = await asyncio.to_thread(store.session_room, sid) if protocol.ID_RE.match(sid) else None
        if room_id is None:
            return json_error(404, "unknown session")
        token = bearer(request)
        if not token:
            return json_error(401, "teacher token required")
        if await hub.teacher_room(room_id, token) is None:
            return json_error(403, "this token does not own that session")
        return None

    async def sessions(request: web.Request) -> web.Response:
        room = await hub.teacher_room(request.match_info["room"], bearer(request))
        if room is None:
            return json_error(401, "unknown room or wrong teacher token")
        return web.json_response({"sessions": await asyncio.to_thread(store.list_sessions, room.room_id)})

    async def review(request: web.Request) -> web.Response:
        sid = request.match_info["sid"]
        denied = await review_room(request, sid)
        if denied is not None:
            return denied
        try:
            bucket = float(request.query.get("bucket", "10"))
        except ValueError:
            return json_error(400, "bucket must be a number of seconds")
        data = await asyncio.to_thread(store.session_review, sid, min(max(bucket, 1.0), 3600.0))
        return web.json_response(data) if data is not None else json_error(404, "unknown session")

    def csv_handler(kind: str):
        async def handler(request: web.Request) -> web.StreamResponse:
            sid = request.match_info["sid"]
            denied = await review_room(request, sid)
            if denied is not None:
                return denied
            response = web.StreamResponse(headers={
                "Content-Type": "text/csv; charset=utf-8",
                "Content-Disposition": f'attachment; filename="classmood-{sid}-{kind}.csv"'})
            await response.prepare(request)
            lines = getattr(store, f"iter_{kind}_csv")(sid)
            while True:
                chunk = await asyncio.to_thread(_take, lines, 2000)
                if not chunk:
                    break
                await response.write("".join(chunk).encode("utf-8"))
            await response.write_eof()
            return response
        return handler

    async def ws_worker(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=settings.server.max_message_bytes)
        await ws.prepare(request)
        worker: Peer | None = None
        try:
            msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
            if msg.type != WSMsgType.TEXT:
                return ws
            hello = protocol.parse_hello(protocol.decode(msg.data, settings.server.max_message_bytes))
            if hello["role"] != "worker" or not hmac.compare_digest(hello["key"].encode(), settings.server.worker_key.encode()):
                await ws.send_json(protocol.error("unauthorized", "wrong worker key"))
                await ws.close(code=4401)
                return ws
            worker = Peer(new_id(), "worker", ws)
            hub.workers[worker.peer_id] = worker
            await worker.send(protocol.message("welcome", peer_id=worker.peer_id, role="worker"))
            log.info("bot worker %s connected", worker.peer_id)
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    break
        except (asyncio.TimeoutError, ProtocolError) as exc:
            if not ws.closed:
                await ws.send_json(protocol.error(getattr(exc, "code", "timeout"), str(exc) or "hello expected"))
                await ws.close(code=4400)
        finally:
            if worker is not None:
                hub.workers.pop(worker.peer_id, None)
                hub.worker_load.pop(worker.peer_id, None)
                log.info("bot worker %s disconnected", worker.peer_id)
        return ws

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=settings.server.max_bot_message_bytes)
        await ws.prepare(request)
        peer: Peer | None = None
        room: Room | None = None
        try:
            try:
                msg = await ws.receive(timeout=HELLO_TIMEOUT_S)
            except asyncio.TimeoutError:
                await ws.send_json(protocol.error("timeout", "no hello within 10 s"))
                await ws.close(code=4408)
                return ws
            if msg.type != WSMsgType.TEXT:
                return ws
            try:
                hello = protocol.parse_hello(protocol.decode(msg.data, settings.server.max_message_bytes))
                if hello["role"] == "worker":
                    raise ProtocolError("bad_field", "workers connect to /ws/worker")
            except ProtocolError as exc:
                await ws.send_json(protocol.error(exc.code, exc.message))
                await ws.close(code=4400)
                return ws
            room, peer = await admit(hello, ws)
            if peer is None or room is None:
                return ws
            await serve(room, peer, ws)
        except (ConnectionError, RuntimeError) as exc:
            log.info("socket ended: %s", exc)
        finally:
            if peer is not None and room is not None:
                await leave(room, peer)
        return ws

    async def admit(hello: dict[str, Any], ws: web.WebSocketResponse) -> tuple[Room | None, Peer | None]:
        room = await hub.room(hello["room"])
        if room is None:
            await ws.send_json(protocol.error("unknown_room", "no such room"))
            await ws.close(code=4404)
            return None, None
        role = hello["role"]
        if role == "student":
            ok = hmac.compare_digest(hello["key"].encode(), room.join_key.encode())
        elif role == "teacher":
            ok = hmac.compare_digest(token_hash(hello["token"]), room.teacher_token_hash)
        else:
            ok = hmac.compare_digest(hello["token"].encode(), room.bot_token.encode()) or \
                hmac.compare_digest(token_hash(hello["token"]), room.teacher_token_hash)
        if not ok:
            log.warning("room %s: %s presented a wrong key/token", room.room_id, role)
            await ws.send_json(protocol.error("unauthorized", "wrong key or token for this room"))
            await ws.close(code=4401)
            return None, None
        if role != "bot" and room.size() >= settings.server.max_participants_per_room:
            await ws.send_json(protocol.error("room_full", "this room is full"))
            await ws.close(code=4429)
            return None, None
        peer = Peer(new_id(), role, ws, hello.get("name", ""), hello.get("analysis", True))
        welcome = protocol.message("welcome", peer_id=peer.peer_id, role=role, ice_servers=settings.ice_servers(),
                                   video={"width": settings.server.video_width, "height": settings.server.video_height,
                                          "fps": settings.server.video_fps},
                                   bot=room.bot.peer_id if room.bot else None, session_id=room.session_id)
        if role == "student":
            room.students[peer.peer_id] = peer
            await peer.send(welcome)
            await to_watchers(room, protocol.message("participant", event="joined", peer_id=peer.peer_id,
                                                     name=peer.name, analysis=peer.analysis))
        elif role == "teacher":
            room.teachers[peer.peer_id] = peer
            await peer.send({**welcome, "participants": room.participants()})
            if room.last_state is not None:
                await peer.send(room.last_state)
        else:
            old = room.bot
            room.bot = peer
            if old is not None:  # a restarted bot takes over the room and its session
                await old.send(protocol.error("replaced", "another bot joined this room"))
                await old.ws.close(code=4000)
            await peer.send({**welcome, "participants": room.participants()})
            for student in list(room.students.values()):
                await student.send(protocol.message("bot", peer_id=peer.peer_id))
        log.info("room %s: %s %s joined", room.room_id, role, peer.peer_id)
        return room, peer

    async def to_watchers(room: Room, message: dict[str, Any]) -> None:
        """Bot and teachers: the only ones who learn about other participants."""
        targets = list(room.teachers.values()) + ([room.bot] if room.bot else [])
        await asyncio.gather(*(t.send(message) for t in targets))

    async def serve(room: Room, peer: Peer, ws: web.WebSocketResponse) -> None:
        limit = settings.server.max_bot_message_bytes if peer.role == "bot" else settings.server.max_message_bytes
        rate = RateLimit(200.0, 400.0) if peer.role == "bot" else RateLimit(20.0, 50.0)
        async for msg in ws:
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                break
            if not rate.allow():
                await peer.send(protocol.error("rate_limited", "too many messages"))
                await ws.close(code=4429)
                break
            try:
                data = protocol.parse(msg.data, peer.role, limit)
                await handle(room, peer, data)
            except ProtocolError as exc:
                await peer.send(protocol.error(exc.code, exc.message))
            except Exception:  # a bug must cost one message, not the connection or the room
                log.exception("room %s: handling a %s message failed", room.room_id, peer.role)
                await peer.send(protocol.error("internal", "the server could not handle that message"))

    async def handle(room: Room, peer: Peer, data: dict[str, Any]) -> None:
        kind = data["type"]
        if kind == "ping":
            await peer.send(protocol.message("pong"))
        elif kind == "signal":
            target: Peer | None = None
            if peer.role == "student" and room.bot is not None and data["to"] == room.bot.peer_id:
                target = room.bot
            elif peer.role == "bot" and room.bot is peer:
                target = room.students.get(data["to"])
            if target is None:
                raise ProtocolError("bad_target", "you can signal only the bot (students) or students (bot)")
            await target.send(protocol.message("signal", **{"from": peer.peer_id}, data=data["data"]))
        elif kind == "consent":
            peer.analysis = data["analysis"]
            await to_watchers(room, protocol.message("participant", event="consent", peer_id=peer.peer_id,
                                                     name=peer.name, analysis=peer.analysis))
        elif kind == "control":
            if room.bot is None:
                raise ProtocolError("no_bot", "the assistant is not in the room")
            await room.bot.send(protocol.message("control", **{"from": peer.peer_id},
                                                 **{k: v for k, v in data.items() if k != "type"}))
        elif room.bot is peer:
            if kind == "session":
                room.session_id = data["session_id"]
            elif kind == "state":
                room.last_state = protocol.message("state", state=data["state"])
                await asyncio.gather(*(t.send(room.last_state) for t in list(room.teachers.values())))
            elif kind == "alert":
                alert = protocol.message("alert", alert=data["alert"])
                await asyncio.gather(*(t.send(alert) for t in list(room.teachers.values())))

    async def leave(room: Room, peer: Peer) -> None:
        if peer.role == "student" and room.students.pop(peer.peer_id, None) is not None:
            await to_watchers(room, protocol.message("participant", event="left", peer_id=peer.peer_id,
                                                     name=peer.name, analysis=peer.analysis))
        elif peer.role == "teacher":
            room.teachers.pop(peer.peer_id, None)
        elif peer.role == "bot" and room.bot is peer:
            room.bot = None
            room.last_state = None
            for student in list(room.students.values()):
                await student.send(protocol.message("bot", peer_id=None))
        log.info("room %s: %s %s left", room.room_id, peer.role, peer.peer_id)

    app.router.add_get("/", page("index.html"))
    app.router.add_get("/join/{room}", page("join.html"))
    app.router.add_get("/teach/{room}", page("teach.html"))
    app.router.add_get("/review/{room}", page("review.html"))
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/api/rooms", create_room)
    app.router.add_get("/api/rooms/{room}", room_info)
    app.router.add_post("/api/rooms/{room}/invite", invite)
    app.router.add_get("/api/rooms/{room}/sessions", sessions)
    app.router.add_get("/api/sessions/{sid}/review", review)
    app.router.add_get("/api/sessions/{sid}/samples.csv", csv_handler("samples"))
    app.router.add_get("/api/sessions/{sid}/alerts.csv", csv_handler("alerts"))
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/ws/worker", ws_worker)
    return app


def _take(iterator, n: int) -> list[str]:
    out = []
    for line in iterator:
        out.append(line)
        if len(out) >= n:
            break
    return out
