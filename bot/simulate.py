"""Load harness: a real server + bot (one subprocess, as deployed) and N simulated students (real
aiortc peers in this process) streaming a video; prints a summary read back from the database.

    python -m bot.simulate --students 50 --seconds 60 --video ../shared/media/videos/short_hamilton_clip.mp4 --json

The last line with --json is one JSON object: students, samples, samples_per_student_per_s,
p50/p95_frame_to_row_s, alerts, alert_latency_s, bot_cpu_percent, bot_peak_rss_mb, frames_dropped,
errors, rows_lost, ...
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
import numpy as np

from bot.students import EncodedClip, SimulatedStudent, load_video_frames, no_face_frames
from core import settings as settings_mod

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_VIDEO = PROJECT.parent / "shared" / "media" / "videos" / "short_hamilton_clip.mp4"
log = logging.getLogger("classmood.simulate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bot.simulate", description=__doc__.split("\n\n")[0])
    p.add_argument("--students", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--video", default=str(DEFAULT_VIDEO), help="video each simulated student streams")
    p.add_argument("--db", default=None, help="SQLite file (default: a new temporary file)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    p.add_argument("--churn", action="store_true", help="students leave and rejoin at random")
    p.add_argument("--no-face-students", type=int, default=0, help="how many of the students stream a no-face track")
    p.add_argument("--opt-out-students", type=int, default=0, help="how many of the students opt out of analysis")
    p.add_argument("--pattern", default=None,
                   help="make the bot use scripted expressions (confused|bored|happy|neutral) on the faces it finds")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--live-encode", action="store_true",
                   help="every student runs its own VP8 encoder on this machine (as if the students' laptops "
                        "were this machine), instead of sending one shared clip encoded once")
    p.add_argument("--sample-hz", type=float, default=None, help="bot sampling rate (default: the bot's setting)")
    p.add_argument("--bot-arg", action="append", default=[], help="extra flag for the bot process, e.g. --bot-arg=--signals-student-min-seconds=5")
    p.add_argument("--keep-log", default=None, help="write the bot's log here")
    p.add_argument("--via", choices=("direct", "janus"), default="direct",
                   help="direct: students send video to the bot (default); janus: a meeting on an embedded Janus "
                        "(students publish to it, the bot subscribes; Janus's own CPU is reported too)")
    return p.parse_args(argv)


def bot_settings_flags(args: argparse.Namespace, port: int, db: Path) -> list[str]:
    """The settings the bot process runs with (its core.settings flags, --bot-arg last so they win)."""
    flags = ["--server-port", str(port), "--server-host", "127.0.0.1",
             "--storage-url", f"sqlite:///{db}", "--server-max-participants-per-room", str(max(200, args.students + 10)),
             "--server-video-width", str(args.width), "--server-video-height", str(args.height),
             "--server-video-fps", str(int(args.fps)),
             "--janus-mode", "embedded" if args.via == "janus" else "off"]
    if args.pattern:
        flags += ["--model-model", f"scripted:{args.pattern}"]
    if args.sample_hz:
        flags += ["--bot-sample-hz", str(args.sample_hz)]
    return flags + args.bot_arg


def check_bot_settings(args: argparse.Namespace) -> None:
    """Validate the bot's settings here, before any file or process exists: a bad --bot-arg or --sample-hz
    is a one-line error and exit 2, not a bot that dies during start-up. Raises ValueError."""
    from bot.__main__ import _parser, check_model
    try:
        ns = _parser().parse_args(["run", *bot_settings_flags(args, 0, Path("check.sqlite"))])
    except SystemExit:       # argparse has printed what is wrong with the flag
        raise ValueError("a --bot-arg is not a flag of `python -m bot run`") from None
    check_model(settings_mod.load(ns))


class ProcessMonitor:
    """CPU seconds and peak RSS of the bot process, sampled twice a second."""

    def __init__(self, pid: int) -> None:
        import psutil
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self.cpu_start = self._cpu()
        self.t_start = time.monotonic()
        self.cpu_end = self.cpu_start
        self.t_end = self.t_start

    def _cpu(self) -> float:
        try:
            times = self.process.cpu_times()
            return times.user + times.system + getattr(times, "children_user", 0) + getattr(times, "children_system", 0)
        except Exception:
            return self.cpu_end if hasattr(self, "cpu_end") else 0.0

    def reset(self) -> None:
        self.cpu_start, self.t_start = self._cpu(), time.monotonic()

    async def run(self) -> None:
        while True:
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                self.cpu_end, self.t_end = self._cpu(), time.monotonic()
            except Exception:
                return
            await asyncio.sleep(0.5)

    def cpu_percent(self) -> float:
        return 100.0 * (self.cpu_end - self.cpu_start) / max(1e-6, self.t_end - self.t_start)


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    decoded = load_video_frames(args.video, args.width, args.height, args.fps)
    no_face = no_face_frames(args.width, args.height)
    frames: list[np.ndarray] | EncodedClip = decoded if args.live_encode else EncodedClip(decoded, args.fps)
    blank: list[np.ndarray] | EncodedClip = no_face if args.live_encode else EncodedClip(no_face, args.fps)
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="classmood-sim-")) / "classmood.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="classmood-bot-"))
    ready_file, stats_file = workdir / "ready.json", workdir / "stats.json"
    log_path = Path(args.keep_log) if args.keep_log else workdir / "bot.log"
    env = dict(os.environ, CLASSMOOD_LOG_LEVEL=os.environ.get("CLASSMOOD_LOG_LEVEL", "INFO"))
    cmd = [sys.executable, "-m", "bot", "run", "--no-room", "--ready-file", str(ready_file),
           "--stats-file", str(stats_file), *bot_settings_flags(args, port, db)]
    log_file = open(log_path, "w")
    bot = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    monitor = ProcessMonitor(bot.pid)
    monitor_task = asyncio.ensure_future(monitor.run())
    janus_monitor: ProcessMonitor | None = None
    janus_task: asyncio.Task | None = None
    students: list[SimulatedStudent] = []
    teacher_alerts: list[dict[str, Any]] = []
    teacher_states = 0
    errors: list[str] = []
    leaked_sets: list[set[str]] = []
    try:
        deadline = time.monotonic() + 120
        while not ready_file.exists():
            if bot.poll() is not None:
                raise RuntimeError(f"bot exited with code {bot.returncode} before serving; log: {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("bot did not start within 120 s")
            await asyncio.sleep(0.2)
        if args.via == "janus":
            janus_monitor = ProcessMonitor(janus_child(bot.pid))
            janus_task = asyncio.ensure_future(janus_monitor.run())
        async with aiohttp.ClientSession() as http:
            async with http.post(server + "/api/rooms", json={"title": "simulated class"}) as r:
                room = await r.json()
            room_id, token = room["room"], room["teacher_token"]
            key = room["student_url"].split("k=", 1)[1]
            teacher = await http.ws_connect(server.replace("http", "ws") + "/ws")
            await teacher.send_json({"v": 1, "type": "hello", "role": "teacher", "room": room_id, "token": token})

            async def read_teacher() -> None:
                nonlocal teacher_states
                async for msg in teacher:
                    data = json.loads(msg.data)
                    if data.get("type") == "alert":
                        teacher_alerts.append({**data["alert"], "received_at": time.time()})
                    elif data.get("type") == "state":
                        teacher_states += 1
            teacher_task = asyncio.ensure_future(read_teacher())
            async with http.post(f"{server}/api/rooms/{room_id}/invite",
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                if r.status != 200:
                    raise RuntimeError(f"invite failed: HTTP {r.status} {await r.text()}")

            def make_student(i: int) -> SimulatedStudent:
                face = i >= args.no_face_students
                analysis = i >= args.no_face_students + args.opt_out_students or i < args.no_face_students
                return SimulatedStudent(server, room_id, key, f"Student {i + 1:02d}", frames if face else blank,
                                        args.fps, analysis=analysis, offset=i * 3)

            students = [make_student(i) for i in range(args.students)]
            for s in students:
                await s.join()
                await asyncio.sleep(0.02)
            analysed = [s for s in students if s.analysis]
            try:
                await asyncio.wait_for(asyncio.gather(*(s.connected.wait() for s in analysed)), 60)
            except asyncio.TimeoutError:
                errors.append(f"{sum(not s.connected.is_set() for s in analysed)} students did not connect in 60 s")
            started = time.time()
            monitor.reset()
            if janus_monitor is not None:
                janus_monitor.reset()
            churn_task = asyncio.ensure_future(churn(students, make_student)) if args.churn else None
            await asyncio.sleep(args.seconds)
            ended = time.time()
            if churn_task:
                churn_task.cancel()
            student_saw = set().union(*(s.message_types() for s in students)) if students else set()
            leaked = student_saw & {"state", "alert", "participant", "control"}
            leaked_sets.append(leaked)
            if leaked:
                errors.append(f"students received teacher-only messages: {sorted(leaked)}")
            for s in students:
                await s.leave()
            await asyncio.sleep(0.5)
            teacher_task.cancel()
            await teacher.close()
    finally:
        if bot.poll() is None:
            bot.send_signal(signal.SIGTERM)
            try:
                bot.wait(30)
            except subprocess.TimeoutExpired:
                bot.kill()
                errors.append("bot did not stop within 30 s of SIGTERM")
        monitor_task.cancel()
        if janus_task is not None:
            janus_task.cancel()
        log_file.close()
    if bot.returncode not in (0, -signal.SIGTERM):
        errors.append(f"bot exited with code {bot.returncode}")
    bot_log = log_path.read_text(errors="replace")
    error_lines = [line for line in bot_log.splitlines() if " ERROR " in line or "Traceback" in line]
    bot_stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    summary = summarise(db, room_id, started, ended, args, bot_stats)
    leaked = set().union(*leaked_sets) if leaked_sets else set()
    delivery = sorted(a["received_at"] - float(a.get("t") or 0) for a in teacher_alerts)
    summary.update({
        "alerts_received_by_teacher": len(teacher_alerts), "teacher_state_messages": teacher_states,
        # From the frame at which an alert's condition first held (the alert's t) to the teacher's socket.
        "alert_latency_s": round(delivery[-1], 3) if delivery else None,
        "teacher_alerts": [{k: a.get(k) for k in ("level", "kind", "name", "message")} for a in teacher_alerts][:50],
        "students_received_teacher_data": sorted(leaked),
        "bot_cpu_percent": round(monitor.cpu_percent(), 1), "bot_peak_rss_mb": round(monitor.peak_rss / 2**20, 1),
        "via": args.via,
        "janus_cpu_percent": round(janus_monitor.cpu_percent(), 1) if janus_monitor else None,
        "janus_peak_rss_mb": round(janus_monitor.peak_rss / 2**20, 1) if janus_monitor else None,
        "errors": len(errors) + len(error_lines) + int(bot_stats.get("frame_errors", 0) or 0),
        "error_messages": (errors + error_lines)[:20], "db": str(db), "bot_log": str(log_path),
    })
    return summary


def janus_child(bot_pid: int) -> int:
    """The embedded Janus that the bot process started (its child)."""
    import psutil
    for child in psutil.Process(bot_pid).children(recursive=True):
        if child.name().startswith("janus"):
            return int(child.pid)
    raise RuntimeError("--via janus: the bot runs no Janus child process (is janus installed?)")


async def churn(students: list[SimulatedStudent], make_student: Callable[[int], SimulatedStudent]) -> None:
    """Every ~2 s one random student leaves; 1-3 s later a new connection with that name rejoins."""
    rng = random.Random(11)
    while True:
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        i = rng.randrange(len(students))
        old = students[i]
        await old.leave()
        await asyncio.sleep(rng.uniform(1.0, 3.0))
        new = make_student(i)
        students[i] = new
        try:
            await new.join()
        except Exception as exc:
            log.warning("rejoin failed: %s", exc)


def summarise(db: Path, room_id: str, started: float, ended: float, args: argparse.Namespace,
              bot_stats: dict[str, Any]) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        session = con.execute("SELECT session_id FROM sessions WHERE room_id = ? ORDER BY started_at DESC LIMIT 1",
                              (room_id,)).fetchone()
        sid = session[0] if session else None
        rows = con.execute("SELECT s.participant_id, p.name, s.t, s.face_found, s.latency_s, s.stored_at FROM samples s "
                           "JOIN participants p ON p.participant_id = s.participant_id AND p.session_id = s.session_id "
                           "WHERE s.session_id = ?", (sid,)).fetchall()
        alerts = con.execute("SELECT level, kind, t FROM alerts WHERE session_id = ?", (sid,)).fetchall()
    finally:
        con.close()
    window = [r for r in rows if started <= r[2] <= ended]
    by_student: dict[str, list[float]] = {}
    for pid, _, t, *_ in window:
        by_student.setdefault(pid, []).append(t)
    period = 1.0 / (args.sample_hz or float(bot_stats.get("sample_hz", 2.0)))
    # Rate over each connection's own active span (a churned student is away part of the time).
    rates = [len(ts) / (max(ts) - min(ts) + period) for ts in by_student.values() if len(ts) >= 2]
    latencies = sorted((r[5] - r[2]) for r in rows if r[5] is not None)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    accepted = int(bot_stats.get("samples_accepted", len(rows)) or 0)
    names = {r[1] for r in rows}
    return {
        "students": args.students, "samples": len(rows), "samples_in_window": len(window),
        "samples_per_student_per_s": round(sum(rates) / len(rates), 3) if rates else 0.0,
        "min_samples_per_student_per_s": round(min(rates), 3) if rates else 0.0,
        "students_with_samples": len(names), "faces_found": sum(1 for r in rows if r[3]),
        "p50_frame_to_row_s": pct(latencies, 0.5), "p95_frame_to_row_s": pct(latencies, 0.95),
        "alerts": len(alerts), "alert_kinds": sorted({f"{a[0]}:{a[1]}" for a in alerts}),
        "frames_dropped": bot_stats.get("frames_dropped"), "rows_lost": max(0, accepted - len(rows)) + int(bot_stats.get("storage", {}).get("lost", 0) or 0),
        "session_id": sid, "seconds": args.seconds, "churn": args.churn, "live_encode": args.live_encode,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not Path(args.video).exists():
        print(f"error: video {args.video} not found", file=sys.stderr)
        return 2
    if args.students < 1 or args.seconds <= 0:
        print("error: --students must be >= 1 and --seconds > 0", file=sys.stderr)
        return 2
    try:
        check_bot_settings(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(simulate(args))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
