"""The signaling server as clients meet it: a real server on a loopback port, real aiohttp WebSockets.

Auth, relay rules, privacy of teacher data, bad input, limits, cleanup, bot workers, review API, pages.
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from core.settings import Settings
from signaling.memory_store import MemoryStore
from signaling.rooms import Peer, RateLimit, Registry, Room, RoomFull, TooManyRooms
from signaling.server import REGISTRY_KEY, create_app

PRIVATE = {"state", "alert", "participant", "control", "session"}   # never for a student's eyes


class Server:
    def __init__(self, url: str, store: MemoryStore, http: aiohttp.ClientSession, app: web.Application) -> None:
        self.url, self.store, self.http, self.app = url, store, http, app

    @property
    def registry(self) -> Registry:
        return self.app[REGISTRY_KEY]

    async def room(self, title: str = "Maths") -> dict:
        async with self.http.post(self.url + "/api/rooms", json={"title": title}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def connect(self, hello: dict | str | None = None, path: str = "/ws") -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(self.url.replace("http", "ws", 1) + path)
        if hello is not None:
            await (ws.send_str(hello) if isinstance(hello, str) else ws.send_json({"v": 1, "type": "hello", **hello}))
        return ws

    async def student(self, room: dict, name: str = "Asha", analysis: bool = True):
        ws = await self.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": name,
                                 "analysis": analysis})
        welcome = await recv(ws)
        assert welcome["type"] == "welcome", welcome
        return ws, welcome

    async def teacher(self, room: dict):
        ws = await self.connect({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})
        welcome = await recv(ws)
        assert welcome["type"] == "welcome", welcome
        return ws, welcome

    async def bot(self, room: dict, token: str | None = None):
        hello = {"role": "bot", "room": room["room"], "token": token or room["teacher_token"]}
        if token is None:   # the teacher token seats a bot only with the operator's worker key
            hello["key"] = Settings().server.worker_key
        ws = await self.connect(hello)
        welcome = await recv(ws)
        assert welcome["type"] == "welcome", welcome
        return ws, welcome

    async def worker(self, key: str | None = None):
        ws = await self.connect({"role": "worker", "key": key or Settings().server.worker_key}, path="/ws/worker")
        return ws, await recv(ws)

    def auth(self, room: dict) -> dict[str, str]:
        return {"Authorization": f"Bearer {room['teacher_token']}"}


async def start_server(tmp_path, **server: Any):
    static = tmp_path / "static"
    static.mkdir(parents=True)
    for page in ("index.html", "join.html", "teach.html", "review.html"):
        (static / page).write_text(f"<!doctype html><title>{page}</title>")
    (static / "app.css").write_text("body{}")
    (tmp_path / "secret.txt").write_text("outside the static folder")
    store = MemoryStore()
    settings = Settings().replace(server={"port": 0, **server})
    app = create_app(settings, store=store, static_dir=static)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    http = aiohttp.ClientSession()
    return runner, Server(f"http://127.0.0.1:{port}", store, http, app)


@pytest.fixture
async def make_server(tmp_path):
    started = []

    async def make(**server: Any) -> Server:
        runner, srv = await start_server(tmp_path / f"server{len(started)}", **server)
        started.append((runner, srv))
        return srv

    yield make
    for runner, srv in started:
        await srv.http.close()
        await runner.cleanup()


@pytest.fixture
async def server(make_server):
    return await make_server()


async def recv(ws, timeout: float = 2.0) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def recv_type(ws, kind: str, timeout: float = 2.0) -> dict:
    while True:
        data = await recv(ws, timeout)
        if data["type"] == kind:
            return data


async def nothing_more(ws, wait: float = 0.3) -> list[dict]:
    """Everything that arrives within `wait` seconds (stops at a close)."""
    got = []
    try:
        while True:
            msg = await ws.receive(timeout=wait)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            got.append(json.loads(msg.data))
    except asyncio.TimeoutError:
        pass
    return got


async def closed_with(ws, timeout: float = 2.0) -> int | None:
    """Read until the server closes the socket; its close code."""
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return msg.data                       # the code in the server's close frame
        if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
            return ws.close_code
        if msg.type == aiohttp.WSMsgType.ERROR:
            return None


def key_of(room: dict) -> str:
    return room["student_url"].split("k=", 1)[1]


def offer(to: str, sdp: str = "v=0 offer") -> dict:
    return {"v": 1, "type": "signal", "to": to, "data": {"type": "offer", "sdp": sdp}}


# ---- rooms and auth --------------------------------------------------------------------------
async def test_room_links_and_only_a_hash_of_the_teacher_token_is_stored(server):
    room = await server.room()
    assert room["teacher_token"] not in room["student_url"]
    assert room["student_url"] == f"{server.url}/join/{room['room']}?k={key_of(room)}"
    assert room["teacher_url"] == f"{server.url}/teach/{room['room']}#t={room['teacher_token']}"
    assert room["review_url"] == f"{server.url}/review/{room['room']}#t={room['teacher_token']}"
    stored = server.store.get_room(room["room"])
    assert room["teacher_token"] not in json.dumps(stored) and len(stored["teacher_token_hash"]) == 64
    assert stored["title"] == "Maths"


@pytest.mark.parametrize("body, status", [
    ("", 200), ("{}", 200), ('{"title": "Physics\\u0000 \\u202e"}', 200), ('{"title": null}', 200),
    ('{"title": 7}', 400), ('{"title": "' + "x" * 121 + '"}', 400), ("[1]", 400), ("not json", 400),
    ("\xff", 400), ('{"title": "' + "x" * 5000 + '"}', 413),
])
async def test_create_room_validates_its_body(server, body, status):
    async with server.http.post(server.url + "/api/rooms", data=body.encode("utf-8", "surrogateescape")
                                if body != "\xff" else b"\xff", headers={"Content-Type": "application/json"}) as r:
        assert r.status == status, await r.text()
        if status == 200:
            assert (await r.json())["title"] in ("", "Physics")


@pytest.mark.parametrize("who", ["student-wrong-key", "teacher-wrong-token", "bot-wrong-token", "unknown-room",
                                 "teacher-with-join-key", "bad-room-id", "bot-with-teacher-token-only",
                                 "bot-with-teacher-token-wrong-key"])
async def test_wrong_credentials_are_refused_and_closed(server, who):
    room = await server.room()
    hello = {"student-wrong-key": {"role": "student", "room": room["room"], "key": "x" * 16, "name": "Eve"},
             "teacher-wrong-token": {"role": "teacher", "room": room["room"], "token": "y" * 32},
             "bot-wrong-token": {"role": "bot", "room": room["room"], "token": key_of(room)},
             "bot-with-teacher-token-only": {"role": "bot", "room": room["room"], "token": room["teacher_token"]},
             "bot-with-teacher-token-wrong-key": {"role": "bot", "room": room["room"],
                                                  "token": room["teacher_token"], "key": "not-the-worker-key"},
             "unknown-room": {"role": "student", "room": "nosuchroom", "key": key_of(room), "name": "Eve"},
             "teacher-with-join-key": {"role": "teacher", "room": room["room"], "token": key_of(room)},
             "bad-room-id": {"role": "student", "room": "../etc", "key": key_of(room), "name": "Eve"}}[who]
    ws = await server.connect(hello)
    error = await recv(ws)
    assert error["type"] == "error"
    assert error["code"] == {"unknown-room": "unknown_room", "bad-room-id": "bad_field"}.get(who, "unauthorized")
    assert await closed_with(ws) in (4401, 4404, 4400)
    assert not server.registry.get(room["room"]).size()


async def test_room_info_needs_the_teacher_token(server):
    room, other = await server.room(), await server.room()
    url = f"{server.url}/api/rooms/{room['room']}"
    async with server.http.get(url) as r:
        assert r.status == 401
    async with server.http.get(url, headers=server.auth(other)) as r:
        assert r.status == 401
    async with server.http.get(f"{server.url}/api/rooms/nosuchroom", headers=server.auth(room)) as r:
        assert r.status == 404
    async with server.http.get(url, headers=server.auth(room)) as r:
        info = await r.json()
        assert r.status == 200 and info["participants"] == [] and info["bot"] is None
        assert "teacher_token" not in info and room["teacher_token"] not in json.dumps(info)


# ---- relay and privacy -----------------------------------------------------------------------
async def test_offers_flow_student_to_bot_only_and_teacher_data_stays_with_teachers(server):
    room = await server.room()
    teacher, t_welcome = await server.teacher(room)
    assert t_welcome["participants"] == [] and t_welcome["bot"] is None
    assert t_welcome["video"] == {"width": 320, "height": 240, "fps": 3, "kbps": 90} and t_welcome["ice_servers"] == []
    bot, b_welcome = await server.bot(room)
    bot_id = b_welcome["peer_id"]
    assert (await recv_type(teacher, "bot"))["peer_id"] == bot_id
    asha, w_asha = await server.student(room, "Asha")
    ben, w_ben = await server.student(room, "Ben\x00\n\u202e")
    assert w_asha["bot"] == bot_id and "participants" not in w_asha
    assert (await recv_type(bot, "participant"))["name"] == "Asha"
    assert (await recv_type(bot, "participant"))["name"] == "Ben"        # control characters stripped
    assert (await recv_type(teacher, "participant"))["event"] == "joined"

    await asha.send_json(offer(bot_id))
    relayed = await recv_type(bot, "signal")
    assert relayed["from"] == w_asha["peer_id"] and relayed["data"] == {"type": "offer", "sdp": "v=0 offer"}
    await bot.send_json({"v": 1, "type": "signal", "to": w_asha["peer_id"],
                         "data": {"type": "answer", "sdp": "v=0 answer"}})
    answer = await recv_type(asha, "signal")
    assert answer["from"] == bot_id and answer["data"]["type"] == "answer"

    # A student may not signal another student (or itself); a teacher may not signal at all.
    for to in (w_ben["peer_id"], w_asha["peer_id"], t_welcome["peer_id"], "nosuchpeer"):
        await asha.send_json(offer(to, "x"))
        assert (await recv_type(asha, "error"))["code"] == "bad_target"
    await teacher.send_json(offer(w_asha["peer_id"], "x"))
    assert (await recv_type(teacher, "error"))["code"] == "bad_type"
    await bot.send_json(offer(t_welcome["peer_id"], "x"))          # the bot signals students only
    assert (await recv_type(bot, "error"))["code"] == "bad_target"

    # State, alerts and the session from the bot reach the teacher, never a student.
    await bot.send_json({"v": 1, "type": "session", "session_id": "sess-1"})
    await bot.send_json({"v": 1, "type": "state", "state": {"students": [{"name": "Asha", "confusion": 0.7}]}})
    await bot.send_json({"v": 1, "type": "alert", "alert": {"alert_id": "a1", "message": "Asha seems confused"}})
    assert (await recv_type(teacher, "session"))["session_id"] == "sess-1"
    assert (await recv_type(teacher, "state"))["state"]["students"][0]["name"] == "Asha"
    assert (await recv_type(teacher, "alert"))["alert"]["alert_id"] == "a1"
    for student in (asha, ben):
        got = await nothing_more(student)
        assert not {m["type"] for m in got} & PRIVATE, got
        assert "Asha" not in json.dumps(got) or student is asha
    assert "Ben" not in json.dumps(await nothing_more(asha, 0.05))
    # Students cannot pretend to be the bot or a teacher.
    await ben.send_json({"v": 1, "type": "alert", "alert": {"alert_id": "fake", "message": "fake"}})
    assert (await recv_type(ben, "error"))["code"] == "bad_type"
    await ben.send_json({"v": 1, "type": "control", "action": "mute", "peer_id": w_asha["peer_id"]})
    assert (await recv_type(ben, "error"))["code"] == "bad_type"
    assert not [m for m in await nothing_more(teacher) if m["type"] == "alert"]
    assert not [m for m in await nothing_more(bot) if m["type"] == "control"]


async def test_a_late_teacher_gets_the_cached_state_and_controls_reach_the_bot(server):
    room = await server.room()
    bot, _ = await server.bot(room)
    await bot.send_json({"v": 1, "type": "session", "session_id": "s1"})
    await bot.send_json({"v": 1, "type": "state", "state": {"students": [], "t": 1}})
    await bot.send_json({"v": 1, "type": "state", "state": {"students": [], "t": 2}})
    await asyncio.sleep(0.2)
    teacher, welcome = await server.teacher(room)
    assert welcome["session_id"] == "s1" and welcome["bot"]
    assert (await recv(teacher))["state"]["t"] == 2
    student, s_welcome = await server.student(room)
    assert s_welcome["session_id"] == "s1"
    assert not {m["type"] for m in await nothing_more(student, 0.1)} & PRIVATE

    controls = [
        {"action": "threshold", "kind": "confusion", "value": 0.6},
        {"action": "ack", "alert_id": "a1"},
        {"action": "mute", "peer_id": s_welcome["peer_id"]},
        {"action": "unmute", "peer_id": s_welcome["peer_id"]},
    ]
    for control in controls:
        await teacher.send_json({"v": 1, "type": "control", **control, "extra": "dropped"})
        got = await recv_type(bot, "control")
        assert got == {"v": 1, "type": "control", "from": welcome["peer_id"], **control}
    for bad in ({"action": "threshold", "kind": "confusion", "value": 7},
                {"action": "threshold", "kind": "confusion", "value": 10 ** 400},   # overflows a float
                {"action": "threshold", "kind": "happiness", "value": 0.5},
                {"action": "threshold", "kind": "boredom", "value": True},
                {"action": "mute", "peer_id": "bad id!"}, {"action": "explode"}):
        await teacher.send_json({"v": 1, "type": "control", **bad})
        assert (await recv_type(teacher, "error"))["code"] == "bad_field"
    assert not [m for m in await nothing_more(bot, 0.1) if m["type"] == "control"]

    # The bot leaves: the cache goes with it, students and teachers hear that it left.
    await bot.close()
    assert (await recv_type(student, "bot"))["peer_id"] is None
    assert (await recv_type(teacher, "bot"))["peer_id"] is None
    await teacher.send_json({"v": 1, "type": "control", "action": "ack", "alert_id": "a1"})
    assert (await recv_type(teacher, "error"))["code"] == "no_bot"
    late, _ = await server.teacher(room)
    assert not [m for m in await nothing_more(late, 0.1) if m["type"] == "state"]


async def test_consent_reaches_bot_and_teachers_and_leaving_is_announced(server):
    room = await server.room()
    bot, _ = await server.bot(room)
    teacher, _ = await server.teacher(room)
    asha, welcome = await server.student(room, analysis=True)
    await recv_type(bot, "participant")
    await recv_type(teacher, "participant")
    await asha.send_json({"v": 1, "type": "consent", "analysis": False})
    for watcher in (bot, teacher):
        consent = await recv_type(watcher, "participant")
        assert consent == {"v": 1, "type": "participant", "event": "consent", "peer_id": welcome["peer_id"],
                           "name": "Asha", "analysis": False}
    async with server.http.get(f"{server.url}/api/rooms/{room['room']}", headers=server.auth(room)) as r:
        assert (await r.json())["participants"][0]["analysis"] is False
    # An opted-out student's offer never reaches the bot, whatever the page does.
    bot_id = server.registry.get(room["room"]).bot.peer_id
    await asha.send_json(offer(bot_id, "my camera"))
    assert (await recv_type(asha, "error"))["code"] == "opted_out"
    assert not [m for m in await nothing_more(bot, 0.1) if m["type"] == "signal"]
    await asha.send_json({"v": 1, "type": "consent", "analysis": True})
    await asha.send_json(offer(bot_id, "my camera"))
    for watcher in (bot, teacher):
        assert (await recv_type(watcher, "participant"))["analysis"] is True
    assert (await recv_type(bot, "signal"))["data"]["sdp"] == "my camera"
    await asha.close()
    for watcher in (bot, teacher):
        assert (await recv_type(watcher, "participant"))["event"] == "left"


async def test_a_second_bot_replaces_the_first_and_keeps_the_session(server):
    room = await server.room()
    first, _ = await server.bot(room)
    await first.send_json({"v": 1, "type": "session", "session_id": "keep-me"})
    student, _ = await server.student(room)
    await recv_type(first, "participant")
    second, welcome = await server.bot(room)
    assert welcome["session_id"] == "keep-me"
    assert [p["name"] for p in welcome["participants"]] == ["Asha"]
    assert (await recv_type(first, "error"))["code"] == "replaced"
    assert await closed_with(first) == 4409          # 44xx: the old bot must not reconnect and fight back
    assert (await recv_type(student, "bot"))["peer_id"] == welcome["peer_id"]
    await asyncio.sleep(0.1)
    assert server.registry.get(room["room"]).bot.peer_id == welcome["peer_id"]   # the old one's exit changed nothing


# ---- bad input and limits --------------------------------------------------------------------
@pytest.mark.parametrize("raw, code", [
    ("not json", "bad_json"), ("[1,2]", "bad_message"), ('"hello"', "bad_message"),
    ('{"v": 2, "type": "signal"}', "bad_version"), ('{"type": "ping"}', "bad_version"),
    ('{"v": 1}', "bad_message"), ('{"v": 1, "type": "teleport"}', "bad_type"),
    ('{"v": 1, "type": "consent", "analysis": "yes"}', "bad_field"),
    ('{"v": 1, "type": "signal", "to": "x", "data": {"type": "pranswer", "sdp": "x"}}', "bad_field"),
    ('{"v": 1, "type": "signal", "to": "x", "data": {"type": "offer", "sdp": 5}}', "bad_field"),
    ('{"v": 1, "type": "state", "state": {}}', "bad_type"), ('{"v": 1, "type": "hello"}', "bad_type"),
    ("[" * 5000, "bad_json"), ('{"v": 1, "type": "ping", "x": 1e999}', "bad_json"),
    (json.dumps(offer("x", "a" * 20_000)), "too_large"),
    (json.dumps(offer("x", "v=0\r\n" + "a=candidate:1 1 udp 1 10.0.0.1 9 typ host\r\n" * 33)), "bad_field"),
    (json.dumps(offer("x", "v=0\r\n" + "m=video 9 RTP/AVP 96\r\n" * 5)), "bad_field"),
])
async def test_malformed_messages_get_an_error_and_the_room_keeps_working(server, raw, code):
    room = await server.room()
    bot, welcome = await server.bot(room)
    asha, _ = await server.student(room, "Asha")
    ben, _ = await server.student(room, "Ben")
    await asha.send_str(raw)
    assert (await recv_type(asha, "error"))["code"] == code
    await asha.send_json(offer(welcome["peer_id"], "still works"))
    assert (await recv_type(bot, "signal"))["data"]["sdp"] == "still works"
    await ben.send_json(offer(welcome["peer_id"], "ben too"))
    assert (await recv_type(bot, "signal"))["data"]["sdp"] == "ben too"
    async with server.http.get(server.url + "/healthz") as r:
        assert r.status == 200


async def test_binary_frames_and_bad_hellos_are_refused(server):
    room = await server.room()
    ws = await server.connect()
    await ws.send_bytes(b"\x00\x01")
    assert (await recv(ws))["code"] == "bad_message"
    assert await closed_with(ws) == 4400
    for hello in ('{"v":1,"type":"signal"}', "{", json.dumps({"v": 1, "type": "hello", "role": "admin"}),
                  json.dumps({"v": 1, "type": "hello", "role": "worker", "key": "k"})):
        ws = await server.connect(hello)
        assert (await recv(ws))["type"] == "error"
        assert await closed_with(ws) == 4400
    student, _ = await server.student(room)
    await student.send_bytes(json.dumps({"v": 1, "type": "ping"}).encode())    # UTF-8 bytes are accepted
    assert (await recv(student))["type"] == "pong"


async def test_an_oversized_frame_is_cut_by_the_socket_limit(make_server):
    server = await make_server(max_message_bytes=2048, max_bot_message_bytes=4096)
    room = await server.room()
    student, _ = await server.student(room)
    await student.send_str(json.dumps(offer("x", "a" * 3000)))      # over the student limit: error, still open
    assert (await recv(student))["code"] == "too_large"
    await student.send_json({"v": 1, "type": "ping"})
    assert (await recv(student))["type"] == "pong"
    await student.send_str("x" * 10_000)                            # over the socket limit: closed (1009)
    assert await closed_with(student) == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    await asyncio.sleep(0.1)
    assert server.registry.get(room["room"]).size() == 0


async def test_a_flood_of_messages_is_cut_off(server):
    room = await server.room()
    teacher, _ = await server.teacher(room)
    asha, _ = await server.student(room)
    await recv_type(teacher, "participant")
    for _ in range(200):
        if asha.closed:
            break
        await asha.send_json({"v": 1, "type": "ping"})
    got = await nothing_more(asha, 1.0)
    assert any(m.get("code") == "rate_limited" for m in got)
    assert asha.closed or await closed_with(asha) == 4429
    assert (await recv_type(teacher, "participant"))["event"] == "left"


async def test_a_silent_socket_is_closed_after_the_hello_timeout(make_server):
    server = await make_server(hello_timeout_seconds=0.3)
    for path in ("/ws", "/ws/worker"):
        ws = await server.connect(path=path)
        error = await recv(ws, 2.0)
        assert error["code"] == "timeout"
        assert await closed_with(ws) == 4408


async def test_pinging_does_not_keep_a_socket_without_hello_open(make_server):
    server = await make_server(hello_timeout_seconds=0.5)
    ws = await server.connect()

    async def keep_pinging() -> None:
        while True:
            await ws.ping()
            await asyncio.sleep(0.15)

    pinging = asyncio.create_task(keep_pinging())
    try:
        error = await recv(ws, 2.0)      # while the pings go on, well past the 0.5 s deadline
    finally:
        pinging.cancel()
    assert error["code"] == "timeout"
    assert await closed_with(ws) == 4408


async def test_one_address_cannot_hold_many_sockets_open_without_hello(make_server):
    server = await make_server(max_pending_hellos_per_address=3, hello_timeout_seconds=5.0)
    waiting = [await server.connect() for _ in range(3)]
    refused = await server.connect()
    assert (await recv(refused))["code"] == "busy"
    assert await closed_with(refused) == 1013                  # try again later: not a 44xx "give up"
    for ws in waiting:
        await ws.close()
    await asyncio.sleep(0.1)
    room = await server.room()
    assert (await server.student(room))[1]["type"] == "welcome"   # the slots are free again


async def test_clients_that_vanish_before_or_during_hello_leave_nothing_behind(server):
    room = await server.room()
    silent = await server.connect()
    await silent.close()
    half = await server.connect('{"v":1,"type":"hel')
    await half.close()
    # Hello sent, then gone before reading the welcome (closed while the server admits it).
    for _ in range(5):
        ghost = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Ghost"})
        await ghost.close()
    raw = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Raw"})
    raw._response.connection.transport.abort()        # no closing handshake at all
    teacher = await server.connect({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})
    await teacher.close()
    await asyncio.sleep(0.3)
    live = server.registry.get(room["room"])
    assert live.size() == 0 and not live.students and not live.teachers
    async with server.http.get(f"{server.url}/api/rooms/{room['room']}", headers=server.auth(room)) as r:
        assert (await r.json())["participants"] == []


async def test_a_full_room_and_a_full_server_refuse_politely(make_server):
    server = await make_server(max_participants_per_room=2, max_rooms=2, max_teachers_per_room=1)
    room = await server.room()
    seated = [await server.student(room, "A"), await server.student(room, "B"), await server.teacher(room)]
    ws = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "C"})
    assert (await recv(ws))["code"] == "room_full"
    assert await closed_with(ws) == 4429
    ws = await server.connect({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})
    assert (await recv(ws))["code"] == "room_full"       # teacher connections have their own cap
    seated.append(await server.bot(room))                    # the bot always gets in
    other = await server.room()
    seated.append(await server.teacher(other))
    async with server.http.post(server.url + "/api/rooms", json={}) as r:
        assert r.status == 503 and "error" in await r.json()


async def test_students_filling_every_seat_cannot_lock_the_teacher_out(make_server):
    server = await make_server(max_participants_per_room=3)
    room = await server.room()
    students = [await server.student(room, f"S{i}") for i in range(3)]
    teacher, welcome = await server.teacher(room)          # seated: students never take teacher seats
    assert welcome["type"] == "welcome" and len(students) == 3


async def test_a_flood_of_unused_rooms_cannot_lock_out_a_teacher_whose_room_was_unloaded(make_server):
    server = await make_server(max_rooms=3, room_idle_seconds=3600, rooms_per_minute_per_address=0.0)
    mine = await server.room()
    flood = [await server.room() for _ in range(10)]          # nobody joins them; each unloads an idle one
    assert len(server.registry.rooms) == 3 and server.registry.get(mine["room"]) is None
    teacher, welcome = await server.teacher(mine)            # reloaded from the store, not server_full
    assert welcome["type"] == "welcome"
    busy = [await server.teacher(room) for room in flood[-2:]]
    async with server.http.post(server.url + "/api/rooms", json={}) as r:
        assert r.status == 503                                   # every live room has someone in it
    assert len(busy) == 2


async def test_one_address_cannot_create_rooms_without_limit(make_server):
    server = await make_server(rooms_per_minute_per_address=3.0)
    for _ in range(3):
        await server.room()
    async with server.http.post(server.url + "/api/rooms", json={}) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "60" and "error" in await r.json()
    assert len(server.registry.rooms) == 3
    unlimited = await make_server(rooms_per_minute_per_address=0.0)
    for _ in range(12):
        await unlimited.room()


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_room_limit(make_server):
    async def create(server, forwarded_for: str) -> int:
        async with server.http.post(server.url + "/api/rooms", json={},
                                    headers={"X-Forwarded-For": forwarded_for}) as r:
            return r.status

    proxied = await make_server(rooms_per_minute_per_address=2.0, trusted_proxies="127.0.0.1")
    assert [await create(proxied, "203.0.113.5") for _ in range(3)] == [200, 200, 429]
    assert await create(proxied, "203.0.113.6") == 200           # another client behind the same proxy
    direct = await make_server(rooms_per_minute_per_address=2.0)  # no proxy trusted: the header is ignored
    assert [await create(direct, f"203.0.113.{i}") for i in range(3)] == [200, 200, 429]


async def test_idle_rooms_are_unloaded_and_reloaded_from_the_store(make_server):
    server = await make_server(room_idle_seconds=0.0, max_rooms=1)
    first = await server.room()
    second = await server.room()                 # the first (nobody connected) made room for it
    assert server.registry.get(first["room"]) is None
    teacher, _ = await server.teacher(first)     # reloaded from the store on hello
    async with server.http.post(server.url + "/api/rooms", json={}) as r:
        assert r.status == 503                   # ...and now occupied
    assert second["room"] not in server.registry.rooms


# ---- bot workers -----------------------------------------------------------------------------
async def test_invite_needs_a_worker_and_the_worker_gets_a_bot_token(server):
    room = await server.room()
    url = f"{server.url}/api/rooms/{room['room']}/invite"
    async with server.http.post(url, headers=server.auth(room)) as r:
        assert r.status == 503 and "error" in await r.json()
    async with server.http.post(url) as r:
        assert r.status == 401
    async with server.http.post(url, headers={"Authorization": "Bearer " + "z" * 32}) as r:
        assert r.status == 401
    async with server.http.post(f"{server.url}/api/rooms/nosuchroom/invite", headers=server.auth(room)) as r:
        assert r.status == 404
    wrong, refused = await server.worker("wrong")
    assert refused["code"] == "unauthorized" and await closed_with(wrong) == 4401
    worker, welcome = await server.worker()
    assert welcome["type"] == "welcome" and welcome["role"] == "worker"
    async with server.http.post(url, headers=server.auth(room)) as r:
        assert r.status == 200
    invite = await recv(worker)
    assert invite["type"] == "invite" and invite["room"] == room["room"]
    assert invite["token"] != room["teacher_token"]
    async with server.http.post(url, headers=server.auth(room)) as r:    # the bot is on its way: no second one
        assert (await r.json()).get("already_invited")
    assert not await nothing_more(worker, 0.1)
    bot, b_welcome = await server.bot(room, invite["token"])
    async with server.http.post(url, headers=server.auth(room)) as r:
        assert (await r.json())["bot"] == b_welcome["peer_id"]
    other = await server.room()                                         # a bot token opens only its own room
    ws = await server.connect({"role": "bot", "room": other["room"], "token": invite["token"]})
    assert (await recv(ws))["code"] == "unauthorized"
    await worker.send_json({"v": 1, "type": "ping"})
    assert (await recv(worker))["type"] == "pong"
    await worker.close()
    await asyncio.sleep(0.1)
    async with server.http.post(f"{server.url}/api/rooms/{other['room']}/invite", headers=server.auth(other)) as r:
        assert r.status == 503


async def test_invites_go_to_the_least_busy_worker(server):
    w1, _ = await server.worker()
    w2, _ = await server.worker()
    rooms = [await server.room() for _ in range(4)]
    for room in rooms:
        async with server.http.post(f"{server.url}/api/rooms/{room['room']}/invite", headers=server.auth(room)) as r:
            assert r.status == 200
    got1 = [m["room"] for m in await nothing_more(w1, 0.2)]
    got2 = [m["room"] for m in await nothing_more(w2, 0.2)]
    assert len(got1) == len(got2) == 2 and set(got1 + got2) == {r["room"] for r in rooms}


# ---- review API and pages --------------------------------------------------------------------
async def test_review_api_is_for_the_owning_teacher_only(server):
    mine, other = await server.room(), await server.room()
    server.store.add_session("sess1", mine["room"], samples=["2024-01-01T00:00:00Z,1.0,p1,Asha\n"],
                             alerts=["2024-01-01T00:00:00Z,1.0,student,confusion\n"])
    for path in ("/api/sessions/sess1/review", "/api/sessions/sess1/samples.csv", "/api/sessions/sess1/alerts.csv"):
        async with server.http.get(server.url + path) as r:
            assert r.status == 401, path
        async with server.http.get(server.url + path, headers=server.auth(other)) as r:
            assert r.status == 404, path      # as if it did not exist: ids of other rooms do not leak
        async with server.http.get(server.url + path.replace("sess1", "nosuch"), headers=server.auth(mine)) as r:
            assert r.status == 404, path
        async with server.http.get(server.url + path, headers=server.auth(mine)) as r:
            assert r.status == 200, path
            if path.endswith(".csv"):
                assert r.headers["Content-Type"].startswith("text/csv")
                assert r.headers["Content-Disposition"].startswith("attachment;")
                lines = (await r.text()).splitlines()
                assert lines[0].startswith("time_iso") and len(lines) == 2
            else:
                assert (await r.json())["session"]["session_id"] == "sess1"
    async with server.http.get(server.url + "/api/sessions/sess1/review?bucket=nan", headers=server.auth(mine)) as r:
        assert r.status == 400
    url = f"{server.url}/api/rooms/{mine['room']}/sessions"
    async with server.http.get(url) as r:
        assert r.status == 401
    async with server.http.get(url, headers=server.auth(other)) as r:
        assert r.status == 401
    async with server.http.get(url, headers=server.auth(mine)) as r:
        assert [s["session_id"] for s in (await r.json())["sessions"]] == ["sess1"]


async def test_only_the_owning_teacher_deletes_a_session_and_never_one_still_being_recorded(server):
    mine, other = await server.room(), await server.room()
    server.store.add_session("old", mine["room"], samples=["2024-01-01T00:00:00Z,1.0,p1,Asha\n"])
    server.store.add_session("live", mine["room"])
    url = server.url + "/api/sessions/old"
    async with server.http.delete(url) as r:
        assert r.status == 401
    async with server.http.delete(url, headers=server.auth(other)) as r:
        assert r.status == 404
    async with server.http.delete(server.url + "/api/sessions/nosuch", headers=server.auth(mine)) as r:
        assert r.status == 404
    async with server.http.delete(url, headers=server.auth(mine)) as r:
        assert r.status == 200 and await r.json() == {"deleted": "old"}
    async with server.http.get(url + "/samples.csv", headers=server.auth(mine)) as r:
        assert r.status == 404                                  # gone, rows and all
    bot, _ = await server.bot(mine)
    await bot.send_json({"v": 1, "type": "session", "session_id": "live"})
    await asyncio.sleep(0.1)
    async with server.http.delete(server.url + "/api/sessions/live", headers=server.auth(mine)) as r:
        assert r.status == 409 and "still in the room" in (await r.json())["error"]
    await bot.close()
    await asyncio.sleep(0.1)
    async with server.http.delete(server.url + "/api/sessions/live", headers=server.auth(mine)) as r:
        assert r.status == 200
    async with server.http.get(f"{server.url}/api/rooms/{mine['room']}/sessions", headers=server.auth(mine)) as r:
        listed = await r.json()
        assert listed["sessions"] == [] and listed["retention_days"] == Settings().storage.retention_days
    async with server.http.get(server.url + "/api/policy") as r:      # what students read before joining
        assert await r.json() == {"retention_days": Settings().storage.retention_days, "media_mode": "direct"}


async def test_the_server_erases_sessions_past_the_retention_period(tmp_path):
    store = MemoryStore()
    store.add_session("expired", "room1")
    store.add_session("recent", "room1")
    store.sessions["expired"]["ended_at"] = time.time() - 3 * 86400
    store.add_session("crashed", "room1")                     # never ended, started long ago
    store.sessions["crashed"]["started_at"] = time.time() - 5 * 86400
    for days, left in ((0, {"expired", "recent", "crashed"}), (2, {"recent"})):
        app = create_app(Settings().replace(storage={"retention_days": days}), store=store, static_dir=tmp_path)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            for _ in range(50):
                await asyncio.sleep(0.02)
            assert set(store.sessions) == left, days
        finally:
            await runner.cleanup()


async def test_pages_carry_security_headers_and_static_files_cannot_escape(server):
    for path in ("/", "/join/abc?k=x", "/teach/abc", "/review/abc", "/static/app.css"):
        async with server.http.get(server.url + path) as r:
            assert r.status == 200, path
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert "media-src 'self' blob: mediastream:" in csp and "connect-src 'self' ws://127.0.0.1:" in csp
            assert "ws: " not in csp and "wss:" not in csp
            assert r.headers["Referrer-Policy"] == "no-referrer"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/static/..%2Fsecret.txt", "/static/%2E%2E%2Fsecret.txt", "/static/../secret.txt",
                 "/static/.hidden", "/static/nope.js", "/static/", "/static/%5C..%5Csecret.txt",
                 "/static/app.css%00.js"):
        async with server.http.get(server.url + path) as r:
            assert r.status == 404, path
            assert "outside" not in await r.text()
    async with server.http.get(server.url + "/healthz") as r:
        assert (await r.json())["ok"] is True


async def test_missing_pages_are_404_not_a_crash(tmp_path):
    app = create_app(Settings(), static_dir=tmp_path / "empty")
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            for path in ("/", "/join/abc", "/static/app.css"):
                async with http.get(url + path) as r:
                    assert r.status == 404
    finally:
        await runner.cleanup()


async def test_shutdown_closes_live_sockets(tmp_path):
    runner, server = await start_server(tmp_path)
    try:
        room = await server.room()
        student, _ = await server.student(room)
        await runner.cleanup()
        assert await closed_with(student, 5.0) == aiohttp.WSCloseCode.GOING_AWAY
    finally:
        await server.http.close()


# ---- the in-memory parts, directly ------------------------------------------------------------
class StalledSocket:
    """A client that stopped reading: every write hangs."""

    def __init__(self) -> None:
        self.closed = False
        self.aborted = False

    async def send_str(self, data: str) -> None:
        await asyncio.Event().wait()

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool:
        self.closed = True
        return True


async def test_a_stalled_peer_is_dropped_without_blocking_the_sender():
    ws = StalledSocket()
    peer = Peer("p1", "teacher", ws, abort=lambda: setattr(ws, "aborted", True), queue_size=8, send_timeout=60)
    peer.start()
    sent = [peer.send({"v": 1, "type": "state", "i": i}) for i in range(20)]   # returns at once every time
    assert sent[:8] == [True] * 8 and not all(sent) and ws.aborted and peer.dropped
    await peer.stop(grace=0.1)


def test_registry_limits_and_cleanup():
    registry = Registry(max_rooms=1, max_participants_per_room=1, room_idle_seconds=3600, max_teachers_per_room=1)
    idle = registry.add(Room("r0", "", "k" * 16, "h"))
    room = registry.add(Room("r1", "", "k" * 16, "h"))          # nobody was in r0: unloaded to make room
    assert registry.get(idle.room_id) is None
    student = Peer("s1", "student", StalledSocket())
    registry.join(room, student)
    with pytest.raises(TooManyRooms):                            # r1 is occupied
        registry.add(Room("r2", "", "k" * 16, "h"))
    assert registry.add(Room("r1", "", "other", "h")) is room           # a race to load keeps the first
    with pytest.raises(RoomFull):
        registry.join(room, Peer("s2", "student", StalledSocket()))
    teacher = Peer("t1", "teacher", StalledSocket())
    registry.join(room, teacher)
    with pytest.raises(RoomFull):
        registry.join(room, Peer("t2", "teacher", StalledSocket()))
    assert registry.leave(room, teacher)
    bot1, bot2 = Peer("b1", "bot", StalledSocket()), Peer("b2", "bot", StalledSocket())
    assert registry.join(room, bot1) is None and registry.join(room, bot2) is bot1
    room.last_state = {"type": "state"}
    assert registry.leave(room, bot1) is False and room.bot is bot2 and room.last_state
    assert registry.leave(room, bot2) is True and room.bot is None and room.last_state is None
    assert registry.leave(room, student) and room.size() == 0
    assert registry.prune(now=room.idle_since + 3601) == 1 and not registry.rooms   # + 3600 can round below it


def test_rate_limit_bucket():
    now = [0.0]
    rate = RateLimit(per_second=2, burst=3, clock=lambda: now[0])
    assert [rate.allow() for _ in range(4)] == [True, True, True, False]
    now[0] += 1.0
    assert [rate.allow() for _ in range(3)] == [True, True, False]


async def test_a_failing_store_costs_one_connection_not_the_server(tmp_path):
    class BrokenStore(MemoryStore):
        def get_room(self, room_id):
            raise OSError("database is locked")

    store = BrokenStore()
    runner = web.AppRunner(create_app(Settings(), store=store, static_dir=tmp_path), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(url.replace("http", "ws", 1) + "/ws")
            await ws.send_json({"v": 1, "type": "hello", "role": "student", "room": "abcdef", "key": "k" * 16,
                                "name": "Asha"})
            assert (await recv(ws))["code"] == "internal"
            assert await closed_with(ws) == aiohttp.WSCloseCode.INTERNAL_ERROR
            async with http.get(url + "/healthz") as r:
                assert r.status == 200
    finally:
        await runner.cleanup()


def test_every_inbound_message_type_has_a_relay_handler_and_every_route_is_in_the_table():
    # A new message type is an INBOUND entry (who may send it, its validator) plus a relay handler: one
    # without the other would be a type the server accepts and then fails on, or dead code.
    from signaling import protocol, relay
    from signaling.routes import ROUTES
    assert set(protocol.INBOUND) == set(relay.HANDLERS)
    app = create_app(Settings())
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    assert served == {(d.method, d.path) for d in ROUTES}
    assert ("GET", "/ws") in served and ("DELETE", "/api/sessions/{sid}") in served


def test_the_server_and_the_bot_share_one_protocol_vocabulary():
    # The constants travel as plain JSON values and compare equal to them, so a client may match on either.
    from bot import alerts
    from core.protocol import THRESHOLD_KINDS, CloseCode, ErrorCode, retry_is_pointless
    from signaling import protocol
    assert protocol.THRESHOLD_KINDS is THRESHOLD_KINDS and alerts.THRESHOLD_KINDS is THRESHOLD_KINDS
    assert json.dumps(protocol.error(ErrorCode.IDLE, "x")) == '{"v": 1, "type": "error", "code": "idle", "message": "x"}'
    assert ErrorCode.REPLACED == "replaced" and f"{ErrorCode.BAD_FIELD}" == "bad_field" and CloseCode.REPLACED == 4409
    assert str(CloseCode.UNAUTHORIZED) == "4401"
    assert retry_is_pointless(CloseCode.UNAUTHORIZED) and not retry_is_pointless(CloseCode.SERVER_FULL)
    assert not retry_is_pointless(None) and not retry_is_pointless(CloseCode.TRY_AGAIN_LATER)


def test_websocket_urls_follow_the_servers_scheme():
    from core.protocol import websocket_url
    assert websocket_url("http://127.0.0.1:8080/", "/ws") == "ws://127.0.0.1:8080/ws"
    assert websocket_url("https://class.example.org", "ws/worker") == "wss://class.example.org/ws/worker"
    assert websocket_url("wss://class.example.org/", "/ingest/recall/s") == "wss://class.example.org/ingest/recall/s"
