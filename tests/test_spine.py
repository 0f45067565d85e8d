"""The spine end to end: a real server, the bot invited through the worker, real aiortc students
streaming real face videos, rows in a real SQLite file."""
from __future__ import annotations

import asyncio
import time

import pytest

from tests.spine import VIDEOS, start_class, stop_class

pytestmark = pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")

TEACHER_ONLY = {"state", "alert", "participant", "control"}


async def test_bot_analyses_each_student_separately_and_respects_opt_out(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        talking = await live.add_student("Asha", VIDEOS / "woman2.mp4")
        posing = await live.add_student("Ben", VIDEOS / "emotions.mp4")
        blank = await live.add_student("Cam off", None)
        opted_out = await live.add_student("Dee", VIDEOS / "woman2.mp4", analysis=False)
        await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in (talking, posing, blank))), 30)
        await asyncio.sleep(6)

        asha, ben, cam_off = live.samples_of(talking), live.samples_of(posing), live.samples_of(blank)
        # ~2 Hz for 6 s each: a face on (almost) every sample of the face videos, none on the blank track.
        assert len(asha) >= 8 and len(ben) >= 8 and len(cam_off) >= 8
        assert sum(r[1] for r in asha) >= 0.8 * len(asha)
        assert sum(r[1] for r in ben) >= 0.8 * len(ben)
        assert not any(r[1] for r in cam_off)
        assert all(r[2] is None for r in cam_off)
        # The bot declined abs-send-time in its answers: no per-packet bandwidth estimation or REMB.
        assert all("abs-send-time" in s.pc.localDescription.sdp for s in (talking, posing))
        assert not any("abs-send-time" in s.pc.remoteDescription.sdp for s in (talking, posing, blank))
        # The student who opted out sends no video and has no samples at all.
        assert opted_out.pc is None
        assert live.samples_of(opted_out) == []
        names = dict(live.rows("SELECT participant_id, name FROM participants"))
        assert names[talking.peer_id] == "Asha" and names[opted_out.peer_id] == "Dee"
        # Students never receive the teacher's live data.
        for student in (talking, posing, blank, opted_out):
            assert not (student.message_types() & TEACHER_ONLY)
    finally:
        await stop_class(live)


async def test_opt_out_and_leaving_stop_analysis_at_once(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        stays = await live.add_student("Stays", VIDEOS / "woman2.mp4")
        opts_out = await live.add_student("Opts out", VIDEOS / "emotions.mp4")
        leaves = await live.add_student("Leaves", VIDEOS / "woman2.mp4")
        await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in live.students)), 30)
        await asyncio.sleep(3)
        t_switch = time.time()
        await opts_out.set_analysis(False)
        await leaves.leave()
        live.students.remove(leaves)
        await asyncio.sleep(4)

        # Allow one in-flight frame (received before the switch) at most.
        after_opt_out = [r for r in live.samples_of(opts_out) if r[0] > t_switch + 0.6]
        after_leave = [r for r in live.samples_of(leaves) if r[0] > t_switch + 0.6]
        assert after_opt_out == [] and after_leave == []
        assert len([r for r in live.samples_of(stays) if r[0] > t_switch + 0.6]) >= 5
        left = live.rows("SELECT left_at FROM participants WHERE participant_id = ?", leaves.peer_id)
        assert left and left[0][0] is not None
    finally:
        await stop_class(live)


async def test_a_vanishing_peer_and_garbage_signaling_do_not_disturb_the_class(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        good = await live.add_student("Good", VIDEOS / "woman2.mp4")
        await asyncio.wait_for(good.connected.wait(), 30)
        # A client that sends an offer of garbage SDP and one that vanishes mid-handshake.
        broken = await live.add_student("Broken", VIDEOS / "emotions.mp4", analysis=False)
        await broken.send({"type": "consent", "analysis": True})
        await broken.send({"type": "signal", "to": live.service.peers[live.room["room"]].peer_id,
                           "data": {"type": "offer", "sdp": "v=0\r\nthis is not sdp\r\n"}})
        vanishing = await live.add_student("Vanishing", VIDEOS / "emotions.mp4")
        await vanishing.leave()
        live.students.remove(vanishing)
        before = len(live.samples_of(good))
        await asyncio.sleep(3)
        assert len(live.samples_of(good)) >= before + 4
        assert not live.service.peers[live.room["room"]].pcs.get(vanishing.peer_id)
    finally:
        await stop_class(live)
