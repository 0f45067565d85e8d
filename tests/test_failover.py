"""Several bot workers, and a crash that does not end the class (issue 19, item 3).

Rooms are held by bot workers under leases in the database (room_assignments). These tests run the real
server, real `python -m bot worker` processes, real aiortc students and a real database (SQLite, and the
PostgreSQL that tests/postgres.py starts); a worker is killed with SIGKILL, as a crash would.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import text

from bot.simulate import free_port
from bot.students import EncodedClip, SimulatedStudent, load_video_frames
from core.settings import Settings
from signaling.server import REGISTRY_KEY, create_app
from storage import Repository
from tests.postgres import BACKENDS, postgres_server, url_for  # noqa: F401  (postgres_server: a fixture)
from tests.spine import PROJECT, VIDEOS, eventually, start_class, stop_class

WORKER_KEY = "failover-test-worker-key"
STUDENTS = 10


# ---- the leases themselves, on both databases (no processes, no clocks: times are passed in) ----------
@pytest.fixture(params=BACKENDS)
def repository(request, tmp_path):
    repo = Repository(url_for(request.param, request, tmp_path))
    yield repo
    repo.close()


def test_an_expired_lease_is_claimed_once_and_the_old_holder_learns_it_lost_the_room(repository):
    repository.assign_room("r1", "worker-a", lease_until=100.0, session_id="s1")
    assert repository.claim_expired_room("worker-b", now=50.0, lease_until=200.0) is None, "a live lease stays"
    assert repository.renew_leases("worker-a", {"r1": ("s1", 10)}, lease_until=150.0) == []

    claimed = repository.claim_expired_room("worker-b", now=160.0, lease_until=200.0)
    assert claimed is not None and claimed["worker_id"] == "worker-a" and claimed["session_id"] == "s1"
    assert repository.claim_expired_room("worker-c", now=160.0, lease_until=200.0) is None, "claimed only once"

    assert repository.renew_leases("worker-a", {"r1": ("s1", 10)}, lease_until=300.0) == ["r1"]
    [row] = repository.room_assignments("r1")
    assert (row["worker_id"], row["lease_until"], row["session_id"], row["students"]) == ("worker-b", 200.0, "s1", 10)


def test_released_rooms_are_not_claimed_and_a_worker_shutting_down_hands_its_rooms_over(repository):
    repository.assign_room("ended", "worker-a", lease_until=10.0)
    assert repository.release_room("ended", "worker-b") is False, "only the holder's release counts"
    assert repository.release_room("ended")
    assert repository.claim_expired_room("worker-b", now=1e12, lease_until=2e12) is None
    assert repository.renew_leases("worker-a", {"ended": (None, 0)}, lease_until=20.0) == [], "nothing to lose"

    repository.assign_room("r2", "worker-a", lease_until=1e12)
    assert repository.expire_leases("worker-a") == 1
    assert repository.claim_expired_room("worker-b", now=time.time(), lease_until=2e12)["room_id"] == "r2"


def test_concurrent_claims_hand_each_room_to_exactly_one_claimer(repository):
    for i in range(6):
        repository.assign_room(f"r{i}", "dead", lease_until=1.0)
    won: list[str] = []

    async def claim_all(worker: str) -> None:
        while (row := await asyncio.to_thread(repository.claim_expired_room, worker, 10.0, 99.0)) is not None:
            won.append(row["room_id"])

    async def race() -> None:
        await asyncio.gather(*(claim_all(f"w{i}") for i in range(3)))
    asyncio.run(race())
    assert sorted(won) == [f"r{i}" for i in range(6)]


# ---- a class that survives its worker ---------------------------------------------------------------
def start_worker(tmp_path: Path, name: str, server: str, url: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"{name}.json"
    log = open(tmp_path / f"{name}.log", "w")
    cmd = [sys.executable, "-m", "bot", "worker", "--server", server, "--ready-file", str(ready),
           "--server-worker-key", WORKER_KEY, "--storage-url", url, "--model-model", "scripted:neutral"]
    return subprocess.Popen(cmd, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT), ready


async def worker_id_of(ready: Path, process: subprocess.Popen) -> str:
    for _ in range(1200):
        if ready.exists() and ready.read_text():
            return str(json.loads(ready.read_text())["worker_id"])
        assert process.poll() is None, f"the worker exited with {process.returncode}"
        await asyncio.sleep(0.1)
    raise AssertionError("the worker did not connect within 120 s")


def query(repository: Repository, sql: str, **params: Any) -> list[Any]:
    repository.flush()
    with repository.engine.connect() as conn:
        return list(conn.execute(text(sql), params).all())


@pytest.mark.skipif(not VIDEOS.exists(), reason=f"{VIDEOS} not found: the shared media folder is absent")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_killed_worker_loses_its_class_to_another_which_continues_the_same_session(backend, request, tmp_path):
    url = url_for(backend, request, tmp_path)
    port = free_port()
    settings = Settings().replace(server={"port": port, "worker_key": WORKER_KEY}, storage={"url": url})
    repository = Repository.from_settings(settings.storage)
    runner = web.AppRunner(create_app(settings, store=repository))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    server = f"http://127.0.0.1:{port}"
    registry = runner.app[REGISTRY_KEY]
    workers: dict[str, subprocess.Popen] = {}
    students: list[SimulatedStudent] = []
    http = aiohttp.ClientSession()
    try:
        for name in ("a", "b"):
            process, ready = start_worker(tmp_path, name, server, url)
            workers[await worker_id_of(ready, process)] = process
        async with http.post(server + "/api/rooms", json={"title": "failover"}) as r:
            room = await r.json()
        room_id, auth = room["room"], {"Authorization": f"Bearer {room['teacher_token']}"}
        async with http.post(f"{server}/api/rooms/{room_id}/invite", headers=auth) as r:
            holder = (await r.json())["worker"]
        survivor = next(w for w in workers if w != holder)
        clip = EncodedClip(load_video_frames(VIDEOS / "woman2.mp4", 320, 240, 5.0), 5.0)
        key = room["student_url"].split("k=", 1)[1]
        for i in range(STUDENTS):
            student = SimulatedStudent(server, room_id, key, f"Student {i + 1:02d}", clip, 5.0, offset=i * 3)
            await student.join()
            students.append(student)
        await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in students)), 60)

        def per_student(where: str = "", **params: Any) -> dict[str, list[Any]]:
            rows = query(repository, "SELECT participant_id, t, stored_at FROM samples WHERE session_id = :sid "
                                     + where + " ORDER BY t", sid=session_id, **params)
            out: dict[str, list[Any]] = {}
            for pid, t, stored_at in rows:
                out.setdefault(pid, []).append((t, stored_at))
            return out
        await eventually(lambda: registry.get(room_id).session_id is not None, 20)
        session_id = registry.get(room_id).session_id
        assert await eventually(lambda: len(per_student()) == STUDENTS
                                and min(map(len, per_student().values())) >= 4, 30), "the class was not analysed"

        # The worker holding the class dies without a word.
        t_kill = time.time()
        workers[holder].send_signal(signal.SIGKILL)
        workers[holder].wait(10)

        def continued() -> bool:
            [lease] = repository.room_assignments(room_id)
            after = per_student("AND t > :t", t=t_kill)
            return lease["worker_id"] == survivor and len(after) == STUDENTS
        assert await eventually(continued, 10.0), "the class must continue on the other worker within 10 s"
        recovery_s = time.time() - t_kill

        sessions = query(repository, "SELECT session_id, ended_at FROM sessions WHERE room_id = :r", r=room_id)
        assert sessions == [(session_id, None)], "the same session goes on, still open"
        assert registry.get(room_id).session_id == session_id

        # What the crash cost: the rows the dead worker had analysed but not yet committed. Its writer commits
        # every storage.flush_seconds, so each student's last stored sample before the kill is at most one
        # sample period plus one frame-to-row time (analysis + waiting for the batch) old.
        before = {pid: rows for pid, rows in per_student("AND t <= :t", t=t_kill).items()}
        frame_to_row = max(stored - t for rows in before.values() for t, stored in rows)
        period = 1.0 / settings.bot.sample_hz
        gaps = {pid: t_kill - rows[-1][0] for pid, rows in before.items()}
        assert max(gaps.values()) <= period + frame_to_row + 0.5, gaps
        lost_estimate = sum(int(gap * settings.bot.sample_hz) for gap in gaps.values())
        duplicates = query(repository, "SELECT participant_id, t FROM samples WHERE session_id = :sid "
                                       "GROUP BY participant_id, t HAVING COUNT(*) > 1", sid=session_id)
        assert duplicates == [], "no sample may be stored twice"
        print(f"\n[{backend}] recovery {recovery_s:.1f} s after kill -9; last stored sample per student "
              f"{min(gaps.values()):.2f}-{max(gaps.values()):.2f} s before the kill (flush every "
              f"{settings.storage.flush_seconds} s, max frame-to-row {frame_to_row:.2f} s): about {lost_estimate} "
              f"sample rows lost for {STUDENTS} students; no duplicates")

        # A worker that comes back takes the next class (the survivor carries ten students).
        process, ready = start_worker(tmp_path, "c", server, url)
        back = await worker_id_of(ready, process)
        workers[back] = process
        async with http.post(server + "/api/rooms", json={"title": "next class"}) as r:
            second = await r.json()
        async with http.post(f"{server}/api/rooms/{second['room']}/invite",
                             headers={"Authorization": f"Bearer {second['teacher_token']}"}) as r:
            assert (await r.json())["worker"] == back
    finally:
        for student in students:
            await student.leave()
        for process in workers.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in workers.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
        await http.close()
        await runner.cleanup()
        repository.close()


async def test_a_worker_whose_room_was_given_to_another_leaves_it_without_ending_the_session(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        room_id = live.room["room"]
        registry = live.runner.app[REGISTRY_KEY]
        assert live.service.worker_id in registry.workers, "the server knows the worker by its own id"
        [lease] = live.repository.room_assignments(room_id)
        assert lease["worker_id"] == live.service.worker_id
        session = live.service.peers[room_id].room.session_id

        # Another server gave the room to another worker (this one was frozen past its lease).
        live.repository.assign_room(room_id, "another-worker", lease_until=time.time() + 60)
        assert await eventually(lambda: room_id not in live.service.peers, 10), "the worker must leave the room"
        assert live.rows("SELECT ended_at FROM sessions WHERE session_id = ?", session) == [(None,)], \
            "the class goes on elsewhere: its session stays open"
        assert live.repository.room_assignments(room_id)[0]["worker_id"] == "another-worker"
    finally:
        await stop_class(live)


async def test_a_class_that_ends_releases_its_room_so_nobody_is_sent_back(tmp_path):
    live = await start_class(tmp_path)
    try:
        await live.create_room()
        await live.invite_bot()
        room_id = live.room["room"]
        assert live.repository.room_assignments(room_id) != []
        async with live.http.post(f"{live.server}/api/rooms/{room_id}/end",
                                  headers={"Authorization": f"Bearer {live.token}"}) as r:
            assert r.status == 200
        assert live.repository.room_assignments(room_id) == []
    finally:
        await stop_class(live)
