"""A whole class on loopback for tests: the real signaling server, the real bot service (worker +
inference thread), a real SQLite file, and simulated students as real aiortc peers."""
from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from bot.media_server import MediaServer, open_media_server
from bot.service import BotService
from bot.simulate import free_port
from bot.students import SimulatedStudent, load_video_frames, no_face_frames
from core.faces import Faces
from core.settings import Settings
from signaling.server import ServerRunner, create_app
from storage import Repository

PROJECT = Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / "shared"
VIDEOS = SHARED / "media" / "videos"


@dataclass
class LiveClass:
    settings: Settings
    repository: Repository
    service: BotService
    server: str
    db: Path
    runner: web.AppRunner
    worker: asyncio.Task
    http: aiohttp.ClientSession
    room: dict[str, Any] = field(default_factory=dict)
    students: list[SimulatedStudent] = field(default_factory=list)
    media: MediaServer | None = None     # the embedded Janus of a meeting (start_class(janus=True))

    @property
    def key(self) -> str:
        return self.room["student_url"].split("k=", 1)[1]

    @property
    def token(self) -> str:
        return self.room["teacher_token"]

    async def create_room(self) -> dict[str, Any]:
        async with self.http.post(self.server + "/api/rooms", json={"title": "test class"}) as r:
            assert r.status == 200, await r.text()
            self.room = await r.json()
        return self.room

    async def invite_bot(self) -> None:
        async with self.http.post(f"{self.server}/api/rooms/{self.room['room']}/invite",
                                  headers={"Authorization": f"Bearer {self.token}"}) as r:
            assert r.status == 200, await r.text()
        for _ in range(100):
            peer = self.service.peers.get(self.room["room"])
            if peer is not None and peer.joined.is_set():
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the bot did not join the room")

    async def add_student(self, name: str, video: Path | None, analysis: bool = True) -> SimulatedStudent:
        frames = load_video_frames(video, 320, 240, 5.0) if video else no_face_frames()
        student = SimulatedStudent(self.server, self.room["room"], self.key, name, frames, 5.0, analysis)
        await student.join()
        self.students.append(student)
        return student

    def rows(self, sql: str, *params: Any) -> list[tuple]:
        self.repository.flush()
        con = sqlite3.connect(self.db)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def samples_of(self, student: SimulatedStudent) -> list[tuple]:
        return self.rows("SELECT t, face_found, top_label FROM samples WHERE participant_id = ? ORDER BY t",
                         student.peer_id)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll `condition` every 0.1 s until it holds (True) or `timeout` seconds pass (False)."""
    for _ in range(max(1, int(timeout * 10))):
        if condition():
            return True
        await asyncio.sleep(0.1)
    return condition()


async def start_class(tmp_path: Path, janus: bool = False, **overrides: dict[str, Any]) -> LiveClass:
    """janus=True: the room is a meeting on a real Janus from the Debian package (started here)."""
    port = free_port()
    db = tmp_path / "classmood.sqlite"
    settings = Settings().replace(server={"port": port, **overrides.get("server", {})},
                                  storage={"url": f"sqlite:///{db}", **overrides.get("storage", {})},
                                  **{k: v for k, v in overrides.items() if k not in ("server", "storage")})
    repository = Repository.from_settings(settings.storage)
    media = None
    if janus:
        require_janus()
        media = await open_media_server(settings.replace(janus={"mode": "embedded"}))
    runner = ServerRunner(create_app(settings, store=repository, sfu=media.sfu if media else None))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server = f"http://127.0.0.1:{port}"
    service = BotService(settings, repository)
    await service.start()
    ready = asyncio.Event()
    worker = asyncio.ensure_future(service.serve_worker(server, settings.server.worker_key, ready))
    await asyncio.wait_for(ready.wait(), 10)
    return LiveClass(settings, repository, service, server, db, runner, worker, aiohttp.ClientSession(), media=media)


def require_janus() -> None:
    """Skip where Janus is not installed; in CI (where scripts/test.sh installs it) that is a failure."""
    if shutil.which("janus") or Path("/usr/bin/janus").exists():
        return
    if os.environ.get("CI"):
        raise AssertionError("janus is not installed although scripts/setup.sh --with-janus should have installed it")
    pytest.skip("Janus is not installed (scripts/test.sh installs it with apt)")


async def stop_class(live: LiveClass) -> None:
    for student in live.students:
        await student.leave()
    await live.service.stop()
    live.worker.cancel()
    await live.http.close()
    await live.runner.cleanup()
    if live.media is not None:
        await live.media.close()
    live.repository.close()


def one_face_per_frame(frames: list[np.ndarray], keys: object = None) -> Faces:
    """A stand-in analyser: one face in every frame, happy."""
    n = len(frames)
    boxes = np.tile(np.array([[10, 10, 40, 40]], np.float32), (n, 1))
    kps = np.tile(np.array([[[18, 20], [32, 20], [25, 27], [25, 34], [12, 22], [38, 22]]], np.float32), (n, 1, 1))
    return Faces(boxes, np.full(n, 0.9, np.float32), kps, np.arange(n, dtype=np.int32),
                 np.tile(np.eye(7, dtype=np.float32)[3], (n, 1)))
