"""Bad input and failures never stop the class: corrupt and zero-size frames, a failing inference
round, a stalled track, a bot restart mid-class (same session continues)."""
from __future__ import annotations

import asyncio
import threading
import time

import aioice.ice
import cv2
import numpy as np
import pytest

from bot.analyzer import Analyzer, PendingFrame, to_bgr
from bot.mailbox import FrameMailbox
from bot.service import BotService
from aiohttp import web

from signaling.server import REGISTRY_KEY, create_app
from tests.spine import VIDEOS, eventually, one_face_per_frame, start_class, stop_class


class BrokenFrame:
    def to_ndarray(self, format: str) -> np.ndarray:
        raise ValueError("corrupt frame data")


def test_mailbox_keeps_only_the_latest_frame_per_student_and_counts_drops():
    box: FrameMailbox[str, int] = FrameMailbox(per_key=1)
    for i in range(5):
        box.put("asha", i)
    box.put("ben", 10)
    taken = dict(box.take_all(64, timeout=0.1))
    assert taken == {"asha": 4, "ben": 10} and box.dropped == 4
    box.put("asha", 5)
    box.discard("asha")
    assert box.take_all(64, timeout=0.05) == []


@pytest.mark.parametrize("frame", [np.zeros((0, 0, 3), np.uint8), np.zeros((4, 4, 3), np.uint8),
                                   np.zeros((10, 10, 3), np.float64), BrokenFrame()])
def test_unusable_frames_are_rejected_with_a_reason(frame):
    with pytest.raises(ValueError):
        to_bgr(frame)


def test_huge_frames_are_downscaled_not_refused():
    assert max(to_bgr(np.zeros((4000, 7000, 3), np.uint8)).shape[:2]) == 1920


def test_huge_decoded_frames_are_scaled_while_converting_not_after():
    import av
    frame = av.VideoFrame.from_ndarray(np.full((3000, 8000, 3), 128, np.uint8), format="bgr24").reformat(format="yuv420p")
    full_size_copies = []
    original = av.VideoFrame.to_ndarray

    class Watched:                     # av.VideoFrame is a C type: wrap it to see what gets converted
        width, height = frame.width, frame.height

        def reformat(self, **kwargs):
            return frame.reformat(**kwargs)

        def to_ndarray(self, format: str):
            full_size_copies.append(format)
            return original(frame, format=format)

    image = to_bgr(Watched())
    assert image.shape == (720, 1920, 3) and int(image.mean()) in range(120, 137)
    assert not full_size_copies, "the full-size frame must never be converted to BGR"


def test_bad_frames_cost_only_their_own_sample():
    results = []
    done = threading.Event()
    box: FrameMailbox[tuple[str, str], PendingFrame] = FrameMailbox()

    def deliver(batch):
        results.extend(batch)
        done.set()
    analyzer = Analyzer(one_face_per_frame, box, deliver)
    now, mono = time.time(), time.monotonic()
    box.put(("r", "good"), PendingFrame(np.full((240, 320, 3), 128, np.uint8), now, mono))
    box.put(("r", "corrupt"), PendingFrame(BrokenFrame(), now, mono))
    box.put(("r", "empty"), PendingFrame(np.zeros((0, 0, 3), np.uint8), now, mono))
    analyzer.start()
    assert done.wait(5)
    analyzer.stop()
    by_key = {r.key[1]: r for r in results}
    assert by_key["good"].face_found and by_key["good"].probs.argmax() == 3
    assert by_key["corrupt"].error and not by_key["corrupt"].face_found
    assert by_key["empty"].error
    assert analyzer.errors == 2


