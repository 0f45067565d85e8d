"""A class as a meeting on a real Janus (Debian's package, started by the test): students publish to the
SFU, the bot subscribes to the video of the consenting ones, the teacher may watch everyone.

No mock of Janus: signaling/janus_process.py starts /usr/bin/janus with a loopback configuration.
"""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from bot.media_server import MediaServerError, open_media_server
from bot.peer import ws_url
from bot.students import LoopingVideoTrack, load_video_frames
from core.settings import Settings
from signaling.janus_process import free_port
from tests.spine import VIDEOS, eventually, require_janus, start_class, stop_class

pytestmark = pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")
CLIP = VIDEOS / "short_hamilton_clip.mp4"


class Member:
    """A raw meeting client (teacher or student page) on the signaling socket, recording every message."""

    def __init__(self, live, role: str, name: str = "") -> None:
        self.live, self.role, self.name = live, role, name
        self.messages: list[dict] = []
        self.pcs: list[RTCPeerConnection] = []
        self.tracks: list[str] = []

    async def join(self) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(ws_url(self.live.server))
        hello = {"v": 1, "type": "hello", "role": self.role, "room": self.live.room["room"]}
        hello.update({"key": self.live.key, "name": self.name, "analysis": True} if self.role == "student"
                     else {"token": self.live.token})
        await self.ws.send_json(hello)
        self.reader = asyncio.ensure_future(self._read())
        assert await eventually(lambda: self.of("welcome"), 10)

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            self.messages.append(data)
            if data["type"] == "offer":
                await self._answer(data["feed"], data["sdp"])
            elif data["type"] == "published":
                await self.pcs[0].setRemoteDescription(RTCSessionDescription(data["sdp"], "answer"))

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m.get("type") == kind]

    def feeds(self) -> list[str]:
        return [f["peer_id"] for f in self.of("feeds")[-1]["feeds"]] if self.of("feeds") else []

    async def send(self, **message) -> None:
        await self.ws.send_json({"v": 1, **message})

    async def publish(self, frames) -> None:
        pc = RTCPeerConnection()
        self.pcs.insert(0, pc)
        pc.addTransceiver(LoopingVideoTrack(frames, 5.0), direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        await self.send(type="publish", sdp=pc.localDescription.sdp)

    async def _answer(self, feed: str, sdp: str) -> None:
        pc = RTCPeerConnection()
        self.pcs.append(pc)
        pc.on("track", lambda track: self.tracks.append(f"{feed}:{track.kind}"))
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        await self.send(type="answer", feed=feed, sdp=pc.localDescription.sdp)

    async def close(self) -> None:
        for pc in self.pcs:
            await pc.close()
        self.reader.cancel()
        await self.ws.close()
        await self.http.close()


def sample_count(live, student) -> int:
    return live.rows("SELECT COUNT(*) FROM samples WHERE participant_id = ?", student.peer_id)[0][0]


async def test_students_publish_to_janus_and_the_bot_analyses_only_consenting_video(tmp_path):
    live = await start_class(tmp_path, janus=True)
    members: list[Member] = []
    try:
        await live.create_room()
        await live.invite_bot()
        teacher = Member(live, "teacher")
        await teacher.join()
        members.append(teacher)
        assert teacher.of("welcome")[0]["media"]["mode"] == "sfu"
        asha = await live.add_student("Asha", CLIP)
        ben = await live.add_student("Ben", CLIP)
        # Both publish to the SFU (not to the bot) and the bot receives their video through it.
        assert await eventually(lambda: sample_count(live, asha) >= 4 and sample_count(live, ben) >= 4, 40)
        assert all(s.publishes == 1 for s in (asha, ben))
        assert not any(m.get("type") == "signal" for s in (asha, ben) for m in s.received)
        faces = live.rows("SELECT SUM(face_found) FROM samples WHERE participant_id = ?", asha.peer_id)[0][0]
        assert faces >= 2, "the bot must see the face in the video it receives from Janus"
        # The teacher may watch both students; a student sees no other student (and no alerts/state).
        assert await eventually(lambda: set(teacher.feeds()) == {asha.peer_id, ben.peer_id}, 10)
        await teacher.send(type="subscribe", feed=asha.peer_id)
        assert await eventually(lambda: f"{asha.peer_id}:video" in teacher.tracks, 15)
        assert all(f["role"] == "teacher" for m in asha.received if m.get("type") == "feeds" for f in m["feeds"])
        assert not {"state", "alert", "participant"} & asha.message_types()

        # Ben opts out: he stays in the meeting (still publishing, still a feed for the teacher) but the
        # bot's subscription to him ends inside Janus and no new sample of his is stored.
        await ben.set_analysis(False)
        await asyncio.sleep(2.0)
        before = sample_count(live, ben)
        await asyncio.sleep(4.0)
        assert sample_count(live, ben) == before
        assert ben.peer_id in teacher.feeds()
        assert not live.media.sfu.subscribed(live.room["room"], "bot", ben.peer_id)
        assert live.media.sfu.publishing(live.room["room"], ben.peer_id)
        asha_before = sample_count(live, asha)
        assert await eventually(lambda: sample_count(live, asha) >= asha_before + 4, 15), "Asha is still analysed"
        # Opting in again brings the bot back.
        await ben.set_analysis(True)
        assert await eventually(lambda: sample_count(live, ben) >= before + 3, 20)
    finally:
        for member in members:
            await member.close()
        await stop_class(live)


async def test_members_cannot_watch_what_they_may_not_see_and_bad_sdp_is_a_clear_error(tmp_path):
    live = await start_class(tmp_path, janus=True)
    members: list[Member] = []
    try:
        await live.create_room()
        teacher, eve = Member(live, "teacher"), Member(live, "student", "Eve")
        for member in (teacher, eve):
            await member.join()
            members.append(member)
        asha = await live.add_student("Asha", CLIP)
        assert await eventually(lambda: asha.peer_id in teacher.feeds(), 15)
        # Eve may not subscribe to another student (students_see_students is off) nor to herself.
        await eve.send(type="subscribe", feed=asha.peer_id)
        await eve.send(type="subscribe", feed="nobody")
        assert await eventually(lambda: len([e for e in eve.of("error") if e["code"] == "bad_target"]) == 2, 5)
        assert not eve.of("offer")
        # A student's direct offer to the bot is refused in a meeting; garbage SDP is a media_failed error.
        await eve.send(type="signal", to="bot", data={"type": "offer", "sdp": "v=0"})
        await eve.send(type="publish", sdp="this is not an SDP")
        assert await eventually(lambda: any(e["code"] == "media_failed" for e in eve.of("error")), 10)
        assert any(e["code"] == "bad_target" and "publish" in e["message"] for e in eve.of("error"))
        # The teacher's camera is a feed for the students.
        await teacher.publish(load_video_frames(CLIP, max_seconds=3))
        assert await eventually(lambda: teacher.of("published"), 15)
        assert await eventually(lambda: eve.feeds() == [teacher.of("welcome")[0]["peer_id"]], 10)
        await eve.send(type="subscribe", feed=eve.feeds()[0])
        assert await eventually(lambda: any(t.endswith(":video") for t in eve.tracks), 15)
    finally:
        for member in members:
            await member.close()
        await stop_class(live)


async def test_a_watcher_asks_for_a_feeds_simulcast_layer_and_a_bad_one_is_a_clear_error(tmp_path):
    # Which layer arrives needs a simulcast publisher (a browser: test_browser_meeting.py); here, what the server
    # accepts and refuses, against the real Janus.
    live = await start_class(tmp_path, janus=True)
    members: list[Member] = []
    try:
        await live.create_room()
        teacher = Member(live, "teacher")
        await teacher.join()
        members.append(teacher)
        assert teacher.of("welcome")[0]["media"]["gallery_low_from"] == Settings().server.meeting_gallery_low_from
        asha = await live.add_student("Asha", CLIP)
        assert await eventually(lambda: asha.peer_id in teacher.feeds(), 15)
        await teacher.send(type="subscribe", feed=asha.peer_id, quality="best")     # not a layer
        assert await eventually(lambda: teacher.of("error"), 5)
        assert [(e["code"], "quality" in e["message"]) for e in teacher.of("error")] == [("bad_field", True)]
        # Low, then high (a tile that grew): the second subscription replaces the first, and the video plays.
        for offers, quality in enumerate(("low", "high"), start=1):
            await teacher.send(type="subscribe", feed=asha.peer_id, quality=quality)
            assert await eventually(lambda n=offers: len(teacher.of("offer")) == n, 15)
        assert await eventually(lambda: teacher.tracks.count(f"{asha.peer_id}:video") == 2, 15)
        assert len(teacher.of("error")) == 1
        assert live.media.sfu.subscribed(live.room["room"], teacher.of("welcome")[0]["peer_id"], asha.peer_id)
    finally:
        for member in members:
            await member.close()
        await stop_class(live)


async def test_janus_killed_during_class_comes_back_and_the_session_continues(tmp_path):
    live = await start_class(tmp_path, janus=True, server={"room_idle_seconds": 600.0})
    try:
        await live.create_room()
        await live.invite_bot()
        asha = await live.add_student("Asha", CLIP)
        assert await eventually(lambda: sample_count(live, asha) >= 3, 40)
        session = live.rows("SELECT session_id FROM sessions")[0][0]
        stored = sample_count(live, asha)
        live.media.process.kill()            # SIGKILL: no goodbye to anyone
        # The embedded Janus is restarted, the server reconnects and asks the class to publish again.
        assert await eventually(lambda: asha.publishes >= 2, 30), "the student was not asked to publish again"
        assert await eventually(lambda: sample_count(live, asha) >= stored + 4, 40), "analysis did not resume"
        assert live.rows("SELECT session_id FROM sessions") == [(session,)], "the same session continues"
        assert sample_count(live, asha) >= stored, "rows stored before the crash are kept"
    finally:
        await stop_class(live)


async def test_a_bot_that_loses_a_students_video_gets_it_offered_again_and_analysis_resumes(tmp_path):
    """A bot short of CPU misses ICE consent checks and its subscription closes (100 students on 2 cores lost
    most of theirs): the student stays in class, so the bot asks for the feed again and the server offers it."""
    live = await start_class(tmp_path, janus=True)
    try:
        await live.create_room()
        await live.invite_bot()
        asha = await live.add_student("Asha", CLIP)
        ben = await live.add_student("Ben", CLIP)
        assert await eventually(lambda: sample_count(live, asha) >= 3 and sample_count(live, ben) >= 3, 40)
        bot = live.service.peers[live.room["room"]]
        lost_pc = bot.pcs[asha.peer_id]
        # What aioice does when ICE consent expires: its connection closes, with no goodbye to Janus (which
        # therefore reports no hang-up: only the bot knows).
        ice = lost_pc.getTransceivers()[0].receiver.transport.transport
        await ice._connection.close()
        assert await eventually(lambda: bot.connections_lost == 1, 10)
        assert await eventually(lambda: bot.pcs.get(asha.peer_id) not in (None, lost_pc), 20), "no new subscription"
        stored = sample_count(live, asha)
        assert await eventually(lambda: sample_count(live, asha) >= stored + 3, 30), "analysis did not resume"
        assert live.media.sfu.subscribed(live.room["room"], "bot", asha.peer_id)
        assert asha.publishes == 1 and ben.publishes == 1, "nobody had to publish again"
        # A feed the bot may not have (Ben opts out) is not offered again when the bot asks for it.
        await ben.set_analysis(False)
        assert await eventually(lambda: not live.media.sfu.subscribed(live.room["room"], "bot", ben.peer_id), 10)
        await bot.send({"type": "subscribe", "feed": ben.peer_id})
        await asyncio.sleep(2)
        assert not live.media.sfu.subscribed(live.room["room"], "bot", ben.peer_id)
    finally:
        await stop_class(live)


async def test_janus_down_or_wrong_secret_is_a_clear_error_naming_the_url():
    require_janus()
    port = free_port()
    down = Settings().replace(janus={"mode": "external", "url": f"ws://127.0.0.1:{port}/", "connect_timeout_seconds": 2})
    with pytest.raises(MediaServerError, match=f"127.0.0.1:{port}"):
        await open_media_server(down)
    embedded = await open_media_server(Settings())
    try:
        wrong = Settings().replace(janus={"mode": "external", "url": embedded.url, "api_secret": "not-the-secret"})
        with pytest.raises(MediaServerError, match="api-secret"):
            await open_media_server(wrong)
        no_key = Settings().replace(janus={"mode": "external", "url": embedded.url,
                                           "api_secret": embedded.sfu.api_secret, "admin_key": "wrong"})
        with pytest.raises(MediaServerError, match="admin-key"):
            await open_media_server(no_key)
    finally:
        await embedded.close()
