"""A class as a real meeting on the Janus SFU, in real browsers: Debian chromium driven by Playwright, each
participant (teacher included) with a fake camera fed from a real video and Chromium's fake microphone.

The teacher and two students see and hear each other (video elements playing real, non-black frames; audio
packets with energy arriving); the teacher's page shows both students' tiles beside the alert feed, each student's
page shows the teacher's tile; the bot, one more subscriber, analyses both students; a student who switches
analysis off stays in class (the teacher still sees her tile playing) but gives no new samples; students never
receive state or alerts; Leave closes everything and her tile disappears from the teacher's grid; End class
stops the other student's media and tells him.
Screenshots: artifacts/teacher-meeting.png, artifacts/student-meeting.png.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.spine import PROJECT, VIDEOS, eventually, start_class, stop_class
from tests.y4m import video_to_y4m

CHROMIUM = os.environ.get("CLASSMOOD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT / "artifacts"
pytestmark = [
    pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (scripts/test.sh installs it)"),
    pytest.mark.skipif(shutil.which("janus") is None and not Path("/usr/bin/janus").exists(),
                       reason="janus not installed (apt-get install janus)"),
]
# Fake camera and microphone for every page; remote audio may play without a click (the pages also cope without).
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]
TIMEOUT = 90_000   # ms: two cores for three browsers, Janus and the bot


async def launch(playwright, y4m: Path):
    args = BROWSER_ARGS + [f"--use-file-for-fake-video-capture={y4m}"]
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


# Every camera/microphone track and every RTCPeerConnection a page makes, for the checks below.
PROBE = """(() => {
  window.__cameraTracks = [];
  window.__pcs = [];
  const devices = navigator.mediaDevices;
  if (devices) {
    const original = devices.getUserMedia.bind(devices);
    devices.getUserMedia = async (constraints) => {
      const stream = await original(constraints);
      window.__cameraTracks.push(...stream.getTracks());
      return stream;
    };
  }
  const Original = window.RTCPeerConnection;
  const Probed = function (...args) { const pc = new Original(...args); window.__pcs.push(pc); return pc; };
  Probed.prototype = Original.prototype;
  Object.setPrototypeOf(Probed, Original);
  window.RTCPeerConnection = Probed;
})();"""
LIVE_VIDEO = "window.__cameraTracks.filter((t) => t.kind === 'video' && t.readyState === 'live').length"

# Each video element matching a selector: is it playing, and what does its current frame look like?
FRAMES = """(selector) => [...document.querySelectorAll(selector)].map((v) => {
  const c = document.createElement('canvas'); c.width = 64; c.height = 48;
  const g = c.getContext('2d');
  let mean = 0, variance = 0;
  if (v.readyState >= 2 && v.videoWidth > 0) {
    g.drawImage(v, 0, 0, c.width, c.height);
    const d = g.getImageData(0, 0, c.width, c.height).data;
    let sum = 0, sq = 0, n = 0;
    for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i + 1] + d[i + 2]) / 3; sum += y; sq += y * y; n++; }
    mean = sum / n; variance = sq / n - mean * mean;
  }
  const tile = v.closest('[data-testid=video-tile]');
  return { peer: tile ? tile.dataset.peer : null, name: tile ? tile.innerText : null, ready: v.readyState,
           time: v.currentTime, width: v.videoWidth, mean, variance, muted: v.muted, paused: v.paused,
           audio: v.srcObject ? v.srcObject.getAudioTracks().length : 0 };
})"""
# Audio arriving on the page's live connections: packets and energy (Chromium's fake microphone beeps).
AUDIO_IN = """async () => {
  const out = [];
  for (const pc of window.__pcs) {
    if (pc.connectionState === 'closed') continue;
    (await pc.getStats()).forEach((r) => {
      if (r.type === 'inbound-rtp' && r.kind === 'audio') out.push({ packets: r.packetsReceived || 0, energy: r.totalAudioEnergy || 0 });
    });
  }
  return out;
}"""
# Video frames decoded so far on each of the page's open connections (a frozen tile decodes nothing).
FRAMES_DECODED = """async () => {
  const out = [];
  for (const pc of window.__pcs) {
    if (pc.connectionState === 'closed') continue;
    let n = 0, seen = false;
    (await pc.getStats()).forEach((r) => { if (r.type === 'inbound-rtp' && r.kind === 'video') { n += r.framesDecoded || 0; seen = true; } });
    if (seen) out.push(n);
  }
  return out;
}"""
TILE_VIDEOS = "[data-testid=meeting-grid] [data-testid=video-tile] video"


def record_socket_messages(page, sink: list[str], sent: list[str]) -> None:
    def on_socket(ws) -> None:
        ws.on("framereceived", lambda payload: sink.append(str(payload)))
        ws.on("framesent", lambda payload: sent.append(str(payload)))
    page.on("websocket", on_socket)


def log_page(page, who: str, log: list[str]) -> None:
    """Console output, page errors and the socket's traffic (SDPs shortened), printed if the test fails."""
    def frame(direction: str, payload) -> None:
        text = str(payload)
        log.append(f"{who} {direction} {text[:300]}{'…' if len(text) > 300 else ''}")
    page.on("console", lambda m: log.append(f"{who} console.{m.type}: {m.text}"))
    page.on("pageerror", lambda e: log.append(f"{who} pageerror: {e}"))
    page.on("websocket", lambda ws: (ws.on("framereceived", lambda p: frame("<-", p)),
                                     ws.on("framesent", lambda p: frame("->", p))))