def test_a_crashing_inference_round_is_survived():
    calls = {"n": 0}
    results = []

    def flaky(frames, keys):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("interpreter exploded")
        return one_face_per_frame(frames)
    box: FrameMailbox[tuple[str, str], PendingFrame] = FrameMailbox()
    analyzer = Analyzer(flaky, box, results.extend)
    analyzer.start()
    frame = np.full((240, 320, 3), 128, np.uint8)
    box.put(("r", "a"), PendingFrame(frame, time.time(), time.monotonic()))
    deadline = time.time() + 5
    while not results and time.time() < deadline:
        time.sleep(0.05)
    box.put(("r", "a"), PendingFrame(frame, time.time(), time.monotonic()))
    while len(results) < 2 and time.time() < deadline:
        time.sleep(0.05)
    analyzer.stop()
    assert results[0].error == "inference failed" and results[1].face_found


@pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")
async def test_a_restarted_bot_rejoins_and_continues_the_same_session(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        student = await live.add_student("Asha", VIDEOS / "woman2.mp4")
        await asyncio.wait_for(student.connected.wait(), 30)
        await asyncio.sleep(2.5)
        first = live.rows("SELECT session_id FROM sessions")
        assert len(first) == 1
        before = len(live.samples_of(student))

        # The bot process dies: its peer and inference stop without ending the session.
        room_id = live.room["room"]
        old_peer = live.service.peers[room_id]
        await live.service.stop()
        live.worker.cancel()
        assert old_peer.room is None or old_peer.room.session_id == first[0][0]

        # A new bot process (new service) is invited again and continues.
        live.service = BotService(live.settings, live.repository)
        await live.service.start()
        ready = asyncio.Event()
        live.worker = asyncio.ensure_future(live.service.serve_worker(live.server, live.settings.server.worker_key, ready))
        await asyncio.wait_for(ready.wait(), 10)
        await live.invite_bot()
        await asyncio.wait_for(student.connected.wait(), 30)
        await asyncio.sleep(3)
        sessions = live.rows("SELECT session_id FROM sessions")
        assert [s[0] for s in sessions] == [first[0][0]], "the restarted bot must continue the same session"
        assert len(live.samples_of(student)) >= before + 4
    finally:
        await stop_class(live)


@pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")
async def test_a_stalled_track_pauses_that_student_and_resumes_when_video_comes_back(tmp_path):
    live = await start_class(tmp_path, bot={"stall_seconds": 1.5})
    try:
        await live.create_room()
        await live.invite_bot()
        steady = await live.add_student("Steady", VIDEOS / "woman2.mp4")
        frozen = await live.add_student("Frozen", VIDEOS / "emotions.mp4")
        await asyncio.wait_for(asyncio.gather(steady.connected.wait(), frozen.connected.wait()), 30)
        await asyncio.sleep(1.5)
        # Freeze the student's camera: the track stays open but sends nothing until `thawed` is set.
        track = frozen.pc.getSenders()[0].track
        original, thawed = track.recv, asyncio.Event()

        async def frozen_until_thawed():
            await thawed.wait()
            return await original()
        track.recv = frozen_until_thawed
        await asyncio.sleep(4)
        peer = live.service.peers[live.room["room"]]
        assert not peer.room.students[frozen.peer_id].connected, "a stalled student is shown as not connected"
        t_check = time.time()
        await asyncio.sleep(2)
        assert [r for r in live.samples_of(steady) if r[0] > t_check], "the rest of the class goes on"
        assert not [r for r in live.samples_of(frozen) if r[0] > t_check]
        track.recv = original
        thawed.set()
        t_thaw = time.time()
        await asyncio.sleep(4)
        assert [r for r in live.samples_of(frozen) if r[0] > t_thaw], "analysis resumes with the video"
        assert peer.room.students[frozen.peer_id].connected
    finally:
        await stop_class(live)


async def test_a_media_connection_lost_in_class_is_counted_and_said_but_leaving_is_not(tmp_path, caplog):
    """The bot's stats say how many students it lost without them leaving (bot.simulate counts them as errors):
    an overloaded bot whose connections close shows up there, not as a quiet gap in the data."""
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        lost = await live.add_student("Lost", VIDEOS / "woman2.mp4")
        leaving = await live.add_student("Leaving", VIDEOS / "emotions.mp4")
        await asyncio.wait_for(asyncio.gather(lost.connected.wait(), leaving.connected.wait()), 30)
        await leaving.leave()
        await lost._close_pc()          # its camera connection ends; the student stays in class
        assert await eventually(lambda: live.service.stats()["connections_lost"] == 1, timeout=10)
        assert "still in class" in caplog.text and lost.peer_id in caplog.text
        await asyncio.sleep(4)          # the one who left is never counted
        assert live.service.stats()["connections_lost"] == 1
    finally:
        await stop_class(live)


async def test_a_student_whose_connection_the_bot_lost_connects_again_and_is_analysed(tmp_path, monkeypatch):
    """Direct path: the bot's ICE connection to a student closes without a goodbye (what aioice does when consent
    expires); the student's side notices and connects again, as join.js does, and analysis resumes."""
    monkeypatch.setattr(aioice.ice, "CONSENT_INTERVAL", 0.2)     # consent lost in ~2 s instead of ~30
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        asha = await live.add_student("Asha", VIDEOS / "woman2.mp4")
        await asyncio.wait_for(asha.connected.wait(), 30)
        assert await eventually(lambda: len(live.samples_of(asha)) >= 3, 20)
        bot = live.service.peers[live.room["room"]]
        lost_pc = bot.pcs[asha.peer_id]
        await lost_pc.getTransceivers()[0].receiver.transport.transport._connection.close()
        assert await eventually(lambda: asha.connections_lost == 1, 15), "the student did not notice"
        assert await eventually(lambda: bot.pcs.get(asha.peer_id) not in (None, lost_pc), 20), "no new connection"
        t_back = time.time()
        assert await eventually(lambda: [r for r in live.samples_of(asha) if r[0] > t_back], 20), "not analysed again"
    finally:
        await stop_class(live)


async def test_after_a_server_restart_the_invited_bot_rejoins_its_room_and_session(tmp_path):
    live = await start_class(tmp_path, server={"worker_key": "a-deployment-key-not-the-default"})
    try:
        await live.create_room()
        await live.invite_bot()
        peer = live.service.peers[live.room["room"]]
        session = peer.room.session_id
        # The signaling server restarts on the same address and store; the bot was invited by the old one.
        await live.runner.cleanup()
        live.runner = web.AppRunner(create_app(live.settings, store=live.repository))
        await live.runner.setup()
        await web.TCPSite(live.runner, "127.0.0.1", live.settings.server.port).start()
        registry = live.runner.app[REGISTRY_KEY]
        # The bot retries with backoff; once in, it tells the server its session.
        await eventually(lambda: (r := registry.get(live.room["room"])) is not None and r.bot is not None
                         and r.session_id is not None, 20)
        room = registry.get(live.room["room"])
        assert room is not None and room.bot is not None, "the invited bot must be let back in"
        assert live.service.peers[live.room["room"]] is peer and peer.room.session_id == session
        assert room.session_id == session
    finally:
        await stop_class(live)


async def test_a_bot_refused_for_good_frees_its_room_and_ends_its_session(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        room_id = live.room["room"]
        peer = live.service.peers[room_id]
        session = peer.room.session_id
        peer.token = "not-the-token-any-more"          # what a server that no longer knows the bot sees
        await peer._ws.close()                        # the connection drops; the rejoin is refused
        await eventually(lambda: room_id not in live.service.peers)
        assert room_id not in live.service.peers and room_id not in live.service.rooms
        assert peer.room is None, "the room's state (and its tick loop) must be released"
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session)[0][0] is not None
    finally:
        await stop_class(live)


async def test_a_bot_left_alone_is_dismissed_and_its_session_ends(tmp_path):
    live = await start_class(tmp_path, server={"room_idle_seconds": 1.0})
    try:
        await live.create_room()
        await live.invite_bot()
        room_id = live.room["room"]
        session = live.service.peers[room_id].room.session_id
        student = await live.add_student("Asha", None)
        await asyncio.sleep(2.0)                               # with a student in the room the bot stays
        assert room_id in live.service.peers
        await student.leave()
        live.students.remove(student)
        await eventually(lambda: room_id not in live.service.peers, 6)
        assert room_id not in live.service.peers and room_id not in live.service.rooms
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session)[0][0] is not None
    finally:
        await stop_class(live)


