"""A class in a real browser: Debian chromium driven by Playwright, fake cameras fed from real face videos.

A teacher creates a room on the home page and invites the bot; two students join from their own
browsers (one opts out); the bot analyses the first only; the teacher page shows live state and an
alert; the students see neither. Screenshots of the teacher and review pages go to artifacts/.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from tests.spine import PROJECT, VIDEOS, start_class, stop_class
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


def record_socket_messages(page, sink: list[str]) -> None:
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: sink.append(str(payload))))


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
            teacher = await (await teacher_browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
            await teacher.goto(live.server + "/")
            await teacher.get_by_test_id("create-room").click()
            await teacher.get_by_test_id("open-teacher").wait_for(state="visible")
            student_link = await teacher.get_by_test_id("student-link").input_value()
            assert "/join/" in student_link
            await teacher.get_by_test_id("open-teacher").click()
            await teacher.wait_for_url("**/teach/**")
            await teacher.get_by_test_id("invite-bot").click()

            student_messages: dict[str, list[str]] = {"asha": [], "ben": []}
            pages = {}
            for who, cam, analysis in (("asha", asha_cam, True), ("ben", ben_cam, False)):
                browser = await launch(pw, cam, tmp_path / who)
                browsers.append(browser)
                page = await (await browser.new_context()).new_page()
                record_socket_messages(page, student_messages[who])
                await page.goto(student_link)
                await page.get_by_test_id("retention-note").filter(has_text="erased 90 days after class").wait_for(timeout=5_000)
                await page.get_by_test_id("student-name").fill(who.capitalize())
                if not analysis:
                    await page.get_by_test_id("analysis-toggle").uncheck()
                await page.get_by_test_id("join").click()
                pages[who] = page

            # The teacher sees Asha analysed (a face and an expression) and an alert about her.
            asha_row = teacher.get_by_test_id("student-row").filter(has_text="Asha")
            await asha_row.get_by_test_id("student-face").filter(has_text="yes").wait_for(timeout=60_000)
            alert = teacher.get_by_test_id("alert-item").filter(has_text="Asha")
            await alert.first.wait_for(timeout=60_000)
            await teacher.screenshot(path=str(ARTIFACTS / "teacher-page.png"), full_page=True)

            room_id = teacher.url.split("/teach/", 1)[1].split("#", 1)[0]
            names = dict(live.rows("SELECT p.name, COUNT(s.id) FROM participants p LEFT JOIN samples s "
                                   "ON s.participant_id = p.participant_id GROUP BY p.participant_id"))
            faces = dict(live.rows("SELECT p.name, SUM(s.face_found) FROM participants p JOIN samples s "
                                   "ON s.participant_id = p.participant_id GROUP BY p.participant_id"))
            assert names.get("Asha", 0) >= 5 and faces.get("Asha", 0) >= 3
            assert names.get("Ben", 0) == 0, "the student who opted out must not be analysed"

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
            await review.screenshot(path=str(ARTIFACTS / "review-page.png"), full_page=True)

            # The teacher may delete a stored session, but not the one the assistant is still recording.
            await review.get_by_test_id("retention").filter(has_text="erased automatically").wait_for(timeout=5_000)
            review.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
            await review.get_by_test_id("delete-session").click()
            await review.get_by_role("alert").filter(has_text="still in the room").wait_for(timeout=10_000)
            assert live.rows("SELECT COUNT(*) FROM sessions")[0][0] == 1
        finally:
            for browser in browsers:
                await browser.close()
            await stop_class(live)
