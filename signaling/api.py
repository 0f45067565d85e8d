"""The HTTP API: rooms (create, info, invite a bot), the review API (sessions, review, CSV, delete),
the public policy and the health check. Every handler reads its state from the app (ServerState)."""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import Any, Iterator

from aiohttp import web
from aiohttp.typedefs import Handler

from signaling import protocol
from signaling.auth import bearer, same, token_hash
from signaling.forwarded import address_block
from signaling.middleware import client_of, with_headers
from signaling.protocol import ProtocolError
from signaling.rooms import INVITE_PENDING_S, RateLimit, TooManyRooms, new_id
from signaling.state import ServerState, state_of

log = logging.getLogger("classmood.signaling")
MAX_BODY = 4096
CSV_CHUNK_LINES = 2000
TOKEN_REQUIRED = "teacher token required (Authorization: Bearer TOKEN)"
SERVER_FULL = "too many live rooms on this server; try again later"


def json_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def authorise(request: web.Request, room_id: str) -> web.Response | dict[str, Any]:
    """The room record if the request carries its teacher token; 401 / 404 otherwise."""
    token = bearer(request)
    if token is None:
        return json_error(401, TOKEN_REQUIRED)
    record = await state_of(request).room_record(room_id)
    if record is None:
        return json_error(404, "unknown room")
    if not same(token_hash(token), record["teacher_token_hash"]):
        return json_error(401, "wrong teacher token for this room")
    return record


async def review_access(request: web.Request, sid: str) -> web.Response | str:
    """The session's room id when the bearer token owns that room; else a 401 / 404 response (the same 404
    for a session that does not exist and one of another room)."""
    state = state_of(request)
    token = bearer(request)
    if token is None:
        return json_error(401, TOKEN_REQUIRED)
    room_id = await asyncio.to_thread(state.store.session_room, sid) if protocol.is_id(sid) else None
    if room_id is None:
        return json_error(404, "unknown session")
    record = await state.room_record(room_id)
    if record is None or not same(token_hash(token), record["teacher_token_hash"]):
        # 404, not 403: a teacher of another room must not learn that a session id exists
        return json_error(404, "unknown session")
    return room_id


def links(request: web.Request, room_id: str, join_key: str, token: str | None = None) -> dict[str, str]:
    # server.public_url when set; else the address the caller reached us on (not 0.0.0.0 or port 0)
    base = state_of(request).cfg.public_url.rstrip("/") or f"{request.scheme}://{request.host}"
    out = {"student_url": f"{base}/join/{room_id}?k={join_key}"}
    if token:
        out.update(teacher_url=f"{base}/teach/{room_id}#t={token}", review_url=f"{base}/review/{room_id}#t={token}")
    return out


def room_creation_allowed(state: ServerState, address: str) -> bool:
    per_minute = state.cfg.rooms_per_minute_per_address
    if per_minute <= 0:
        return True                       # 0 = no limit (a trusted deployment behind its own gate)
    buckets = state.room_buckets
    if len(buckets) > 10_000:             # bounded memory: forget addresses whose bucket has refilled
        for key in [k for k, b in buckets.items() if b.full()]:
            del buckets[key]
    bucket = buckets.setdefault(address_block(address), RateLimit(per_minute / 60.0, per_minute))
    return bucket.allow()


# ---- public ----------------------------------------------------------------------------------
async def policy(request: web.Request) -> web.Response:
    """What the join page tells students before they join (nothing secret)."""
    state = state_of(request)
    # media_mode: whether the class is a meeting (the notice says what opting out does there).
    return web.json_response({"retention_days": state.settings.storage.retention_days,
                              "media_mode": "sfu" if state.meeting is not None else "direct"})


async def healthz(request: web.Request) -> web.Response:
    state = state_of(request)
    registry = state.registry
    # media: the meeting's media server as this server sees it (sfu_connected false while Janus is away).
    media = {"mode": "sfu", "sfu_connected": state.meeting.sfu.ready} if state.meeting else {"mode": "direct"}
    return web.json_response({"ok": True, "rooms": len(registry.rooms), "workers": len(registry.workers),
                              "media": media})