def test_the_inference_process_is_restarted_when_it_dies_and_only_its_round_is_lost():
    import os
    import signal

    from bot.inference_process import InferenceProcessError, ProcessAnalyse
    from core.settings import Settings
    settings = Settings().replace(model={"model": "scripted:happy", "detector": "short"})
    analyse = ProcessAnalyse(settings)
    try:
        capture = cv2.VideoCapture(str(VIDEOS / "woman2.mp4"))
        ok, face = capture.read()
        face = cv2.resize(face, (320, 240)) if ok else None     # without ../shared: the faceless frame only
        frames = [np.full((240, 320, 3), 90, np.uint8)] + ([face] if face is not None else [])
        first = analyse(frames, [("r", "a"), ("r", "b")][:len(frames)])
        assert first.frame_ids.tolist() == ([1] if face is not None else [])
        os.kill(analyse._process.pid, signal.SIGKILL)
        with pytest.raises(InferenceProcessError, match="restarted"):
            analyse(frames, [("r", "a"), ("r", "b")][:len(frames)])
        assert analyse.restarts == 1
        again = analyse(frames, [("r", "a"), ("r", "b")][:len(frames)])    # the new child answers
        assert again.frame_ids.tolist() == first.frame_ids.tolist()
    finally:
        analyse.close()


