"""The signaling server as clients meet it: auth, relay rules, privacy of teacher data, bad input."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from bot.simulate import free_port
from core.settings import Settings
from signaling.memory_store import MemoryStore
from signaling.server import create_app


class Server:
    def __init__(self, url: str, store: MemoryStore, http: aiohttp.ClientSession) -> None:
        self.url, self.store, self.http = url, store, http

    async def room(self) -> dict:
        async with self.http.post(self.url + "/api/rooms", json={"title": "Maths"}) as r:
            assert r.status == 200
            return await r.json()

    async def connect(self, hello: dict | str | None = None) -> aiohttp.ClientWebSocketResponse:
        ws = await self.http.ws_connect(self.url.replace("http", "ws") + "/ws")
        if hello is not None:
            await (ws.send_str(hello) if isinstance(hello, str) else ws.send_json({"v": 1, "type": "hello", **hello}))
        return ws


@pytest.fixture
async def server(tmp_path):
    static = tmp_path / "static"
    static.mkdir()
    for page in ("index.html", "join.html", "teach.html", "review.html"):
        (static / page).write_text(f"<!doctype html><title>{page}</title>")
    (static / "app.css").write_text("body{}")
    port = free_port()
    store = MemoryStore()
    settings = Settings().replace(server={"port": port, "max_message_bytes": 16_384})
    runner = web.AppRunner(create_app(settings, store=store, static_dir=static))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as http:
        yield Server(f"http://127.0.0.1:{port}", store, http)
    await runner.cleanup()


async def recv(ws, timeout: float = 2.0) -> dict:
    msg = await ws.receive(timeout=timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return json.loads(msg.data)


async def recv_type(ws, kind: str, timeout: float = 2.0) -> dict:
    while True:
        data = await recv(ws, timeout)
        if data["type"] == kind:
            return data


async def nothing_more(ws, wait: float = 0.5) -> list[dict]:
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


def key_of(room: dict) -> str:
    return room["student_url"].split("k=", 1)[1]


async def bot_of(server: Server, room: dict):
    bot = await server.connect({"role": "bot", "room": room["room"], "token": room["teacher_token"]})
    welcome = await recv(bot)
    assert welcome["type"] == "welcome"
    return bot, welcome["peer_id"]


async def test_room_links_never_put_the_teacher_token_in_the_student_link(server):
    room = await server.room()
    assert room["teacher_token"] not in room["student_url"]
    assert "#t=" + room["teacher_token"] in room["teacher_url"]


@pytest.mark.parametrize("who", ["student-wrong-key", "teacher-wrong-token", "unknown-room"])
async def test_wrong_credentials_are_refused_and_closed(server, who):
    room = await server.room()
    hello = {"student-wrong-key": {"role": "student", "room": room["room"], "key": "x" * 16, "name": "Eve"},
             "teacher-wrong-token": {"role": "teacher", "room": room["room"], "token": "y" * 32},
             "unknown-room": {"role": "student", "room": "nosuchroom", "key": key_of(room), "name": "Eve"}}[who]
    ws = await server.connect(hello)
    error = await recv(ws)
    assert error["type"] == "error" and error["code"] in ("unauthorized", "unknown_room")
    msg = await ws.receive(timeout=2)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)


async def test_offers_flow_student_to_bot_only_and_teacher_data_stays_with_teachers(server):
    room = await server.room()
    teacher = await server.connect({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})
    assert (await recv(teacher))["type"] == "welcome"
    bot, bot_id = await bot_of(server, room)
    asha = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Asha"})
    ben = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Ben\x00\n"})
    w_asha, w_ben = await recv(asha), await recv(ben)
    assert w_asha["bot"] == bot_id and "participants" not in w_asha
    joined = await recv_type(bot, "participant")
    assert joined["name"] == "Asha"
    assert (await recv_type(bot, "participant"))["name"] == "Ben"        # control characters stripped

    await asha.send_json({"v": 1, "type": "signal", "to": bot_id, "data": {"type": "offer", "sdp": "v=0 offer"}})
    relayed = await recv_type(bot, "signal")
    assert relayed["from"] == w_asha["peer_id"] and relayed["data"]["sdp"] == "v=0 offer"
    await bot.send_json({"v": 1, "type": "signal", "to": w_asha["peer_id"], "data": {"type": "answer", "sdp": "v=0 answer"}})
    assert (await recv_type(asha, "signal"))["data"]["type"] == "answer"

    # A student may not signal another student; a teacher may not signal at all.
    await asha.send_json({"v": 1, "type": "signal", "to": w_ben["peer_id"], "data": {"type": "offer", "sdp": "x"}})
    assert (await recv_type(asha, "error"))["code"] == "bad_target"
    await teacher.send_json({"v": 1, "type": "signal", "to": w_asha["peer_id"], "data": {"type": "offer", "sdp": "x"}})
    assert (await recv_type(teacher, "error"))["code"] == "bad_type"

    # State and alerts from the bot reach the teacher, never a student.
    await bot.send_json({"v": 1, "type": "state", "state": {"students": [{"name": "Asha", "confusion": 0.7}]}})
    await bot.send_json({"v": 1, "type": "alert", "alert": {"alert_id": "a1", "message": "Asha seems confused"}})
    assert (await recv_type(teacher, "state"))["state"]["students"][0]["name"] == "Asha"
    assert (await recv_type(teacher, "alert"))["alert"]["alert_id"] == "a1"
    for student in (asha, ben):
        leaked = {m["type"] for m in await nothing_more(student)}
        assert not leaked & {"state", "alert", "participant", "control"}
    # Students cannot pretend to be the bot.
    await ben.send_json({"v": 1, "type": "alert", "alert": {"message": "fake"}})
    assert (await recv_type(ben, "error"))["code"] == "bad_type"
    assert not [m for m in await nothing_more(teacher) if m["type"] == "alert"]


async def test_a_teacher_who_connects_late_gets_the_latest_state_and_controls_reach_the_bot(server):
    room = await server.room()
    bot, _ = await bot_of(server, room)
    await bot.send_json({"v": 1, "type": "state", "state": {"students": [], "t": 1}})
    await asyncio.sleep(0.2)
    teacher = await server.connect({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})
    assert (await recv(teacher))["type"] == "welcome"
    assert (await recv(teacher))["state"]["t"] == 1
    await teacher.send_json({"v": 1, "type": "control", "action": "threshold", "kind": "confusion", "value": 0.6})
    control = await recv_type(bot, "control")
    assert control["action"] == "threshold" and control["value"] == 0.6
    await teacher.send_json({"v": 1, "type": "control", "action": "threshold", "kind": "confusion", "value": 7})
    assert (await recv_type(teacher, "error"))["code"] == "bad_field"


async def test_consent_reaches_bot_and_leaving_is_announced(server):
    room = await server.room()
    bot, _ = await bot_of(server, room)
    asha = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Asha"})
    await recv(asha)
    await recv_type(bot, "participant")
    await asha.send_json({"v": 1, "type": "consent", "analysis": False})
    consent = await recv_type(bot, "participant")
    assert consent["event"] == "consent" and consent["analysis"] is False
    await asha.close()
    assert (await recv_type(bot, "participant"))["event"] == "left"


@pytest.mark.parametrize("raw, code", [
    ("not json", "bad_json"), ("[1,2]", "bad_message"), ('{"v": 2, "type": "signal"}', "bad_version"),
    ('{"v": 1, "type": "teleport"}', "bad_type"), ('{"v": 1, "type": "consent", "analysis": "yes"}', "bad_field"),
    (json.dumps({"v": 1, "type": "signal", "to": "x", "data": {"type": "offer", "sdp": "a" * 20_000}}), "too_large"),
])
async def test_malformed_messages_get_an_error_and_the_room_keeps_working(server, raw, code):
    room = await server.room()
    bot, bot_id = await bot_of(server, room)
    asha = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Asha"})
    await recv(asha)
    await asha.send_str(raw)
    assert (await recv_type(asha, "error"))["code"] == code
    await asha.send_json({"v": 1, "type": "signal", "to": bot_id, "data": {"type": "offer", "sdp": "still works"}})
    assert (await recv_type(bot, "signal"))["data"]["sdp"] == "still works"


async def test_a_flood_of_messages_is_cut_off(server):
    room = await server.room()
    asha = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Asha"})
    await recv(asha)
    for _ in range(200):
        if asha.closed:
            break
        await asha.send_json({"v": 1, "type": "ping"})
    got = await nothing_more(asha, 1.0)
    assert any(m.get("code") == "rate_limited" for m in got)


async def test_clients_that_vanish_before_or_after_hello_leave_nothing_behind(server):
    room = await server.room()
    silent = await server.connect()
    await silent.close()
    half = await server.connect('{"v":1,"type":"hel')
    await half.close()
    ghost = await server.connect({"role": "student", "room": room["room"], "key": key_of(room), "name": "Ghost"})
    await recv(ghost)
    await ghost.close()
    await asyncio.sleep(0.3)
    async with server.http.get(f"{server.url}/api/rooms/{room['room']}",
                               headers={"Authorization": f"Bearer {room['teacher_token']}"}) as r:
        assert (await r.json())["participants"] == []


async def test_invite_needs_a_worker_and_the_worker_gets_a_bot_token(server):
    room = await server.room()
    auth = {"Authorization": f"Bearer {room['teacher_token']}"}
    async with server.http.post(f"{server.url}/api/rooms/{room['room']}/invite", headers=auth) as r:
        assert r.status == 503
    async with server.http.post(f"{server.url}/api/rooms/{room['room']}/invite") as r:
        assert r.status == 401
    worker = await server.http.ws_connect(server.url.replace("http", "ws") + "/ws/worker")
    await worker.send_json({"v": 1, "type": "hello", "role": "worker", "key": "wrong"})
    assert (await recv(worker))["code"] == "unauthorized"
    worker = await server.http.ws_connect(server.url.replace("http", "ws") + "/ws/worker")
    await worker.send_json({"v": 1, "type": "hello", "role": "worker", "key": Settings().server.worker_key})
    assert (await recv(worker))["type"] == "welcome"
    async with server.http.post(f"{server.url}/api/rooms/{room['room']}/invite", headers=auth) as r:
        assert r.status == 200
    invite = await recv(worker)
    assert invite["type"] == "invite" and invite["room"] == room["room"]
    bot = await server.connect({"role": "bot", "room": room["room"], "token": invite["token"]})
    assert (await recv(bot))["type"] == "welcome"


async def test_review_api_is_for_the_owning_teacher_only(server):
    mine, other = await server.room(), await server.room()
    server.store.add_session("sess1", mine["room"])
    url = f"{server.url}/api/sessions/sess1/review"
    async with server.http.get(url) as r:
        assert r.status == 401
    async with server.http.get(url, headers={"Authorization": f"Bearer {other['teacher_token']}"}) as r:
        assert r.status == 403
    async with server.http.get(url, headers={"Authorization": f"Bearer {mine['teacher_token']}"}) as r:
        assert r.status == 200
    async with server.http.get(f"{server.url}/api/sessions/nosuch/review",
                               headers={"Authorization": f"Bearer {mine['teacher_token']}"}) as r:
        assert r.status == 404
    async with server.http.get(f"{server.url}/api/sessions/sess1/samples.csv",
                               headers={"Authorization": f"Bearer {mine['teacher_token']}"}) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/csv")
        assert (await r.text()).startswith("time_iso")


async def test_pages_carry_security_headers_and_static_files_cannot_escape(server):
    for path in ("/", "/join/abc", "/teach/abc", "/review/abc", "/static/app.css"):
        async with server.http.get(server.url + path) as r:
            assert r.status == 200, path
            assert "default-src 'self'" in r.headers["Content-Security-Policy"]
            assert r.headers["Referrer-Policy"] == "no-referrer"
    for path in ("/static/..%2Fserver.py", "/static/.hidden", "/static/nope.js"):
        async with server.http.get(server.url + path) as r:
            assert r.status == 404, path
    async with server.http.post(server.url + "/api/rooms", data="x" * 10_000,
                                headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
