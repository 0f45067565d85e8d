"""A class in a real browser: Debian chromium driven by Playwright, fake cameras fed from real face videos.

A teacher creates a room on the home page and invites the bot; two students join from their own
browsers (one opts out before joining: his camera never starts and he sends no offer); the bot
analyses the first only; the teacher page shows live state and an alert; the students see neither;
when the first student opts out, her camera stops. A blocked camera and a wrong link get plain
answers. The teacher acknowledges the alert and reloads: the feed and the acknowledgement are still there.
The teacher ends the class: the students are told, the review shows the session ended at that moment
and the teacher can delete it. Screenshots of the teacher and review pages go to artifacts/.
"""
from __future__ import annotations

import asyncio
import os
import re
import time
from pathlib import Path

import pytest

from core.settings import ServerSettings
from tests.spine import PROJECT, VIDEOS, eventually, start_class, stop_class
from tests.y4m import video_to_y4m

CHROMIUM = os.environ.get("CLASSMOOD_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT / "artifacts"
pytestmark = [
    pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} not installed (scripts/test.sh installs it)"),
]
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


async def launch(playwright, y4m: Path | None, user_data: Path):
    args = BROWSER_ARGS + ([f"--use-file-for-fake-video-capture={y4m}"] if y4m else [])
    return await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


# Every camera track a page obtains, to tell whether its camera is (still) live.
CAMERA_PROBE = """(() => {
  window.__cameraTracks = [];
  const devices = navigator.mediaDevices;
  if (!devices) return;
  const original = devices.getUserMedia.bind(devices);
  devices.getUserMedia = async (constraints) => {
    const stream = await original(constraints);
    window.__cameraTracks.push(...stream.getTracks());
    return stream;
  };
})();"""
LIVE_TRACKS = "window.__cameraTracks.filter((t) => t.readyState === 'live').length"
# What the student's page sends the assistant, in kbit/s over four seconds (join.js's `pc`).
SENT_KBPS = """async () => {
  const sent = async () => { let bytes = 0;
    (await pc.getStats()).forEach((r) => { if (r.type === "outbound-rtp" && r.kind === "video") bytes += r.bytesSent; });
    return bytes; };
  const before = await sent(), started = performance.now();
  await new Promise((resolve) => setTimeout(resolve, 4000));
  return (await sent() - before) * 8 / (performance.now() - started);
}"""
# The user (or the browser's settings) refused the camera.
BLOCK_CAMERA = """navigator.mediaDevices.getUserMedia = () =>
  Promise.reject(new DOMException("Permission denied", "NotAllowedError"));"""
# A 60-character name without a break must not widen the teacher page.
LONG_NAME = "Ben" + "x" * 57


def record_socket_messages(page, sink: list[str], sent: list[str] | None = None) -> None:
    def on_socket(ws):
        ws.on("framereceived", lambda payload: sink.append(str(payload)))
        if sent is not None:
            ws.on("framesent", lambda payload: sent.append(str(payload)))
    page.on("websocket", on_socket)


