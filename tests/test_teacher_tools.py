"""Small things around the teacher's tools: the favicon, the export CLI's own flags, the admin CLI."""
from __future__ import annotations

import subprocess
import sys

from aiohttp.test_utils import TestClient, TestServer

from core.settings import Settings
from signaling.memory_store import MemoryStore
from signaling.server import create_app


async def test_every_page_gets_a_favicon_instead_of_a_404():
    async with TestClient(TestServer(create_app(Settings(), store=MemoryStore()))) as client:
        response = await client.get("/favicon.ico")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("image/svg+xml")
        assert (await response.read()).startswith(b"<svg")
        page = await (await client.get("/")).text()
        assert 'rel="icon" href="/static/favicon.svg"' in page
        assert (await client.get("/static/favicon.svg")).status == 200


def test_export_help_lists_its_own_and_the_storage_flags_only():
    out = subprocess.run([sys.executable, "-m", "storage.export", "--help"], capture_output=True, text=True,
                         timeout=60).stdout
    for flag in ("--session", "--list", "--delete", "--db", "--storage-url", "--storage-retention-days"):
        assert flag in out
    for foreign in ("--server-port", "--signals-", "--bot-", "--janus-", "--model-"):
        assert foreign not in out, foreign
    assert out.count("\n  --") < 20