def test_video_frames_cross_to_the_inference_process_as_yuv_planes_and_are_analysed_alike():
    import av

    from bot.analyzer import I420
    from bot.inference_process import ProcessAnalyse
    from core.settings import Settings
    capture = cv2.VideoCapture(str(VIDEOS / "woman2.mp4"))
    ok, face = capture.read()
    if not ok:
        pytest.skip(f"needs ../shared/media/videos/woman2.mp4 (a real face): {VIDEOS} is absent")
    bgr = cv2.resize(face, (320, 240))
    decoded = av.VideoFrame.from_ndarray(bgr, format="bgr24").reformat(format="yuv420p")   # what VP8 decoding gives
    handed_over = ProcessAnalyse.prepare(decoded)
    assert isinstance(handed_over, I420) and handed_over.shape == (240, 320)
    assert handed_over.planes.nbytes == 240 * 320 * 3 // 2            # half of BGR's bytes through the pipe
    # OpenCV's conversion matches PyAV's (swscale) within rounding.
    assert np.abs(to_bgr(decoded).astype(int) - decoded.to_ndarray(format="bgr24")).mean() < 2
    analyse = ProcessAnalyse(Settings().replace(model={"model": "ferplus", "detector": "short"}))
    try:
        from_planes = analyse([handed_over], [("r", "a")])
        from_bgr = analyse([to_bgr(decoded)], [("r", "b")])
    finally:
        analyse.close()
    assert len(from_planes) == len(from_bgr) == 1
    assert np.abs(from_planes.boxes - from_bgr.boxes).max() < 1.0
    assert np.abs(from_planes.probs - from_bgr.probs).max() < 0.02


def test_a_model_the_inference_process_cannot_load_fails_the_start_with_its_reason(tmp_path):
    from bot.inference_process import ProcessAnalyse
    from core.settings import Settings
    settings = Settings().replace(model={"model": str(tmp_path / "missing.tflite")})
    with pytest.raises(ValueError, match="missing.tflite"):
        ProcessAnalyse(settings)
