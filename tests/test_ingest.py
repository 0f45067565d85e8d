"""A Zoom / Meet / Teams class through a meeting-bot service: the real server, the real bot service (inference
thread, real model), real SQLite, real aiohttp websockets playing Recall.ai's and Attendee's messages
(tests/fixtures/ingest/ for their shapes). Attendee's chat API is stood in for by a small aiohttp server that
this test starts and that records what it is sent (a third party's API; ours are never mocked)."""
from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from typing import Any

import aiohttp
import cv2
import numpy as np
import pytest
from aiohttp import web

from bot import ingest_replay
from bot.students import load_video_frames
from core.records import AlertRecord
from signaling.ingest import INGEST_KEY
from signaling.state import STATE_KEY
from tests.spine import PROJECT, VIDEOS, LiveClass, eventually, start_class, stop_class

FACE_VIDEO = VIDEOS / "short_hamilton_clip.mp4"


@pytest.fixture(scope="module")
def faces() -> dict[str, list[str]]:
    """Real frames with a face, base64 PNG (Recall) and JPEG (Attendee), 640x360 as the services send them."""
    frames = load_video_frames(FACE_VIDEO, 640, 360, 2.0, max_seconds=2)

    def encode(ext: str) -> list[str]:
        return [base64.b64encode(cv2.imencode(ext, f)[1].tobytes()).decode() for f in frames]
    return {"png": encode(".png"), "jpeg": encode(".jpg")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def person(pid: int, name: str, host: bool = False) -> dict[str, Any]:
    return ingest_replay.recall_participant(pid, name, host)


def recall_frame(who: dict[str, Any], image: str, kind: str = "webcam") -> str:
    now = time.time()
    return ingest_replay.recall_frame(who, image, now, now - 10, kind)


def recall_event(event: str, who: dict[str, Any]) -> str:
    now = time.time()
    return ingest_replay.recall_event(f"participant_events.{event}", who, now, now - 10)


async def ingest_url(live: LiveClass, service: str) -> str:
    async with live.http.post(f"{live.server}/api/rooms/{live.room['room']}/ingest", json={"service": service},
                              headers={"Authorization": f"Bearer {live.token}"}) as r:
        assert r.status == 200, await r.text()
        return (await r.json())["url"]


async def counters(live: LiveClass) -> dict[str, int]:
    async with live.http.get(f"{live.server}/api/rooms/{live.room['room']}/ingest",
                             headers={"Authorization": f"Bearer {live.token}"}) as r:
        return (await r.json())["counters"]


async def counters_once(live: LiveClass, done: Any) -> dict[str, int]:
    """The counters once `done(counters)` holds (the server reads the socket on its own time), else the last."""
    count: dict[str, int] = {}
    for _ in range(100):
        count = await counters(live)
        if done(count):
            break
        await asyncio.sleep(0.1)
    return count


async def teacher(live: LiveClass) -> tuple[aiohttp.ClientWebSocketResponse, list[dict[str, Any]]]:
    ws = await live.http.ws_connect(live.server.replace("http", "ws", 1) + "/ws")
    await ws.send_json({"v": 1, "type": "hello", "role": "teacher", "room": live.room["room"], "token": live.token})
    seen: list[dict[str, Any]] = []

    async def read() -> None:
        async for msg in ws:
            seen.append(json.loads(msg.data))
    asyncio.ensure_future(read())
    return ws, seen


def samples(live: LiveClass, participant_id: str) -> int:
    return live.rows("SELECT count(*) FROM samples WHERE participant_id = ?", participant_id)[0][0]


async def class_with_bot(tmp_path, **overrides) -> LiveClass:
    live = await start_class(tmp_path, **overrides)
    await live.create_room()
    await live.invite_bot()
    return live


# ---- contracts ------------------------------------------------------------------------------------------------
async def test_a_teacher_gets_a_ws_url_per_service_and_can_revoke_it(tmp_path):
    live = await class_with_bot(tmp_path)
    try:
        room, auth = live.room["room"], {"Authorization": f"Bearer {live.token}"}
        async with live.http.post(f"{live.server}/api/rooms/{room}/ingest", json={"service": "recall"}, headers=auth) as r:
            body = await r.json()
        assert r.status == 200 and set(body) == {"url", "service"} and body["service"] == "recall"
        assert body["url"].startswith(live.server.replace("http://", "ws://") + "/ingest/recall/")
        async with live.http.post(f"{live.server}/api/rooms/{room}/ingest", json={"service": "recall"}) as r:
            assert r.status == 401
        async with live.http.post(f"{live.server}/api/rooms/{room}/ingest", json={"service": "zoom"}, headers=auth) as r:
            assert r.status == 400
        # A live connection is closed when its URL is revoked; connecting with it afterwards is refused.
        ws = await live.http.ws_connect(body["url"])
        async with live.http.delete(f"{live.server}/api/rooms/{room}/ingest?service=recall", headers=auth) as r:
            assert (await r.json()) == {"ok": True, "revoked": True}
        closing = await ws.receive()
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4401)
        ws = await live.http.ws_connect(body["url"])
        closing = await ws.receive()
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4401)
    finally:
        await stop_class(live)