TILE_SIZES = """[...document.querySelectorAll('[data-testid=video-tile]')].map((t) => {
  const v = t.querySelector('video'); return [t.dataset.quality, v.videoWidth, v.videoHeight, v.clientWidth]; })"""
# The simulcast layers a page sends: [rid, width, height, frames sent] per layer.
SENT_LAYERS = """(async () => { const out = [];
  for (const pc of window.__pcs) { (await pc.getStats()).forEach((r) => {
    if (r.type === 'outbound-rtp' && r.kind === 'video') out.push([r.rid, r.frameWidth, r.frameHeight, r.framesSent]); }); }
  return out; })()"""


async def eventually_js(page, expression: str, timeout: float) -> bool:
    """Poll a page until a JavaScript expression is true (False after `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await page.evaluate(expression):
            return True
        await page.wait_for_timeout(250)
    return False


async def playing_tiles(page, expect: int, timeout: float = 60.0) -> list[dict]:
    """Wait until `expect` remote tiles play real frames: readyState >= 2, time advancing, not black."""
    deadline = time.monotonic() + timeout
    last: list[dict] = []
    while time.monotonic() < deadline:
        first = await page.evaluate(FRAMES, TILE_VIDEOS)
        await page.wait_for_timeout(1_000)
        last = await page.evaluate(FRAMES, TILE_VIDEOS)
        before = {f["peer"]: f["time"] for f in first}
        good = [f for f in last if f["ready"] >= 2 and f["width"] > 0 and f["time"] > before.get(f["peer"], 1e9)
                and f["mean"] > 15 and f["variance"] > 40]
        if len(good) >= expect:
            return good
    raise AssertionError(f"expected {expect} playing, non-black tiles; have {last}")


async def decoding(page, expect: int, timeout: float = 60.0) -> None:
    """Wait until `expect` open connections of the page decode new video frames (over 1.5 s)."""
    deadline = time.monotonic() + timeout
    counts: list[int] = []
    while time.monotonic() < deadline:
        first = await page.evaluate(FRAMES_DECODED)
        await page.wait_for_timeout(1_500)
        counts = await page.evaluate(FRAMES_DECODED)
        if len(first) == len(counts) and sum(1 for a, b in zip(first, counts) if b > a) >= expect:
            return
    raise AssertionError(f"expected {expect} connections decoding video; frames decoded: {counts}")


async def hears(page, expect: int, timeout: float = 30.0) -> list[dict]:
    """Wait until `expect` incoming audio streams carry packets with sound in them."""
    deadline = time.monotonic() + timeout
    last: list[dict] = []
    while time.monotonic() < deadline:
        last = await page.evaluate(AUDIO_IN)
        if sum(1 for a in last if a["packets"] > 20 and a["energy"] > 0) >= expect:
            return last
        await page.wait_for_timeout(1_000)
    raise AssertionError(f"expected {expect} audio streams with sound; have {last}")


def samples_by_name(live) -> dict[str, int]:
    return dict(live.rows("SELECT p.name, COUNT(s.id) FROM participants p LEFT JOIN samples s "
                          "ON s.participant_id = p.participant_id GROUP BY p.name"))


def faces_by_name(live) -> dict[str, int]:
    return dict(live.rows("SELECT p.name, COALESCE(SUM(s.face_found), 0) FROM participants p LEFT JOIN samples s "
                          "ON s.participant_id = p.participant_id GROUP BY p.name"))


async def test_meeting_teacher_and_students_see_and_hear_each_other(tmp_path):
    playwright_api = pytest.importorskip("playwright.async_api")
    ARTIFACTS.mkdir(exist_ok=True)
    started = time.monotonic()
    cams = {who: video_to_y4m(VIDEOS / video, tmp_path / f"{who}.y4m")
            for who, video in (("teacher", "short_hamilton_clip.mp4"), ("ben", "emotions.mp4"))}
    # Asha's camera is VGA, so that Chrome sends both simulcast layers (640x480 and 320x240; it sends one below 480x270).
    cams["asha"] = video_to_y4m(VIDEOS / "woman2.mp4", tmp_path / "asha.y4m", width=640, height=480)
    # Scripted expressions on the faces the real detector finds, and short windows, so that a confusion alert is
    # due within seconds of a student appearing.
    # A gallery of two is "large" here, so that the teacher's small tiles get the low simulcast layer.
    live = await start_class(tmp_path, janus=True, model={"model": "scripted:confused"},
                             server={"meeting_gallery_low_from": 2},
                             signals={"window_seconds": 4.0, "student_min_seconds": 2.0, "min_samples": 3,
                                      "cooldown_seconds": 600.0})
    log: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browsers = []
        try:
            room = await live.create_room()
            # Pages may only use the microphone if the server's Permissions-Policy allows it (a meeting needs sound).
            async with live.http.get(room["student_url"]) as r:
                policy = r.headers.get("Permissions-Policy", "")
            assert "microphone=(self)" in policy, (
                f"the pages cannot use the microphone: Permissions-Policy is {policy!r}; in a meeting it must allow "
                "microphone=(self) (signaling/server.py PAGE_HEADERS)")
            teacher_browser = await launch(pw, cams["teacher"])
            browsers.append(teacher_browser)
            teacher = await (await teacher_browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await teacher.add_init_script(PROBE)
            log_page(teacher, "teacher", log)
            await teacher.goto(room["teacher_url"])
            await teacher.get_by_test_id("self-view").wait_for(state="visible", timeout=30_000)
            await teacher.get_by_test_id("invite-bot").click()
            await teacher.get_by_test_id("bot-status").filter(has_text="is in the room").wait_for(timeout=30_000)

            messages: dict[str, list[str]] = {"asha": [], "ben": []}
            sent: dict[str, list[str]] = {"asha": [], "ben": []}
            pages = {}
            for who, name in (("asha", "Asha"), ("ben", "Ben")):
                browser = await launch(pw, cams[who])
                browsers.append(browser)
                page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await page.add_init_script(PROBE)
                record_socket_messages(page, messages[who], sent[who])
                log_page(page, who, log)
                await page.goto(room["student_url"])
                await page.get_by_test_id("student-name").fill(name)
                await page.get_by_test_id("join").click()
                pages[who] = page
            asha, ben = pages["asha"], pages["ben"]

            # The teacher's grid: one tile per student, named, playing real frames with sound.
            grid = teacher.get_by_test_id("meeting-grid")
            for name in ("Asha", "Ben"):
                await grid.get_by_test_id("video-tile").filter(has_text=name).wait_for(timeout=TIMEOUT)
            tiles = await playing_tiles(teacher, 2, timeout=TIMEOUT / 1000)
            assert {t["peer"] for t in tiles} >= {await teacher.get_by_test_id("video-tile").filter(has_text=n)
                                                  .get_attribute("data-peer") for n in ("Asha", "Ben")}
            assert all(not t["muted"] and t["audio"] >= 1 for t in tiles), tiles
            # The teacher's gallery tiles are small: she gets the low layer of each. Asha's tile was subscribed at the
            # high layer while she was alone, and subscribed again at the low one when Ben came.
            asha_peer = await grid.get_by_test_id("video-tile").filter(has_text="Asha").get_attribute("data-peer")
            asha_video = f"document.querySelector('[data-testid=video-tile][data-peer=\"{asha_peer}\"] video')"
            if not await eventually_js(teacher, f"{asha_video}.parentElement.dataset.quality === 'low'"
                                       f" && {asha_video}.videoWidth === 320", 30):
                raise AssertionError(
                    "the teacher's small tile of Asha does not get her 320x240 layer: tiles (quality, width, height, "
                    f"shown) {await teacher.evaluate(TILE_SIZES)}, Asha sends {await asha.evaluate(SENT_LAYERS)}")
            await decoding(teacher, 2)
            await hears(teacher, 2)
            # Each student: the teacher's tile (and her own camera in the self-view), playing, with sound.
            for page in (asha, ben):
                teacher_tile = page.locator("[data-testid=video-tile][data-role=teacher]")
                await teacher_tile.wait_for(timeout=TIMEOUT)
                shown = await playing_tiles(page, 1, timeout=TIMEOUT / 1000)
                teacher_peer = await teacher_tile.get_attribute("data-peer")
                assert teacher_peer in {t["peer"] for t in shown}, shown
                assert await teacher_tile.get_attribute("data-quality") == "high"   # one big tile: full quality
                await hears(page, 1)
                own = (await page.evaluate(FRAMES, "[data-testid=self-view]"))[0]
                assert own["ready"] >= 2 and own["muted"], own

            # The camera is published with two simulcast layers (the bot takes the low one), VP8 and Opus only, so
            # the SDP stays well inside the server's limit.
            offers = [json.loads(m)["sdp"] for m in sent["asha"] if '"type":"publish"' in m]
            assert offers and all(len(sdp) <= 12_000 and sdp.count("m=") <= 4 for sdp in offers), [len(o) for o in offers]
            assert "a=rid:l send" in offers[-1] and "a=rid:h send" in offers[-1] and "VP8/90000" in offers[-1]
            assert "m=audio" in offers[-1]

            # The bot analyses both students; the teacher gets the live state and an alert.
            assert await eventually(lambda: min(faces_by_name(live).get(n, 0) for n in ("Asha", "Ben")) >= 3,
                                    timeout=TIMEOUT / 1000), samples_by_name(live)
            rows = teacher.get_by_test_id("student-row")
            await rows.filter(has_text="Asha").get_by_test_id("student-face").filter(has_text="yes").wait_for(timeout=TIMEOUT)
            await teacher.get_by_test_id("alert-item").first.wait_for(timeout=TIMEOUT)
            await teacher.wait_for_timeout(1_500)   # the flash animation, and the expression shown on the tiles
            await teacher.screenshot(path=str(ARTIFACTS / "teacher-meeting.png"), full_page=True)
            await asha.screenshot(path=str(ARTIFACTS / "student-meeting.png"), full_page=True)
            assert await teacher.evaluate("document.documentElement.scrollWidth") <= 1280, "the meeting layout is too wide"

            # The notice says what the switch does in a meeting.
            await ben.get_by_test_id("analysis-notice").get_by_text("the teacher (and class) still see and hear you",
                                                                    exact=False).wait_for(timeout=5_000)
            assert not await ben.get_by_text("Your camera then stops").is_visible()

            # Ben switches analysis off during class: he stays in the meeting (camera live, the teacher still sees
            # him playing) but the assistant gets nothing more from him.
            await ben.get_by_test_id("analysis-toggle").uncheck()
            await rows.filter(has_text="Ben").get_by_test_id("student-analysis").filter(has_text="off").wait_for(timeout=10_000)
            await teacher.wait_for_timeout(1_500)   # frames already inside the pipeline when he switched
            before = samples_by_name(live)
            await teacher.wait_for_timeout(4_000)
            after = samples_by_name(live)
            assert after["Ben"] == before["Ben"], f"samples of Ben after opting out: {before} -> {after}"
            assert after["Asha"] > before["Asha"], f"Asha is still analysed meanwhile: {before} -> {after}"
            # Chrome sends the low simulcast layer (5 fps) in three temporal layers: the bot must receive enough of
            # them to sample at bot.sample_hz (2 Hz here; the base layer alone is 1.25 frames/s).
            times = [t for (t,) in live.rows("SELECT s.t FROM samples s JOIN participants p ON "
                                            "s.participant_id = p.participant_id WHERE p.name = 'Asha' ORDER BY s.t")]
            rate = (len(times) - 1) / max(1e-6, times[-1] - times[0])
            assert rate >= 1.6, f"the bot samples Asha at {rate:.2f}/s over {times[-1] - times[0]:.1f} s, not 2"
            assert await ben.evaluate(LIVE_VIDEO) >= 1, "opting out must not stop the camera in a meeting"
            ben_peer = await teacher.get_by_test_id("video-tile").filter(has_text="Ben").get_attribute("data-peer")
            assert ben_peer in {t["peer"] for t in await playing_tiles(teacher, 2, timeout=30)}

            # Students never receive the live state or alerts.
            for who, page in pages.items():
                received = " ".join(messages[who])
                for kind in ("state", "alert"):
                    assert f'"type": "{kind}"' not in received and f'"type":"{kind}"' not in received, who
                text = await page.inner_text("body")
                assert "seems confused for" not in text and "of the class" not in text   # alert texts

            # Mute is local and labelled; Leave closes everything and her tile leaves the teacher's grid.
            mic = asha.get_by_test_id("mic-toggle")
            await mic.click()
            assert await mic.get_attribute("aria-pressed") == "true"
            assert await asha.evaluate("window.__cameraTracks.filter((t) => t.kind === 'audio' && t.readyState === 'live')"
                                       ".every((t) => !t.enabled)")
            await asha.get_by_test_id("leave").click()
            await asha.get_by_test_id("status").filter(has_text="You left the class.").wait_for(timeout=5_000)
            assert await asha.evaluate("window.__cameraTracks.every((t) => t.readyState === 'ended')")
            assert await asha.evaluate("window.__pcs.every((pc) => pc.connectionState === 'closed')")
            await grid.get_by_test_id("video-tile").filter(has_text="Asha").wait_for(state="detached", timeout=20_000)

            # The teacher ends the class: Ben's page stops his camera, microphone and connections, and says so.
            teacher.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await teacher.get_by_test_id("end-class").click()
            await teacher.get_by_test_id("class-ended").filter(has_text="Class ended at").wait_for(timeout=15_000)
            await ben.get_by_test_id("status").filter(has_text="The class has ended").wait_for(timeout=10_000)
            assert await ben.evaluate("window.__cameraTracks.every((t) => t.readyState === 'ended')")
            assert await ben.evaluate("window.__pcs.every((pc) => pc.connectionState === 'closed')")
            assert live.rows("SELECT COUNT(*) FROM sessions WHERE ended_at IS NULL")[0][0] == 0
            print(f"meeting test: {time.monotonic() - started:.1f} s")
        finally:
            print("\n".join(line for line in log if '"type":"state"' not in line and '"type": "state"' not in line))
            for browser in browsers:
                await browser.close()
            await stop_class(live)


async def test_meeting_comes_back_after_the_media_server_is_killed(tmp_path):
    """Janus SIGKILLed during class: the server restarts it and sends a media reset; the pages publish again,
    subscribe again, and the teacher and the student see each other again (fresh frames decoded)."""
    playwright_api = pytest.importorskip("playwright.async_api")
    cams = {who: video_to_y4m(VIDEOS / video, tmp_path / f"{who}.y4m", max_seconds=8.0)
            for who, video in (("teacher", "short_hamilton_clip.mp4"), ("asha", "woman2.mp4"))}
    live = await start_class(tmp_path, janus=True, server={"room_idle_seconds": 600.0})
    log: list[str] = []
    async with playwright_api.async_playwright() as pw:
        browsers = []
        try:
            room = await live.create_room()
            pages = {}
            for who in ("teacher", "asha"):
                browser = await launch(pw, cams[who])
                browsers.append(browser)
                page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
                await page.add_init_script(PROBE)
                log_page(page, who, log)
                pages[who] = page
            teacher, asha = pages["teacher"], pages["asha"]
            await teacher.goto(room["teacher_url"])
            await teacher.get_by_test_id("self-view").wait_for(state="visible", timeout=30_000)
            await asha.goto(room["student_url"])
            await asha.get_by_test_id("student-name").fill("Asha")
            await asha.get_by_test_id("join").click()
            await playing_tiles(teacher, 1, timeout=TIMEOUT / 1000)
            await playing_tiles(asha, 1, timeout=TIMEOUT / 1000)

            publishes = {who: sum(1 for line in log if line.startswith(f"{who} -> ") and '"type":"publish"' in line)
                         for who in pages}
            live.media.process.kill()   # SIGKILL: no goodbye to anyone
            for who in pages:
                assert await eventually(lambda who=who: sum(1 for line in log if line.startswith(f"{who} -> ")
                                                            and '"type":"publish"' in line) > publishes[who],
                                        timeout=60), f"{who} did not publish again after the media reset"
            await decoding(teacher, 1)
            await decoding(asha, 1)
            await playing_tiles(teacher, 1, timeout=30)
            await playing_tiles(asha, 1, timeout=30)
            assert any('"event":"reset"' in line for line in log if line.startswith("teacher <- "))
        finally:
            print("\n".join(line for line in log if '"type":"state"' not in line))
            for browser in browsers:
                await browser.close()
            await stop_class(live)
