"""Ending a class (the teacher's End class button, or everyone leaving) and the teacher's alert feed after a
reload: the real server, the real bot service and a real SQLite file (tests/spine.py)."""
from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from core.records import AlertRecord
from signaling.server import REGISTRY_KEY
from tests.spine import eventually, start_class, stop_class


async def teacher_socket(live, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(live.server.replace("http", "ws") + "/ws")
    await ws.send_json({"v": 1, "type": "hello", "role": "teacher", "room": live.room["room"], "token": live.token})
    welcome = await ws.receive_json(timeout=5)
    assert welcome["type"] == "welcome"
    return ws


async def messages_until_closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[list[dict], int | None]:
    """Every message until the server closes the socket, and the code in its close frame."""
    out = []
    while True:
        msg = await ws.receive()
        if msg.type == aiohttp.WSMsgType.TEXT:
            out.append(msg.json())
        elif msg.type == aiohttp.WSMsgType.CLOSE:
            return out, msg.data
        else:
            return out, ws.close_code


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("classmood")]


async def test_end_class_ends_the_session_at_once_tells_everyone_and_lets_the_teacher_delete_it(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        room_id, auth = live.room["room"], {"Authorization": f"Bearer {live.token}"}
        await live.invite_bot()
        session = live.service.peers[room_id].room.session_id
        student = await live.add_student("Asha", None)
        teacher = await teacher_socket(live, live.http)

        # Only the room's teacher may end its class.
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end") as r:
            assert r.status == 401
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end",
                                  headers={"Authorization": "Bearer not-the-teacher-token"}) as r:
            assert r.status == 401
        assert room_id in live.service.peers

        before = time.time()
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end", headers=auth) as r:
            assert r.status == 200, await r.text()
            ended = await r.json()
        assert ended["session_id"] == session and ended["ended"] == [session]
        assert before <= ended["ended_at"] <= time.time()

        # Stored as ended, at the moment the teacher pressed the button, before the answer came back.
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session)[0][0] == ended["ended_at"]
        async with live.http.get(f"{live.server}/api/sessions/{session}/review", headers=auth) as r:
            assert (await r.json())["session"]["ended_at"] == ended["ended_at"]

        # The teacher and the student are told, then disconnected with 4411; the bot has left for good.
        teacher_saw, close_code = await asyncio.wait_for(messages_until_closed(teacher), 5)
        notices = [m for m in teacher_saw if m["type"] == "class_ended"]
        assert len(notices) == 1 and notices[0]["session_id"] == session and notices[0]["ended_at"] == ended["ended_at"]
        assert close_code == 4411
        assert await eventually(lambda: "class_ended" in student.message_types(), 5)
        assert await eventually(lambda: room_id not in live.service.peers, 5)
        await asyncio.sleep(1.0)                                   # a bot that reconnected would be back by now
        assert room_id not in live.service.peers
        assert not errors_logged(caplog), errors_logged(caplog)

        # The session is over: the teacher may delete it, and the next invite records a new session.
        async with live.http.delete(f"{live.server}/api/sessions/{session}", headers=auth) as r:
            assert r.status == 200, await r.text()
        await live.invite_bot()
        assert live.service.peers[room_id].room.session_id != session
    finally:
        await stop_class(live)


async def test_a_bot_that_was_away_when_the_class_ended_does_not_carry_on_recording(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        room_id, auth = live.room["room"], {"Authorization": f"Bearer {live.token}"}
        await live.invite_bot()
        peer = live.service.peers[room_id]
        session = peer.room.session_id
        registry = live.runner.app[REGISTRY_KEY]
        await peer._ws.close()                               # the bot's connection drops; it will reconnect
        assert await eventually(lambda: registry.get(room_id).bot is None, 5)
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end", headers=auth) as r:
            ended = await r.json()
        assert ended["ended"] == [session]
        # Back, the bot learns that its session is over, and leaves for good; the end time stays the teacher's.
        assert await eventually(lambda: room_id not in live.service.peers, 8)
        await asyncio.sleep(1.0)
        assert room_id not in live.service.peers and registry.get(room_id).bot is None
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session)[0][0] == ended["ended_at"]
    finally:
        await stop_class(live)


async def test_ending_a_class_with_no_assistant_closes_its_open_session(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        room_id, auth = live.room["room"], {"Authorization": f"Bearer {live.token}"}
        # A session left open by a bot that vanished (a crash): the teacher's End class still ends it.
        orphan = live.repository.start_session(room_id)
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end", headers=auth) as r:
            assert r.status == 200
            ended = await r.json()
        assert ended["session_id"] is None and ended["ended"] == [orphan]
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", orphan)[0][0] == ended["ended_at"]
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end", headers=auth) as r:
            assert (await r.json())["ended"] == [], "an ended session keeps its end time"
    finally:
        await stop_class(live)


async def test_a_bot_left_alone_ends_its_session_when_the_last_person_left_and_logs_no_error(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    live = await start_class(tmp_path, server={"room_idle_seconds": 2.0})
    try:
        await live.create_room()
        await live.invite_bot()
        room_id = live.room["room"]
        session = live.service.peers[room_id].room.session_id
        student = await live.add_student("Asha", None)
        await student.leave()
        live.students.remove(student)
        left_at = time.time()
        await eventually(lambda: room_id not in live.service.peers, 8)
        assert room_id not in live.service.peers
        ended_at = live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session)[0][0]
        # The end is when the room emptied, not room_idle_seconds (2 s here, 10 min by default) later.
        assert left_at - 1.0 <= ended_at <= left_at + 1.0, (ended_at - left_at)
        assert not errors_logged(caplog), errors_logged(caplog)
    finally:
        await stop_class(live)


async def test_the_alert_feed_reloads_with_acknowledgements_for_the_rooms_teacher_only(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        room_id, auth = live.room["room"], {"Authorization": f"Bearer {live.token}"}
        session = live.repository.start_session(room_id)
        for i, name in enumerate(("Asha", "Ben")):
            live.repository.add_alert(AlertRecord(alert_id=f"a{i}", session_id=session, t=1000.0 + i,
                                                  level="student", kind="confusion", participant_id=f"p{i}",
                                                  name=name, message=f"{name} seems confused for 20 s", value=0.7))
        live.repository.acknowledge_alert("a0")
        async with live.http.get(f"{live.server}/api/sessions/{session}/alerts", headers=auth) as r:
            assert r.status == 200
            feed = (await r.json())["alerts"]
        assert [(a["alert_id"], a["name"], a["acknowledged"]) for a in feed] == [("a0", "Asha", True),
                                                                                ("a1", "Ben", False)]
        assert feed[0]["acknowledged_at"] is not None and feed[1]["acknowledged_at"] is None
        assert feed[0]["message"] == "Asha seems confused for 20 s"

        other = await (await live.http.post(live.server + "/api/rooms", json={})).json()
        async with live.http.get(f"{live.server}/api/sessions/{session}/alerts",
                                 headers={"Authorization": f"Bearer {other['teacher_token']}"}) as r:
            assert r.status == 404, "another room's teacher must not read these alerts (nor learn they exist)"
        async with live.http.get(f"{live.server}/api/sessions/{session}/alerts") as r:
            assert r.status == 401
        async with live.http.get(f"{live.server}/api/sessions/nosuchsession/alerts", headers=auth) as r:
            assert r.status == 404
    finally:
        await stop_class(live)
