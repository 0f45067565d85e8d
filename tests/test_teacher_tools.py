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


def test_admin_teacher_link_prints_a_new_link_and_revokes_the_old_token(tmp_path):
    from signaling.auth import token_hash
    from storage import Repository
    db = tmp_path / "classmood.sqlite"
    with Repository(f"sqlite:///{db}") as repo:
        repo.create_room("room1", "Maths", "joinkey123", token_hash("the-old-token"))
    command = [sys.executable, "-m", "signaling.admin", "teacher-link", "room1", "--storage-url", f"sqlite:///{db}",
               "--server-public-url", "https://class.example.org/"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    link = done.stdout.strip()
    assert link.startswith("https://class.example.org/teach/room1#t=")
    token = link.split("#t=", 1)[1]
    with Repository(f"sqlite:///{db}") as repo:
        stored = repo.get_room("room1")["teacher_token_hash"]
    assert stored == token_hash(token) and stored != token_hash("the-old-token")
    assert "review: https://class.example.org/review/room1#t=" + token in done.stderr

    unknown = subprocess.run([*command[:4], "nosuchroom", *command[5:]], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "no room nosuchroom" in unknown.stderr
    missing = subprocess.run([*command[:5], "--storage-url", f"sqlite:///{tmp_path / 'none.sqlite'}"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "not found" in missing.stderr
    assert not (tmp_path / "none.sqlite").exists(), "a typo in the path must not create an empty database"
