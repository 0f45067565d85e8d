"""Bring your own Janus room: the bot analyses the publishers of a VideoRoom that another app created
(here: this test, through Janus's own API), while alerts and storage stay on a classmood room.

A real Janus from the Debian package; publishers are real aiortc peers publishing real face video.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from bot.janus_room import JanusRoomError, JanusRoomFeeds, TextChannel, analysable
from bot.students import LoopingVideoTrack, load_video_frames
from signaling.janus import JanusClient
from signaling.janus_process import JanusConfig, JanusProcess, free_port
from tests.spine import PROJECT, VIDEOS, eventually, require_janus, start_class, stop_class

pytestmark = pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")
ROOM, PIN = 4321, "letmein"


@pytest.fixture
async def other_app():
    """A Janus with a PIN-protected VideoRoom 4321, as a Janus-based conferencing app would have it."""
    require_janus()
    config = JanusConfig(port=free_port(), api_secret="other-app-secret", admin_key="other-app-admin",
                         string_ids=False, extra_plugins=("textroom",))
    janus = JanusProcess(config)
    await janus.start()
    client = JanusClient(config.url, config.api_secret)
    app = {"config": config, "client": client, "pcs": [], "handles": {}}
    try:
        await client.connect()
        admin = await client.attach()
        await client.request(admin, {"request": "create", "room": ROOM, "pin": PIN, "admin_key": config.admin_key,
                                     "publishers": 10, "videocodec": "vp8"})
        # The app's chat: a TextRoom with the same id and PIN, as Janus's demos pair them.
        chat = await client.attach("janus.plugin.textroom")
        await client.request(chat, {"request": "create", "room": ROOM, "pin": PIN})
        yield app
    finally:
        for pc in app["pcs"]:
            await pc.close()
        await client.close()
        await janus.stop()
        janus.cleanup()


async def publish(app, display: str, frames) -> str:
    """A participant of the other app publishes its camera; returns its feed id."""
    client: JanusClient = app["client"]
    handle = await client.attach()
    pc = RTCPeerConnection()
    app["pcs"].append(pc)
    pc.addTransceiver(LoopingVideoTrack(frames, 5.0), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    data, jsep = await client.request(handle, {"request": "joinandconfigure", "ptype": "publisher", "room": ROOM,
                                               "pin": PIN, "display": display},
                                      jsep={"type": "offer", "sdp": pc.localDescription.sdp})
    await pc.setRemoteDescription(RTCSessionDescription(jsep["sdp"], "answer"))
    app["handles"][display] = handle
    return str(data["id"])


def test_who_is_analysed_in_someone_elses_room():
    assert analysable("Asha", teacher="Mr Khan")
    assert not analysable("mr khan ", teacher="Mr Khan")
    assert not analysable("Ben [no-analysis]", teacher="")
    assert not analysable("Ben (No Analysis)", teacher="") and not analysable("Cy #optout", teacher="")
    assert not analysable("classmood assistant (expression analysis)", teacher="")


async def test_bot_analyses_the_other_apps_students_but_not_the_teacher_or_opted_out(tmp_path, other_app):
    frames = load_video_frames(VIDEOS / "woman2.mp4", max_seconds=6)
    asha = await publish(other_app, "Asha", frames)
    teacher = await publish(other_app, "Mr Khan", frames)
    ben = await publish(other_app, "Ben [no-analysis]", frames)
    config = other_app["config"]
    # A student of the other app reads its chat.
    chat = await TextChannel.open(other_app["client"], ROOM, PIN)
    said: list[str] = []
    chat.channel.on("message", lambda raw: said.append(json.loads(raw).get("text") or ""))
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        feeds = JanusRoomFeeds(config.url, ROOM, pin=PIN, api_secret=config.api_secret, teacher="Mr Khan")
        await feeds.connect()
        live.service.join(live.server, live.room["room"], live.token, external=feeds)

        def samples(feed: str) -> int:
            return live.rows("SELECT COUNT(*) FROM samples WHERE participant_id = ?", feed)[0][0]
        assert await eventually(lambda: samples(asha) >= 4, 30)
        assert samples(teacher) == 0 and samples(ben) == 0
        names = dict(live.rows("SELECT participant_id, name FROM participants"))
        assert names[asha] == "Asha"
        assert live.rows("SELECT SUM(face_found) FROM samples WHERE participant_id = ?", asha)[0][0] >= 2
        # Only video was asked for, and only for Asha.
        assert set(feeds.subscriptions) == {asha}
        # The bot announced itself in the room's chat, with the way to opt out.
        assert any("expression-analysis assistant" in text and "[no-analysis]" in text for text in said)
        # A newcomer is followed from Janus's events; one who leaves is marked as left.
        cam = await publish(other_app, "Cam", frames)
        assert await eventually(lambda: samples(cam) >= 2, 30)
        assert any(text.startswith("Welcome Cam") and "[no-analysis]" in text for text in said), said
        await other_app["client"].request(other_app["handles"]["Cam"], {"request": "leave"})
        assert await eventually(lambda: live.rows("SELECT left_at FROM participants WHERE participant_id = ?",
                                                  cam)[0][0] is not None, 10)
        assert cam not in feeds.subscriptions
        # The bot's connection for Asha closes the way aioice closes it when a busy bot misses ICE consent checks:
        # Janus is told nothing and Asha keeps publishing, so the bot subscribes to her again by itself.
        bot = live.service.peers[live.room["room"]]
        lost_pc, lost_handle = bot.pcs[asha], feeds.subscriptions[asha]
        await lost_pc.getTransceivers()[0].receiver.transport.transport._connection.close()
        assert await eventually(lambda: bot.connections_lost == 1, 10)
        assert await eventually(lambda: bot.pcs.get(asha) not in (None, lost_pc), 20), "no new subscription"
        # The new connection exists before Janus has its answer; the subscription's handle is kept after that.
        assert await eventually(lambda: feeds.subscriptions.get(asha) not in (None, lost_handle), 20)
        stored = samples(asha)
        assert await eventually(lambda: samples(asha) >= stored + 3, 30), "analysis did not resume"
        assert samples(teacher) == 0 and samples(ben) == 0
    finally:
        await chat.close()
        await stop_class(live)


async def test_no_such_room_wrong_pin_and_wrong_secret_are_clear_errors(other_app, tmp_path):
    config = other_app["config"]
    with pytest.raises(JanusRoomError, match="has no VideoRoom 999"):
        await JanusRoomFeeds(config.url, 999, api_secret=config.api_secret).connect()
    with pytest.raises(JanusRoomError, match="PIN"):
        await JanusRoomFeeds(config.url, ROOM, pin="wrong", api_secret=config.api_secret).connect()
    with pytest.raises(JanusRoomError, match="api-secret"):
        await JanusRoomFeeds(config.url, ROOM, pin=PIN).connect()
    # The command line says the same in one line and exits 2, before joining anything.
    result = subprocess.run([sys.executable, "-m", "bot", "join", "--room", "r1", "--token", "t" * 16,
                             "--janus", config.url, "--janus-room", "999", "--janus-api-secret", config.api_secret,
                             "--storage-url", f"sqlite:///{tmp_path / 'db.sqlite'}"],
                            cwd=PROJECT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "has no VideoRoom 999" in errors[0], result.stderr
