"""Operating the bot: /metrics on the server and a worker, JSON logs that name no student, and a SIGTERM
(docker stop) that writes every accepted row before the process exits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bot.simulate import free_port
from bot.students import SimulatedStudent, no_face_frames
from core import logs
from tests.spine import eventually, start_class, stop_class

PROJECT = Path(__file__).resolve().parent.parent
STUDENT_NAME = "Zelda Quuxington"


def metric_values(text: str) -> dict[str, float]:
    """{sample name: value} of a Prometheus text page (parsed by the client library's own parser)."""
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples}


async def scrape(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        return metric_values(await response.text())


async def test_metrics_of_a_class_in_progress(tmp_path):
    live = await start_class(tmp_path, model={"model": "scripted:happy"})
    try:
        from bot import metrics as bot_metrics
        from signaling.metrics import METRICS_KEY
        bot_metrics.install(live.runner.app[METRICS_KEY], live.service, with_storage=False)   # as `bot run` does
        await live.create_room()
        await live.invite_bot()
        await live.add_student(STUDENT_NAME, None)
        assert await eventually(lambda: live.repository.stats()["accepted_samples"] >= 3, timeout=30)
        values = await scrape(live.server + "/metrics")
        assert values["classmood_rooms"] == 1 and values["classmood_workers"] == 1
        assert values["classmood_students_connected"] == 1 and values["classmood_students_analysed"] == 1
        assert values["classmood_samples_total"] >= 3
        assert values["classmood_inference_round_seconds_count"] >= 1
        assert values["classmood_frames_dropped_total"] >= 0 and values["classmood_db_errors_total"] == 0
        assert "classmood_writer_backlog" in values
    finally:
        await stop_class(live)


async def test_a_separate_worker_serves_its_own_metrics(tmp_path):
    live = await start_class(tmp_path)
    port = free_port()
    env = {**os.environ, "CLASSMOOD_STORAGE_URL": f"sqlite:///{tmp_path / 'worker.sqlite'}",
           "CLASSMOOD_SERVER_WORKER_KEY": live.settings.server.worker_key, "CLASSMOOD_MODEL_MODEL": "scripted:happy"}
    worker = subprocess.Popen([sys.executable, "-m", "bot", "worker", "--server", live.server, "--metrics-port",
                               str(port)], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def worker_metrics() -> dict[str, float] | None:
            try:
                return await scrape(f"http://127.0.0.1:{port}/metrics")
            except aiohttp.ClientConnectionError:
                return None
        values = None
        for _ in range(300):
            values = await worker_metrics()
            if values is not None or worker.poll() is not None:
                break
            await asyncio.sleep(0.1)
        assert values is not None, worker.stderr.read().decode() if worker.poll() is not None else "no metrics"
        assert values["classmood_bot_rooms"] == 0 and values["classmood_writer_backlog"] == 0
        assert "classmood_rooms" not in values          # the server's metrics are the server's
    finally:
        worker.terminate()
        worker.wait(20)
        await stop_class(live)
    assert worker.returncode == 0


def test_json_logs_are_one_object_per_line_tracebacks_included(capsys):
    import logging
    logs.configure("INFO", "json")
    try:
        logging.getLogger("classmood.test").info("first\nsecond")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("classmood.test").exception("failed")
    finally:
        logs.configure("INFO", "text")
    lines = capsys.readouterr().err.strip().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("INFO", "classmood.test", "first\nsecond"), ("ERROR", "classmood.test", "failed")]
    assert "ValueError: boom" in entries[1]["exc"] and entries[0]["time"].endswith("Z")


async def test_sigterm_to_bot_run_writes_every_pending_row_and_logs_no_student_name(tmp_path):
    db = tmp_path / "classmood.sqlite"
    port = free_port()
    env = {**os.environ, "CLASSMOOD_SERVER_PORT": str(port), "CLASSMOOD_STORAGE_URL": f"sqlite:///{db}",
           "CLASSMOOD_JANUS_MODE": "off", "CLASSMOOD_MODEL_MODEL": "scripted:happy",
           # An hour between commits: every sample row is still in memory when the signal comes.
           "CLASSMOOD_STORAGE_FLUSH_SECONDS": "3600"}
    ready, stats = tmp_path / "ready.json", tmp_path / "stats.json"
    bot = subprocess.Popen([sys.executable, "-m", "bot", "run", "--ready-file", str(ready), "--stats-file", str(stats),
                            "--log-format", "json"], cwd=PROJECT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    student = None
    try:
        assert await eventually(lambda: ready.exists() or bot.poll() is not None, timeout=60)
        assert bot.poll() is None, bot.stderr.read()
        room = json.loads(ready.read_text())
        server = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{server}/api/rooms/{room['room']}/invite",
                                 headers={"Authorization": f"Bearer {room['teacher_token']}"}) as response:
                assert response.status == 200
        student = SimulatedStudent(server, room["room"], room["student_url"].split("k=", 1)[1], STUDENT_NAME,
                                   no_face_frames(), 5.0, True)
        await student.join()
        backlog: dict[str, float] = {}

        async def samples_pending() -> bool:
            backlog.update(await scrape(server + "/metrics"))
            return backlog.get("classmood_samples_total", 0) >= 5 and backlog["classmood_writer_backlog"] >= 5
        for _ in range(300):
            if await samples_pending():
                break
            await asyncio.sleep(0.1)
        assert backlog["classmood_writer_backlog"] >= 5, backlog
        bot.send_signal(signal.SIGTERM)                            # what `docker stop` sends
        await asyncio.to_thread(bot.wait, 60)
    finally:
        if student is not None:
            await student.leave()
        if bot.poll() is None:
            bot.kill()
            bot.wait()
    log_lines = bot.stderr.read().splitlines()
    assert bot.returncode == 0, "\n".join(log_lines[-20:])
    report = json.loads(stats.read_text())["storage"]
    con = sqlite3.connect(db)
    try:
        in_database = con.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        names = [name for name, in con.execute("SELECT name FROM participants")]
    finally:
        con.close()
    assert in_database == report["accepted_samples"] >= 5 and report["lost"] == 0 and report["pending"] == 0
    assert names == [STUDENT_NAME]                                 # the name is in the database, which erasure covers ...
    assert not any(STUDENT_NAME in line for line in log_lines)     # ... and nowhere in the logs
    # Every Python log record is one JSON object; LiteRT's C++ prints a line of its own ("INFO: Created
    # TensorFlow Lite XNNPACK delegate") straight to stderr, past Python's logging.
    entries = [json.loads(line) for line in log_lines if line.startswith("{")]
    assert [line for line in log_lines if not line.startswith("{") and "TensorFlow Lite" not in line] == []
    assert any(entry["logger"] == "classmood.bot.room" and "joined" in entry["message"] for entry in entries)


def test_the_ready_and_stats_files_appear_whole_or_not_at_all(tmp_path, monkeypatch):
    # Scripts poll for --ready-file and read it once it exists: a file created empty and written afterwards
    # was read empty once (CI, 2026-12-01). While the JSON is written, the file must not exist yet.
    import bot.__main__ as bot_main
    target = tmp_path / "ready.json"
    seen_while_writing: list[object] = []
    real_dump = json.dump

    def watching_dump(data, f):
        seen_while_writing.append(target.read_text() if target.exists() else None)
        real_dump(data, f)
    monkeypatch.setattr(bot_main.json, "dump", watching_dump)
    bot_main.write_json_file(str(target), {"home": "http://127.0.0.1:8765/"})
    assert seen_while_writing == [None]
    assert json.loads(target.read_text()) == {"home": "http://127.0.0.1:8765/"}
    assert [p.name for p in tmp_path.iterdir()] == ["ready.json"], "no temporary file left behind"
