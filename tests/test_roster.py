"""The bot's roster follows consent and presence exactly: an opt-out stops storage at once (even for
frames already in flight), and a welcome after a reconnect applies what happened while the bot was away."""
from __future__ import annotations

import asyncio
import time

import numpy as np
from sqlalchemy.exc import OperationalError

from bot.analyzer import FrameResult
from bot.mailbox import FrameMailbox
from bot.peer import BotPeer
from bot.room import ClassRoom
from core.settings import Settings


class RecordingRepository:
    """Stands in for storage.Repository: records what the room queues."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.samples: list = []

    def add_participant(self, session_id, participant_id, name):
        self.calls.append(("joined", participant_id, name))

    def participant_left(self, session_id, participant_id):
        self.calls.append(("left", participant_id))

    def set_opt_out(self, session_id, participant_id, opted_out):
        self.calls.append(("opt_out", participant_id, opted_out))

    def add_samples(self, rows):
        rows = list(rows)
        self.samples.extend(rows)
        return len(rows)

    def add_alert(self, alert):
        self.calls.append(("alert", alert.kind))


def a_face_result(room_id: str, peer_id: str) -> FrameResult:
    probs = np.full(7, 1 / 7, np.float32)
    return FrameResult(key=(room_id, peer_id), received_at=time.time(), received_mono=time.monotonic(),
                       face_found=True, probs=probs, box=np.array([10, 10, 60, 60], np.float32),
                       keypoints=np.array([[25, 30], [45, 30], [35, 40], [35, 50], [15, 32], [55, 32]], np.float32),
                       score=0.9, frame_shape=(240, 320))


def a_room(repo: RecordingRepository) -> ClassRoom:
    return ClassRoom(Settings(), "room1", "session1", repo, send=lambda message: None)


def test_a_welcome_after_a_reconnect_removes_departed_students_and_applies_opt_outs():
    repo = RecordingRepository()
    room = a_room(repo)
    assert room.sync_roster({"A": ("Asha", True), "B": ("Ben", True)}) == []
    assert set(room.students) == {"A", "B"}

    # While the bot was away, Ben left and Asha opted out; the next welcome lists only Asha, opted out.
    stop = room.sync_roster({"A": ("Asha", False), "C": ("Chen", True)})

    assert sorted(stop) == ["A", "B"]
    assert set(room.students) == {"A", "C"}
    assert not room.wants_video("A") and not room.wants_video("B") and room.wants_video("C")
    assert ("left", "B") in repo.calls and ("opt_out", "A", True) in repo.calls
    assert ("joined", "C", "Chen") in repo.calls
    room.on_result(a_face_result("room1", "A"))
    room.on_result(a_face_result("room1", "B"))
    assert repo.samples == []


def test_a_welcome_that_changes_nothing_writes_nothing():
    repo = RecordingRepository()
    room = a_room(repo)
    room.sync_roster({"A": ("Asha", True), "B": ("Ben", False)})
    before = list(repo.calls)
    assert room.sync_roster({"A": ("Asha", True), "B": ("Ben", False)}) == []
    assert repo.calls == before


class SlowClosingConnection:
    """A peer connection whose close() takes a while, as aiortc's does while it tears down transports."""

    def __init__(self) -> None:
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def close(self) -> None:
        self.closing.set()
        await self.release.wait()


async def test_results_arriving_while_an_opted_out_connection_closes_are_not_stored():
    repo = RecordingRepository()
    bot = BotPeer(Settings(), "http://127.0.0.1:1", "room1", "token", repo, FrameMailbox(), lambda *_: None)
    bot.room = a_room(repo)
    bot.room.add_student("A", "Asha", True)
    bot.room.on_result(a_face_result("room1", "A"))
    assert len(repo.samples) == 1
    connection = SlowClosingConnection()
    bot.pcs["A"] = connection  # type: ignore[assignment]

    opt_out = asyncio.ensure_future(bot._handle("participant", {"event": "consent", "peer_id": "A",
                                                                "analysis": False}))
    await asyncio.wait_for(connection.closing.wait(), 2)
    bot.room.on_result(a_face_result("room1", "A"))   # a frame that was already being analysed
    connection.release.set()
    await asyncio.wait_for(opt_out, 2)

    assert len(repo.samples) == 1
    assert ("opt_out", "A", True) in repo.calls and "A" not in bot.pcs


class FailingOnceRepository(RecordingRepository):
    """The database refuses the first session start (disk full), then recovers."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def resume_or_start_session(self, room_id, session_id):
        self.attempts += 1
        if self.attempts == 1:
            raise OperationalError("INSERT INTO sessions ...", None, Exception("database or disk is full"))
        return "session-after-retry"

    def end_session(self, session_id, at=None):
        self.calls.append(("ended", session_id))


async def test_a_database_failure_while_joining_is_retried_not_fatal(tmp_path):
    from tests.test_signaling import start_server
    runner, server = await start_server(tmp_path)
    repo = FailingOnceRepository()
    try:
        async with server.http.post(server.url + "/api/rooms") as r:
            room = await r.json()
        bot = BotPeer(Settings(), server.url, room["room"], room["teacher_token"], repo, FrameMailbox(),
                      lambda *_: None)
        task = asyncio.ensure_future(bot.run())
        await asyncio.wait_for(bot.joined.wait(), 10)
        assert repo.attempts == 2 and bot.room is not None and bot.room.session_id == "session-after-retry"
        assert not task.done()
        await bot.stop()
        await asyncio.wait_for(task, 5)
        assert ("ended", "session-after-retry") in repo.calls
    finally:
        await server.http.close()
        await runner.cleanup()
