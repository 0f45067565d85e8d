"""The teacher page's "Use with Zoom / Meet / Teams" card in a real browser (Debian chromium via Playwright):
create the URL, a service streams to it, switch a participant's analysis off, revoke the URL."""
from __future__ import annotations

import time

import aiohttp
import pytest

from bot import ingest_replay
from signaling.ingest import INGEST_KEY
from tests.spine import eventually, start_class, stop_class
from tests.test_browser_e2e import BROWSER_ARGS, CHROMIUM, pytestmark  # noqa: F401  (same skips)


async def test_the_teacher_creates_copies_and_revokes_the_ingest_url_and_switches_analysis_off(tmp_path):
    playwright_api = pytest.importorskip("playwright.async_api")
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
            page = await (await browser.new_context()).new_page()
            await page.goto(live.room["teacher_url"])
            await page.get_by_test_id("ingest-service").select_option("recall")
            await page.get_by_test_id("ingest-create").click()
            url_box = page.get_by_test_id("ingest-url")
            await playwright_api.expect(url_box).to_contain_text("/ingest/recall/")
            url = (await url_box.text_content()).strip()
            assert url.startswith("ws://")

            ws = await live.http.ws_connect(url)
            now = time.time()
            await ws.send_str(ingest_replay.recall_event("participant_events.join",
                                                         ingest_replay.recall_participant(100, "Asha"), now, now))
            person = page.get_by_test_id("ingest-person")
            await playwright_api.expect(person).to_contain_text("Asha", timeout=15_000)   # the page polls every 5 s
            await page.get_by_test_id("ingest-toggle").click()
            assert await eventually(lambda: live.runner.app[INGEST_KEY].teacher_off == {(live.room["room"], "rc-100")})
            assert await eventually(lambda: not live.service.rooms[live.room["room"]].students["rc-100"].analysis)

            await page.get_by_test_id("ingest-revoke").click()
            closing = await ws.receive()
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 4401)
            await browser.close()
    finally:
        await stop_class(live)