async def test_teacher_sees_live_state_and_alert_students_see_nothing(tmp_path):
    playwright_api = pytest.importorskip("playwright.async_api")
    ARTIFACTS.mkdir(exist_ok=True)
    asha_cam = video_to_y4m(VIDEOS / "woman2.mp4", tmp_path / "asha.y4m")
    ben_cam = video_to_y4m(VIDEOS / "emotions.mp4", tmp_path / "ben.y4m")
    # Scripted expressions on the faces the real detector finds, and short windows, so that a
    # confusion alert is due within seconds of the student appearing.
    live = await start_class(tmp_path, model={"model": "scripted:confused"},
                             signals={"window_seconds": 4.0, "student_min_seconds": 2.0, "min_samples": 3,
                                      "cooldown_seconds": 600.0})
    async with playwright_api.async_playwright() as pw:
        browsers = []
        try:
            teacher_browser = await launch(pw, None, tmp_path / "t")
            browsers.append(teacher_browser)
            teacher = await (await teacher_browser.new_context(viewport={"width": 1280, "height": 900},
                                                               permissions=["clipboard-read", "clipboard-write"])).new_page()
            await teacher.goto(live.server + "/")
            await teacher.get_by_test_id("create-room").click()
            await teacher.get_by_test_id("open-teacher").wait_for(state="visible")
            student_link = await teacher.get_by_test_id("student-link").input_value()
            assert "/join/" in student_link
            await teacher.get_by_test_id("open-teacher").click()
            await teacher.wait_for_url("**/teach/**")
            await teacher.get_by_test_id("invite-bot").click()

            student_messages: dict[str, list[str]] = {"asha": [], "ben": []}
            student_sent: dict[str, list[str]] = {"asha": [], "ben": []}
            pages = {}
            for who, cam, analysis, name in (("asha", asha_cam, True, "Asha"), ("ben", ben_cam, False, LONG_NAME)):
                browser = await launch(pw, cam, tmp_path / who)
                browsers.append(browser)
                page = await (await browser.new_context()).new_page()
                await page.add_init_script(CAMERA_PROBE)
                record_socket_messages(page, student_messages[who], student_sent[who])
                await page.goto(student_link)
                await page.get_by_test_id("retention-note").filter(has_text="erased 90 days after class").wait_for(timeout=5_000)
                await page.get_by_test_id("student-name").fill(name)
                if analysis:
                    await page.get_by_test_id("join").click()
                else:
                    await page.get_by_test_id("analysis-toggle").uncheck()
                    await page.get_by_test_id("student-name").press("Enter")   # the name field submits the form
                pages[who] = page

            # The teacher sees Asha analysed (a face and an expression) and an alert about her.
            asha_row = teacher.get_by_test_id("student-row").filter(has_text="Asha")
            await asha_row.get_by_test_id("student-face").filter(has_text="yes").wait_for(timeout=60_000)
            alert = teacher.get_by_test_id("alert-item").filter(has_text="Asha")
            await alert.first.wait_for(timeout=60_000)
            await teacher.get_by_test_id("student-row").filter(has_text=LONG_NAME).wait_for(timeout=10_000)
            # Her camera sends the assistant no more than the server's cap (welcome.video.kbps, 90 by default).
            sent_kbps = await pages["asha"].evaluate(SENT_KBPS)
            assert 0 < sent_kbps <= 1.25 * ServerSettings.video_kbps, f"the student page sent {sent_kbps:.0f} kbit/s"
            await teacher.screenshot(path=str(ARTIFACTS / "teacher-page.png"), full_page=True)
            assert await teacher.evaluate("document.documentElement.scrollWidth") <= 1280, "a long name widened the page"
            # Bars are meters and buttons say whom they are about, for screen readers.
            meter = asha_row.get_by_role("meter", name="confusion of Asha")
            assert 0 <= int(await meter.get_attribute("aria-valuenow")) <= 100
            # Readable scores: a number beside each bar, a mark at the alert threshold on it, and one
            # sentence of help under each threshold slider.
            for kind in ("confusion", "boredom"):
                assert re.fullmatch(r"[01]\.\d\d", await asha_row.get_by_test_id(kind + "-value").inner_text())
            assert await asha_row.get_by_test_id("threshold-mark").count() == 2
            mark_left = await asha_row.get_by_test_id("student-confusion").get_by_test_id("threshold-mark").evaluate(
                "(m) => m.style.left")
            threshold = await teacher.locator("#threshold-confusion").input_value()
            assert mark_left == f"{round(float(threshold) * 100)}%", (mark_left, threshold)
            for kind, words in (("confusion", "than that student usually"), ("boredom", "looking away"),
                                ("class_share", "share of analysed students")):
                assert words in await teacher.get_by_test_id("help-" + kind).inner_text()
            await asha_row.get_by_role("button", name="Mute alerts about Asha").wait_for(timeout=5_000)
            # Muted, the wider "Unmute" button still fits in the table at 1280 px; a second click unmutes.
            await asha_row.get_by_test_id("mute-button").click()
            unmute = asha_row.get_by_role("button", name="Unmute alerts about Asha")
            await unmute.wait_for(timeout=5_000)
            button_box = await unmute.bounding_box()
            table_box = await teacher.locator("#students").locator("xpath=ancestor::div[1]").bounding_box()
            assert button_box["x"] + button_box["width"] <= table_box["x"] + table_box["width"], (button_box, table_box)
            await unmute.click()
            await asha_row.get_by_role("button", name="Mute alerts about Asha").wait_for(timeout=5_000)
            # Ben opted out: there is nothing to mute about him.
            assert await teacher.get_by_test_id("student-row").filter(has_text=LONG_NAME).get_by_test_id("mute-button").count() == 0
            # The student link has a copy button.
            await teacher.get_by_test_id("copy-student-link").click()
            await teacher.get_by_test_id("copy-status").filter(has_text="Copied").wait_for(timeout=5_000)
            assert await teacher.evaluate("navigator.clipboard.readText()") == student_link
            await alert.first.get_by_role("button", name="Acknowledge the alert about Asha").wait_for(timeout=5_000)

            # Ben opted out before joining: his camera never started and he offered no video.
            ben = pages["ben"]
            await ben.get_by_test_id("status").filter(has_text="Analysis is off").wait_for(timeout=10_000)
            assert await ben.evaluate("window.__cameraTracks.length") == 0
            assert not any('"offer"' in m for m in student_sent["ben"])
            assert any('"offer"' in m for m in student_sent["asha"])

            room_id = teacher.url.split("/teach/", 1)[1].split("#", 1)[0]
            names = dict(live.rows("SELECT p.name, COUNT(s.id) FROM participants p LEFT JOIN samples s "
                                   "ON s.participant_id = p.participant_id GROUP BY p.participant_id"))
            faces = dict(live.rows("SELECT p.name, SUM(s.face_found) FROM participants p JOIN samples s "
                                   "ON s.participant_id = p.participant_id GROUP BY p.participant_id"))
            assert names.get("Asha", 0) >= 5 and faces.get("Asha", 0) >= 3
            assert LONG_NAME in names and names[LONG_NAME] == 0, "the student who opted out must not be analysed"

            for who, page in pages.items():
                text = await page.inner_text("body")
                assert "seems confused for" not in text and "of the class" not in text
                received = " ".join(student_messages[who])
                assert '"type": "alert"' not in received and '"type":"alert"' not in received
                assert '"type":"state"' not in received and '"type": "state"' not in received

            # Review page of the same room, from the teacher page's link.
            token = teacher.url.split("#t=", 1)[1]
            review = await (await teacher_browser.new_context(viewport={"width": 1280, "height": 1000})).new_page()
            await review.goto(f"{live.server}/review/{room_id}#t={token}")
            await review.get_by_test_id("review-students").filter(has_text="Asha").wait_for(timeout=30_000)
            # The teacher's classes in this room (title and date), the one shown marked.
            item = review.get_by_test_id("class-item")
            assert await item.count() == 1 and await item.get_attribute("aria-current") == "true"
            assert re.search(r"\d", await item.inner_text())
            # Join and leave times per student; clicking a student shows their own timeline.
            asha_review = review.get_by_test_id("review-student-row").filter(has_text="Asha")
            joined = await asha_review.get_by_test_id("student-joined").inner_text()
            assert re.search(r"\d{1,2}:\d{2}", joined), joined
            assert await asha_review.get_by_test_id("student-left").inner_text() == "still in class"
            await asha_review.click()
            await review.get_by_test_id("student-detail").filter(has_text="Asha").wait_for(state="visible", timeout=5_000)
            assert "Asha's confusion" in await review.get_by_test_id("student-timeline").get_attribute("aria-label")
            assert await review.evaluate("current.thresholds.confusion") == float(threshold)
            await review.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)
            # Both charts show data, even for a class this short (it may fit in one 10 s bucket).
            painted = await review.evaluate("""() => ['timeline', 'signals'].map((id) => {
                const c = document.getElementById(id), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) {
                    const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
                    if (a > 0 && Math.max(r, g, b) - Math.min(r, g, b) > 60) n++;   // coloured, not grid grey
                }
                return n;
            })""")
            assert painted[0] > 5000 and painted[1] > 200, painted
            line = await review.evaluate("""() => {   // the per-student chart has Asha's lines in it
                const c = document.getElementById('student-timeline'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 0 && Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]) > 60) n++;
                return n;
            }""")
            assert line > 200, line

            # The teacher may delete a stored session, but not the one the assistant is still recording.
            await review.get_by_test_id("retention").filter(has_text="erased automatically").wait_for(timeout=5_000)
            review.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await review.get_by_test_id("delete-session").click()
            await review.get_by_role("alert").filter(has_text="still in the room").wait_for(timeout=10_000)
            assert live.rows("SELECT COUNT(*) FROM sessions")[0][0] == 1
            bot = next(iter(live.service.peers.values()))    # the one room, created on the teacher page
            asha_id = next(pid for pid, s in bot.room.students.items() if s.name == "Asha")
            # Her page sends server.video_fps (3) frames a second, no more than analysis needs: enough for the bot to
            # sample her at bot.sample_hz (2 Hz).
            times = [t for (t,) in live.rows("SELECT t FROM samples WHERE participant_id = ? ORDER BY t", asha_id)]
            rate = (len(times) - 1) / max(1e-6, times[-1] - times[0])
            assert rate >= 1.6, f"the bot samples Asha at {rate:.2f}/s over {times[-1] - times[0]:.1f} s, not 2"

            # Asha's connection to the assistant breaks without a goodbye (what aioice does when a busy assistant's ICE
            # consent expires): her page notices (~16 s, Chromium's consent check) and connects again by itself.
            lost_pc = bot.pcs[asha_id]
            await lost_pc.getTransceivers()[0].receiver.transport.transport._connection.close()
            assert await eventually(lambda: bot.pcs.get(asha_id) not in (None, lost_pc), 45), "the page did not reconnect"
            t_back = time.time()
            assert await eventually(lambda: live.rows("SELECT COUNT(*) FROM samples WHERE participant_id = ? AND t > ?",
                                                      asha_id, t_back)[0][0] > 0, 20), "not analysed again"
            # Asha opts out during class: her camera stops at once and the teacher sees analysis off.
            asha = pages["asha"]
            assert await asha.evaluate(LIVE_TRACKS) >= 1
            await asha.get_by_test_id("analysis-toggle").uncheck()
            await asha.wait_for_function(LIVE_TRACKS + " === 0", timeout=5_000)
            assert await asha.evaluate("document.getElementById('preview').srcObject === null")
            await asha_row.get_by_test_id("student-analysis").filter(has_text="off").wait_for(timeout=10_000)

            # A blocked camera says what to do; a link with a wrong key says so, and does not retry.
            blocked = await (await browsers[-1].new_context()).new_page()
            await blocked.add_init_script(BLOCK_CAMERA)
            await blocked.goto(student_link)
            await blocked.get_by_test_id("student-name").fill("Cam")
            await blocked.get_by_test_id("join").click()
            await blocked.get_by_test_id("status").filter(has_text="Camera blocked: allow it").wait_for(timeout=10_000)
            wrong = await (await browsers[-1].new_context()).new_page()
            sockets = []
            wrong.on("websocket", lambda ws: sockets.append(ws))
            await wrong.goto(student_link.replace("k=", "k=wrong"))
            await wrong.get_by_test_id("student-name").fill("Dee")
            await wrong.get_by_test_id("join").click()
            await wrong.get_by_test_id("status").filter(has_text="not valid any more").wait_for(timeout=10_000)
            await wrong.wait_for_timeout(2_500)
            assert len(sockets) == 1, "a refused link must not be retried"

            # The teacher acknowledges the alert and reloads the page: the feed comes back from storage,
            # acknowledgement included.
            await alert.first.get_by_test_id("ack-button").click()
            await alert.first.get_by_test_id("ack-button").filter(has_text="Acknowledged").wait_for(timeout=5_000)
            await teacher.wait_for_timeout(1_000)          # the acknowledgement travels to the bot and is queued
            await teacher.reload()
            await teacher.get_by_test_id("connection").filter(has_text="live").wait_for(timeout=10_000)
            await alert.first.wait_for(timeout=10_000)
            reloaded = teacher.locator("[data-testid=alert-item].acknowledged").filter(has_text="Asha")
            await reloaded.first.wait_for(timeout=10_000)

            # End class (after a confirmation): everyone is told, the recording ends at that moment.
            teacher.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            pressed = time.time()
            await teacher.get_by_test_id("end-class").click()
            await teacher.get_by_test_id("class-ended").filter(has_text="Class ended at").wait_for(timeout=15_000)
            for page in pages.values():
                await page.get_by_test_id("status").filter(has_text="The class has ended").wait_for(timeout=10_000)
            assert await pages["asha"].evaluate(LIVE_TRACKS) == 0
            (ended_at,), = live.rows("SELECT ended_at FROM sessions")
            assert ended_at is not None and pressed <= ended_at <= time.time()
            await teacher.get_by_test_id("bot-status").filter(has_text="class is over").wait_for(timeout=5_000)
            await teacher.screenshot(path=str(ARTIFACTS / "teacher-class-ended.png"), full_page=True)

            # Review shows it ended at that time at once, and deleting it is allowed now.
            await review.reload()
            end_label = await review.evaluate(f"new Date({ended_at} * 1000).toLocaleTimeString()")
            info = review.get_by_test_id("session-info")
            await info.filter(has_text=end_label).wait_for(timeout=10_000)
            assert "ongoing" not in await info.inner_text()
            # CSV files are named after the class and its start, not the session id.
            session_id = live.rows("SELECT session_id FROM sessions")[0][0]
            async with review.expect_download() as download:
                await review.get_by_test_id("download-samples").click()
            name = (await download.value).suggested_filename
            assert re.fullmatch(r"classmood-[a-z0-9-]+-\d{4}-\d{2}-\d{2}-\d{4}-samples\.csv", name), name
            assert session_id not in name
            await review.get_by_test_id("delete-session").click()
            # Nothing stored is a plain note, not a warning, and there is nothing left to download.
            await review.get_by_test_id("review-empty").filter(has_text="No stored sessions yet.").wait_for(timeout=10_000)
            assert await review.locator("#review-error").inner_text() == ""
            for button in ("download-samples", "download-alerts", "delete-session"):
                assert await review.get_by_test_id(button).is_disabled(), button
            assert live.rows("SELECT COUNT(*) FROM sessions")[0][0] == 0
        finally:
            for browser in browsers:
                await browser.close()
            await stop_class(live)