async def read_json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The small JSON object body of an API call ({} when empty), or the error to answer: 413 beyond
    MAX_BODY, 408 when it trickles in past server.body_timeout_seconds, 400 when it is not a JSON object."""
    state = state_of(request)
    if (request.content_length or 0) > MAX_BODY:
        return json_error(413, f"request body larger than {MAX_BODY} bytes")
    try:
        # capped by client_max_size (413); a body trickled in byte by byte must not hold the connection
        raw = await asyncio.wait_for(request.read(), state.cfg.body_timeout_seconds) if request.can_read_body else b""
    except asyncio.TimeoutError:
        late = json_error(408, f"request body not received within {state.cfg.body_timeout_seconds:g} s")
        late.force_close()        # rather than wait for the rest of the body (aiohttp's lingering close)
        return late
    if len(raw) > MAX_BODY:
        return json_error(413, f"request body larger than {MAX_BODY} bytes")
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):   # UnicodeDecodeError is a ValueError
        return json_error(400, "body must be JSON")
    if not isinstance(body, dict):
        return json_error(400, "body must be a JSON object")
    return body


# ---- rooms -----------------------------------------------------------------------------------
async def create_room(request: web.Request) -> web.Response:
    state = state_of(request)
    body = await read_json_object(request)
    if isinstance(body, web.Response):
        return body
    try:
        title = protocol.clean_title(body.get("title"))
    except ProtocolError:
        return json_error(400, f"title must be text of at most {protocol.MAX_TITLE} characters")
    if not room_creation_allowed(state, client_of(request)):
        log.warning("room creation rate limit hit by %s", client_of(request))
        return json_error(429, "too many rooms created from your address; wait a minute",
                          headers={"Retry-After": "60"})
    if not state.registry.has_capacity():
        return json_error(503, SERVER_FULL)
    room_id, join_key, token = new_id(), secrets.token_urlsafe(12), secrets.token_urlsafe(24)
    room = state.new_room(room_id, title, join_key, token_hash(token))
    try:
        await asyncio.to_thread(state.store.create_room, room_id, title, join_key, room.teacher_token_hash)
        state.registry.add(room)
    except TooManyRooms:
        return json_error(503, SERVER_FULL)
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
    registry = state_of(request).registry
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
    state = state_of(request)
    record = await authorise(request, request.match_info["room"])
    if isinstance(record, web.Response):
        return record
    try:
        room = await state.live_room(record["room_id"])
    except TooManyRooms:
        return json_error(503, SERVER_FULL)
    if room is None:
        return json_error(404, "unknown room")
    if room.bot is not None:
        return web.json_response({"ok": True, "already_present": True, "bot": room.bot.peer_id})
    if room.invite_pending():
        return web.json_response({"ok": True, "already_invited": True})
    for worker in state.registry.pick_workers():
        # The lease first: once the worker has the invite it may renew it at any moment. Until it joins,
        # the lease lasts as long as an invite is pending; then the worker renews it (housekeeping.py).
        await asyncio.to_thread(state.store.assign_room, room.room_id, worker.peer_id,
                                time.time() + INVITE_PENDING_S, room.session_id)
        if worker.send(protocol.invite(room.room_id, room.bot_token)):
            room.worker_id, room.invited_at = worker.peer_id, time.monotonic()
            log.info("room %s: invite sent to worker %s", room.room_id, worker.peer_id)
            return web.json_response({"ok": True, "worker": worker.peer_id})
    return json_error(503, "no bot worker is available: start one with `python -m bot worker`")


# ---- review ----------------------------------------------------------------------------------
async def sessions(request: web.Request) -> web.Response:
    state = state_of(request)
    record = await authorise(request, request.match_info["room"])
    if isinstance(record, web.Response):
        return record
    return web.json_response({"room": record["room_id"], "retention_days": state.settings.storage.retention_days,
                              "sessions": await asyncio.to_thread(state.store.list_sessions, record["room_id"])})


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
    data = await asyncio.to_thread(state_of(request).store.session_review, sid, bucket)
    if data is None:
        return json_error(404, "unknown session")
    # The start-up thresholds, for the marks on the review's charts (a teacher may have moved them in class;
    # each alert's own threshold is in its row).
    sig = state_of(request).settings.signals
    data = {"thresholds": {"confusion": sig.confusion_threshold, "boredom": sig.boredom_threshold,
                           "class_share": sig.class_share_threshold}, **data}
    return web.json_response(data)


async def delete_session(request: web.Request) -> web.Response:
    state = state_of(request)
    sid = request.match_info["sid"]
    room_id = await review_access(request, sid)
    if isinstance(room_id, web.Response):
        return room_id
    room = state.registry.get(room_id)
    if room is not None and room.bot is not None and room.session_id == sid:
        return json_error(409, "the assistant is still in the room recording this session; "
                               "end the class (or let the assistant leave) first")
    if not await asyncio.to_thread(state.store.delete_session, sid):
        return json_error(404, "unknown session")
    log.info("room %s: session %s deleted by its teacher", room_id, sid)
    return web.json_response({"deleted": sid})


def csv_download(kind: str) -> Handler:
    """GET /api/sessions/{sid}/<kind>.csv, streamed from the store in chunks (kind: samples | alerts)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        sid = request.match_info["sid"]
        access = await review_access(request, sid)
        if isinstance(access, web.Response):
            return access
        lines: Iterator[str] = getattr(state_of(request).store, f"iter_{kind}_csv")(sid)
        response = with_headers(web.StreamResponse(headers={
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


samples_csv = csv_download("samples")
alerts_csv = csv_download("alerts")


def _take(iterator: Iterator[str], n: int) -> list[str]:
    out = []
    for line in iterator:
        out.append(line)
        if len(out) >= n:
            break
    return out