async def test_urls_follow_the_public_url_scheme(tmp_path):
    live = await class_with_bot(tmp_path, server={"public_url": "https://class.example.org"})
    try:
        url = await ingest_url(live, "attendee")
        assert url.startswith("wss://class.example.org/ingest/attendee/")
    finally:
        await stop_class(live)


# ---- a meeting through each service ----------------------------------------------------------------------------
async def test_a_recall_meeting_seats_students_analyses_their_webcams_and_never_the_host(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        _, seen = await teacher(live)
        ws = await live.http.ws_connect(await ingest_url(live, "recall"))
        host, asha, ben = person(1, "Ms Host", host=True), person(100, "Asha"), person(101, "Ben")
        presenter, silent = person(900, "Presenter"), person(901, "No Camera")
        for who in (host, asha, ben, presenter, silent):
            await ws.send_str(recall_event("join", who))
        for image in faces["png"][:2]:
            for who in (host, asha, ben):
                await ws.send_str(recall_frame(who, image))
            await ws.send_str(recall_frame(presenter, image, "screenshare"))
        assert await eventually(lambda: samples(live, "rc-100") >= 1 and samples(live, "rc-101") >= 1, 20)
        joined = {m["peer_id"] for m in seen if m.get("type") == "participant" and m["event"] == "joined"}
        assert joined == {"rc-100", "rc-101", "rc-900", "rc-901"}        # the host is the teacher, not a student
        assert samples(live, "rc-1") == samples(live, "rc-900") == samples(live, "rc-901") == 0
        faces_found = live.rows("SELECT count(*) FROM samples WHERE participant_id = 'rc-100' AND face_found = 1")
        assert faces_found[0][0] >= 1
        count = await counters_once(live, lambda c: c.get("frames") == 8)
        assert count["host_frames"] == 2 and count["screenshare_frames"] == 2
        await ws.send_str(recall_event("leave", ben))
        assert await eventually(lambda: any(m.get("event") == "left" and m["peer_id"] == "rc-101" for m in seen))
        await ws.close()
        assert await eventually(lambda: not live.service.rooms[live.room["room"]].students)
    finally:
        await stop_class(live)


class ChatStandIn:
    """Attendee's chat API as a real aiohttp server on loopback, recording every request."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        app = web.Application()
        app.router.add_post("/api/v1/bots/{bot_id}/send_chat_message", self.post)
        self.runner = web.AppRunner(app)

    async def post(self, request: web.Request) -> web.Response:
        self.posts.append({"bot_id": request.match_info["bot_id"], "auth": request.headers.get("Authorization"),
                           **await request.json()})
        return web.json_response({"ok": True})

    async def start(self) -> str:
        from bot.simulate import free_port
        port = free_port()
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("platform, private_chat", [("zoom", True), ("google_meet", False)])
async def test_an_attendee_meeting_is_analysed_and_alerts_reach_only_the_host_in_private(tmp_path, faces, platform,
                                                                                           private_chat):
    chat = ChatStandIn()
    api = await chat.start()
    live = await class_with_bot(tmp_path, ingest={"attendee_api_url": api, "attendee_api_key": "k-123",
                                                  "attendee_platform": platform})
    try:
        ws = await live.http.ws_connect(await ingest_url(live, "attendee"))
        now = time.time()
        await ws.send_str(ingest_replay.attendee_event("bot_1", "participant_events.join", "h1", "Mr Host", now, True))
        nested = json.loads(ingest_replay.attendee_frame("bot_1", "u1", "Lee Chen", faces["jpeg"][0], now))
        participant = {"id": "u1", "name": "Lee Chen", "is_host": False}
        nested["data"] = {"participant": participant, "timestamp_ms": int(now * 1000), "type": "webcam",
                          "frame": faces["jpeg"][0]}
        await ws.send_str(json.dumps(nested))
        assert await eventually(lambda: samples(live, "at-u1") >= 1, 20)
        assert samples(live, "at-h1") == 0
        # The notice and the greeting: public (no recipient), with Attendee's token header.
        assert await eventually(lambda: len(chat.posts) >= 2)
        assert all(p["auth"] == "Token k-123" and p["bot_id"] == "bot_1" and "to_user_uuid" not in p for p in chat.posts)
        assert "opt out" in chat.posts[0]["text"] and "Lee Chen" in chat.posts[1]["text"]
        # An alert raised by the bot's room goes to the teacher's page and, on Zoom, privately to the host.
        classroom = live.service.rooms[live.room["room"]]
        classroom._raise(AlertRecord(alert_id="a-1", session_id=classroom.session_id, t=time.time(), level="student",
                                     kind="confusion", message="Lee Chen seems confused", value=0.8,
                                     participant_id="at-u1", name="Lee Chen"))
        if private_chat:
            assert await eventually(lambda: any("confused" in p["text"] for p in chat.posts))
        else:       # the server has handled the alert, and posted nothing: Meet has no private chat
            hub = live.runner.app[INGEST_KEY]
            assert await eventually(lambda: hub.counters[live.room["room"]]["alerts_not_posted"] == 1)
        dms = [p for p in chat.posts if "confused" in p["text"]]
        assert all(p.get("to_user_uuid") == "h1" for p in dms)            # never to everyone
        assert len(dms) == (1 if private_chat else 0)
        await ws.close()
    finally:
        await stop_class(live)
        await chat.runner.cleanup()


async def test_attendee_frames_without_a_name_keep_the_name_and_opt_out_of_the_participant_events(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        watcher, seen = await teacher(live)
        ws = await live.http.ws_connect(await ingest_url(live, "attendee"))
        now = time.time()
        await ws.send_str(ingest_replay.attendee_event("bot_1", "participant_events.join", "u1", "Lee Chen", now))
        await ws.send_str(ingest_replay.attendee_event("bot_1", "participant_events.join", "u2", "Ana [no-analysis]", now))
        for image in faces["jpeg"][:2]:
            for pid in ("u1", "u2"):     # Attendee's documented frames: participant_uuid, no name
                await ws.send_str(ingest_replay.attendee_documented_frame("bot_1", pid, image))
        assert await eventually(lambda: samples(live, "at-u1") >= 1, 20)
        await asyncio.sleep(1)
        named = [m.get("name") for m in seen if m.get("type") == "participant"]
        assert "Lee Chen" in named and "Guest" not in named          # the teacher's list is never renamed "Guest"
        assert samples(live, "at-u2") == 0                           # and the opt-out tag in the name held
        await ws.close()
        await watcher.close()
    finally:
        await stop_class(live)


async def test_a_service_that_reconnects_keeps_its_participants_seated(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        url = await ingest_url(live, "recall")
        old = await live.http.ws_connect(url)
        asha = person(100, "Asha")
        await old.send_str(recall_event("join", asha))
        students = live.runner.app[STATE_KEY].registry.get(live.room["room"]).students
        assert await eventually(lambda: "rc-100" in students)
        new = await live.http.ws_connect(url)              # before the old socket is found dead
        await new.send_str(recall_frame(asha, faces["png"][0]))
        assert await eventually(lambda: samples(live, "rc-100") >= 1, 20)
        await old.close()
        hub = live.runner.app[INGEST_KEY]
        assert await eventually(lambda: len(hub.connections) == 1)
        assert "rc-100" in students                         # taken over by the new connection, not unseated
        await new.close()
        assert await eventually(lambda: "rc-100" not in students)
    finally:
        await stop_class(live)


# ---- consent in someone else's meeting ---------------------------------------------------------------------
async def test_a_name_tag_or_the_teachers_switch_keeps_frames_from_the_bot(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        _, seen = await teacher(live)
        ws = await live.http.ws_connect(await ingest_url(live, "recall"))
        tagged, cara = person(200, "Bo [no-analysis]"), person(201, "Cara")
        await ws.send_str(recall_frame(tagged, faces["png"][0]))
        await ws.send_str(recall_frame(cara, faces["png"][0]))
        assert await eventually(lambda: samples(live, "rc-201") >= 1, 20)
        assert samples(live, "rc-200") == 0 and (await counters_once(live, lambda c: c.get("not_analysed")))["not_analysed"] == 1
        auth = {"Authorization": f"Bearer {live.token}"}
        url = f"{live.server}/api/rooms/{live.room['room']}/ingest/consent"
        async with live.http.post(url, json={"peer_id": "rc-201", "analysis": False}) as r:
            assert r.status == 401
        async with live.http.post(url, json={"peer_id": "rc-201", "analysis": False}, headers=auth) as r:
            assert r.status == 200
        assert await eventually(lambda: any(m.get("event") == "consent" and m["peer_id"] == "rc-201"
                                            and not m["analysis"] for m in seen))
        before = await counters(live)
        await ws.send_str(recall_frame(cara, faces["png"][1]))
        after = await counters_once(live, lambda c: c["frames"] > before["frames"])
        assert after["not_analysed"] == before["not_analysed"] + 1 and after["forwarded"] == before["forwarded"]
        # A rename that adds the tag turns analysis off too (and the teacher sees it).
        await ws.send_str(recall_event("update", person(200, "Bo")))
        await ws.send_str(recall_event("update", person(200, "Bo (no analysis)")))
        assert await eventually(lambda: [m["analysis"] for m in seen if m.get("peer_id") == "rc-200"
                                         and m.get("event") == "consent"] == [True, False])
        classroom = live.service.rooms[live.room["room"]]
        assert await eventually(lambda: classroom.students["rc-200"].name == "Bo (no analysis)")   # the bot follows
        await ws.close()
    finally:
        await stop_class(live)


# ---- bad input on the ingest socket -----------------------------------------------------------------------------
async def test_a_wrong_or_missing_secret_is_refused_and_nothing_is_stored(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        url = await ingest_url(live, "recall")
        base = url.rsplit("/", 1)[0]
        for wrong in (base + "/" + "x" * 43, url.replace("/recall/", "/attendee/"), base + "/short"):
            ws = await live.http.ws_connect(wrong)
            await ws.send_str(recall_frame(person(300, "Dee"), faces["png"][0]))
            closing = await ws.receive()
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4401)
        with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
            await live.http.ws_connect(base + "/")
        assert missing.value.status == 404
        assert live.rows("SELECT count(*) FROM participants WHERE participant_id LIKE 'rc-%'")[0][0] == 0
        assert live.rows("SELECT count(*) FROM samples")[0][0] == 0
    finally:
        await stop_class(live)


async def test_bad_messages_are_skipped_counted_and_the_socket_stays_open(tmp_path, faces):
    live = await class_with_bot(tmp_path)
    try:
        ws = await live.http.ws_connect(await ingest_url(live, "recall"))
        eve = person(400, "Eve")
        good = json.loads(recall_frame(eve, faces["png"][0]))

        def with_buffer(data: bytes) -> str:
            message = json.loads(json.dumps(good))
            message["data"]["data"]["buffer"] = b64(data)
            return json.dumps(message)

        png = base64.b64decode(faces["png"][0])
        huge = cv2.imencode(".png", np.zeros((1200, 2000, 3), np.uint8))[1].tobytes()
        await ws.send_str("{not json")
        await ws.send_str("[1, 2]")
        await ws.send_str(json.dumps({"event": "video_separate_png.data", "data": {"data": {"participant": "Eve"}}}))
        await ws.send_str(with_buffer(b"this is not an image"))
        await ws.send_str(with_buffer(png[: len(png) // 2]))                 # truncated PNG
        await ws.send_str(with_buffer(huge))                                 # 2000x1200: larger than allowed
        await ws.send_str(json.dumps({"event": "bot.status_change", "data": {}}))
        await ws.send_bytes(b"\x00\x01")
        for _ in range(12):                                                  # a flood: 12 frames at once
            await ws.send_str(json.dumps(good))
        count = await counters_once(live, lambda c: c.get("over_rate", 0) + c.get("forwarded", 0) == 12)
        assert count["bad_json"] == 1
        assert count["bad_message"] == 3                                     # a list, a wrong type, a binary message
        assert count["bad_image"] == 3 and count["unknown_event"] == 1
        assert count["over_rate"] >= 9 and count["forwarded"] <= 3
        assert await eventually(lambda: samples(live, "rc-400") >= 1, 20)    # the socket still works
        assert live.service.analyzer.errors == 0                             # nothing bad reached the bot
        # A message over ingest.max_message_bytes: aiohttp closes with 1009 (message too big); logged.
        await ws.send_str("x" * (live.settings.ingest.max_message_bytes + 1))
        closing = await ws.receive()
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1009)
        assert await eventually(lambda: not live.service.rooms[live.room["room"]].students)
    finally:
        await stop_class(live)


# ---- the replay command: its output is a contract -----------------------------------------------------------------
def test_the_replay_command_ends_with_one_json_line_of_the_agreed_keys(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bot.ingest_replay", "--service", "attendee", "--video", str(FACE_VIDEO),
                           "--students", "2", "--seconds", "4", "--json", "--db", str(tmp_path / "replay.sqlite")],
                          cwd=PROJECT, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) == {"students", "frames_sent", "samples", "analysed_share", "p95_frame_to_row_s", "errors"}
    assert summary["students"] == 2 and summary["errors"] == 0 and summary["frames_sent"] >= 12   # one of them leaves at 2/3
    assert 0 < summary["samples"] <= summary["frames_sent"]
