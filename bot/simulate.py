"""Load harness: a real server + bot (one subprocess, as deployed) and N simulated students (real
aiortc peers in this process) streaming a video; prints a summary read back from the database.

    python -m bot.simulate --students 50 --seconds 60 --video ../shared/media/videos/short_hamilton_clip.mp4 --json

The last line with --json is one JSON object: students, samples, samples_per_student_per_s (over each
student's own span of samples), window_samples_per_student_per_s (over the whole window: a student analysed
half of it counts half), connections_lost (the students' side) and bot_connections_lost (the bot's: both
count as errors), bot_udp_backlog_kb_max (the fullest of the bot's sockets: video
waiting to be read), p50/p95_frame_to_row_s, alerts, alert_latency_s, bot_cpu_percent, bot_peak_rss_mb, frames_dropped,
errors, rows_lost, time_breakdown (cores, machine_busy_percent, machine_steal_percent, harness_cpu_percent,
bot_cpu_percent, inference_child_ms_per_frame, inference_child_cpu_percent, inference_child_cpu_percent_at_target
(what it would need for every student at 2 Hz; these three summed over the bot's inference processes),
inference_processes, bot_main_process_cpu_percent,
janus_cpu_percent, bottleneck: what limited the bot, or null), short_of_target (null when the run meets issue
24's target of 2 samples per student per second and p95 frame->row under 1 s; else how far off), ... With --workers N: `workers` (per worker process: worker_id, rooms, students,
samples, samples_per_s, cpu_percent, peak_rss_mb), server_cpu_percent, rooms and session_ids.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
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

from bot.students import DIRECT_KBPS, EncodedClip, SimulatedStudent, harness_arg_problem, load_video_frames, no_face_frames
from core import settings as settings_mod
from core.settings import BotSettings, ServerSettings
from core.simulcast import bot_layer_fps, bot_layer_kbps, min_video_fps

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
    p.add_argument("--fps", type=float, default=None,
                   help="frames/s each student sends (default: what a browser sends the bot on that path: the server's "
                        f"video_fps ({ServerSettings.video_fps}) direct; via janus, the temporal layers of the low "
                        "simulcast layer that the bot's sampling rate needs, core.simulcast)")
    p.add_argument("--bitrate", type=positive_kbps, default=None, metavar="KBPS",
                   help="VP8 bitrate each student sends (default: what a browser sends the bot on that path: "
                        f"{DIRECT_KBPS} direct; via janus, what the temporal layers the bot subscribes to carry of the "
                        f"low simulcast layer's cap: {bot_layer_kbps(BotSettings.sample_hz)} at the default sampling rate)")
    p.add_argument("--live-encode", action="store_true",
                   help="every student runs its own VP8 encoder on this machine (as if the students' laptops "
                        "were this machine), instead of sending one shared clip encoded once")
    p.add_argument("--sample-hz", type=float, default=None, help="bot sampling rate (default: the bot's setting)")
    p.add_argument("--bot-arg", action="append", default=[], help="extra flag for the bot process, e.g. --bot-arg=--signals-student-min-seconds=5")
    p.add_argument("--keep-log", default=None, help="write the bot's log here")
    p.add_argument("--via", choices=("direct", "janus"), default="direct",
                   help="direct: students send video to the bot (default); janus: a meeting on an embedded Janus "
                        "(students publish to it, the bot subscribes; Janus's own CPU is reported too)")
    p.add_argument("--workers", type=int, default=None,
                   help="N bot worker processes (`python -m bot worker`) beside the server (`python -m bot serve`), "
                        "instead of one `python -m bot run`; the summary gains a per-worker table (`workers`)")
    p.add_argument("--rooms", type=int, default=1,
                   help="spread the students over this many rooms (classes), so rooms can spread over workers")
    args = p.parse_args(argv)
    if args.fps is None:
        args.fps = sent_fps(args)
    return args


def positive_kbps(text: str) -> int:
    value = int(text)
    if not 10 <= value <= 20_000:
        raise argparse.ArgumentTypeError("give kbit/s between 10 and 20000")
    return value


def asked_sample_hz(args: argparse.Namespace) -> float:
    """The bot's sampling rate in this run: --sample-hz, else the bot's default."""
    return float(args.sample_hz or BotSettings.sample_hz)


def sent_fps(args: argparse.Namespace) -> float:
    """Frames/s a browser sends the bot on this path (the default of --fps). Via Janus, a Chrome student's low
    layer is 5 frames/s in three temporal layers and the bot subscribes to those its sampling rate needs (2 Hz:
    2.5 frames/s); the harness's students send no temporal layers, so they send what the bot would get."""
    sample_hz = asked_sample_hz(args)
    if args.via == "janus":
        return bot_layer_fps(sample_hz)
    # The join page sends server.video_fps, which must be enough for the sampling rate (core.settings checks it).
    return float(max(ServerSettings.video_fps, min_video_fps(sample_hz)))


def sent_kbps(args: argparse.Namespace) -> int:
    """The VP8 bitrate of the shared clip: --bitrate, else what a browser sends the bot on this path (via Janus:
    the share of the low layer's cap that its temporal layers the bot subscribes to carry)."""
    if args.bitrate:
        return int(args.bitrate)
    if args.via == "janus":
        return bot_layer_kbps(asked_sample_hz(args))
    return DIRECT_KBPS


def bot_settings_flags(args: argparse.Namespace, port: int, db: Path) -> list[str]:
    """The settings the bot process runs with (its core.settings flags, --bot-arg last so they win)."""
    flags = ["--server-port", str(port), "--server-host", "127.0.0.1",
             "--storage-url", f"sqlite:///{db}", "--server-max-participants-per-room", str(max(200, args.students + 10)),
             "--server-video-width", str(args.width), "--server-video-height", str(args.height),
             # What the join page would ask for: at least what the students send, and what the sampling rate needs.
             "--server-video-fps", str(max(math.ceil(args.fps), min_video_fps(asked_sample_hz(args)))),
             # The whole simulated class joins from 127.0.0.1 at once: lift the per-address and per-room
             # join bursts (signaling/guard.py) to the class size, as an operator would for a NAT'ed school.
             "--server-join-burst-per-address", str(max(60, args.students + 10)),
             "--server-join-burst-per-room", str(max(100, args.students + 10)),
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
    """CPU seconds and peak RSS of the bot process and its children (the inference process), sampled twice a
    second; Janus, a child of the bot too, is left out (`janus_cpu_percent` is its own monitor)."""

    def __init__(self, pid: int, with_children: bool = False) -> None:
        import psutil
        self.process = psutil.Process(pid)
        self.with_children = with_children
        self.peak_rss = 0
        self.cpu_start = self._cpu()
        self.t_start = time.monotonic()
        self.cpu_end = self.cpu_start
        self.t_end = self.t_start
        self.peak_udp_backlog = 0          # bytes: the fullest receive queue of one of the process's UDP sockets
        self.peak_udp_backlog_total = 0    # bytes: all its UDP sockets together

    def _members(self) -> list[Any]:
        if not self.with_children:
            return [self.process]
        children = [c for c in self.process.children(recursive=True) if "janus" not in c.name()]
        return [self.process, *children]

    def _cpu(self, members: list[Any] | None = None) -> float:
        try:
            total = 0.0
            for process in members if members is not None else self._members():
                times = process.cpu_times()
                total += times.user + times.system
            return total
        except Exception:
            return self.cpu_end if hasattr(self, "cpu_end") else 0.0

    def reset(self) -> None:
        self.cpu_start, self.t_start = self._cpu(), time.monotonic()
        self.peak_udp_backlog = self.peak_udp_backlog_total = 0

    async def run(self) -> None:
        while True:
            try:
                members = self._members()      # one walk of the process tree per sample, for both figures
                self.peak_rss = max(self.peak_rss, sum(p.memory_info().rss for p in members))
                self.cpu_end, self.t_end = self._cpu(members), time.monotonic()
                queues = udp_receive_queues(self.process.pid)
                if queues:
                    self.peak_udp_backlog = max(self.peak_udp_backlog, max(queues))
                    self.peak_udp_backlog_total = max(self.peak_udp_backlog_total, sum(queues))
            except Exception:
                return
            await asyncio.sleep(0.5)

    def cpu_percent(self) -> float:
        return 100.0 * (self.cpu_end - self.cpu_start) / max(1e-6, self.t_end - self.t_start)


# Issue 24's target for a lecture on one bot: every student analysed twice a second, rows within a second.
TARGET_SAMPLES_PER_STUDENT_PER_S = 2.0
TARGET_P95_FRAME_TO_ROW_S = 1.0


class MachineMonitor:
    """The whole machine's CPU over the measured window (busy, and stolen by the hypervisor: a shared VM
    runs slower while its neighbours are busy), and this harness's own CPU (the simulated students)."""

    def __init__(self) -> None:
        import psutil
        self._psutil = psutil
        self.cores = psutil.cpu_count() or 1
        self.start, self.end = psutil.cpu_times(), psutil.cpu_times()
        self.harness_start = self.harness_end = self._harness()
        self.t_start = self.t_end = time.monotonic()

    def _harness(self) -> float:
        times = self._psutil.Process().cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        self.end, self.harness_end, self.t_end = self._psutil.cpu_times(), self._harness(), time.monotonic()

    def percent(self, field: str) -> float:
        """CPU time of one kind over the window, in % of one core (2 busy cores = 200)."""
        wall = max(1e-6, self.t_end - self.t_start)
        return 100.0 * (getattr(self.end, field, 0.0) - getattr(self.start, field, 0.0)) / wall

    def busy_percent(self) -> float:
        # Summed from the working fields rather than taken as "cores minus idle": where /proc/stat counts more
        # CPUs than cpu_count() reports (a container limited to fewer cores), the latter came out as 0.
        return sum(self.percent(f) for f in ("user", "nice", "system", "irq", "softirq"))

    def harness_percent(self) -> float:
        return 100.0 * (self.harness_end - self.harness_start) / max(1e-6, self.t_end - self.t_start)


def time_breakdown(summary: dict, bot_stats: dict, machine: MachineMonitor, window_s: float) -> dict:
    """Where the CPU went in the window, and what limited the bot if anything did: the inference processes
    (each runs on one core at most) or the machine as a whole. The inference_child_* figures are the sum over
    the bot's inference processes (`inference_processes` of them)."""
    frames = float(bot_stats.get("frames_analysed") or 0)
    child_cpu = bot_stats.get("inference_child_cpu_s")
    ms_per_frame = round(1000.0 * float(child_cpu) / frames, 2) if child_cpu is not None and frames else None
    frames_per_s = summary.get("samples_in_window", 0) / window_s
    child_percent = round(ms_per_frame * frames_per_s / 10.0, 1) if ms_per_frame is not None else None
    # What the inference processes would need to analyse every student at the target rate: each runs on one
    # core at most, so above ~90 % of a core each the bot falls behind however idle the rest of the machine is.
    needed = round(ms_per_frame * summary.get("students", 0) * TARGET_SAMPLES_PER_STUDENT_PER_S / 10.0, 1) \
        if ms_per_frame is not None else None
    processes = max(1, int(bot_stats.get("inference_processes") or 1))
    bot_percent = summary.get("bot_cpu_percent")
    busy, steal = round(machine.busy_percent(), 1), round(machine.percent("steal"), 1)
    out: dict[str, Any] = {
        "cores": machine.cores, "machine_busy_percent": busy, "machine_steal_percent": steal,
        "harness_cpu_percent": round(machine.harness_percent(), 1), "bot_cpu_percent": bot_percent,
        "inference_child_ms_per_frame": ms_per_frame, "inference_child_cpu_percent": child_percent,
        "inference_child_cpu_percent_at_target": needed, "inference_processes": processes,
        "bot_main_process_cpu_percent": round(bot_percent - child_percent, 1)
        if bot_percent is not None and child_percent is not None else None,
        "janus_cpu_percent": summary.get("janus_cpu_percent"),
    }
    if needed is not None and needed >= 90.0 * processes:
        where = "the one core it runs on" if processes == 1 else f"the {processes} cores its {processes} processes run on"
        out["bottleneck"] = (f"the inference process{'es' if processes > 1 else ''}: {ms_per_frame} ms of CPU a frame x "
                             f"{summary.get('students')} students x {TARGET_SAMPLES_PER_STUDENT_PER_S:g} Hz would need "
                             f"{needed:.0f} % of {where} (it got {child_percent:.0f} %)")
    elif busy + steal >= 95.0 * machine.cores:
        out["bottleneck"] = f"the machine's CPU: {busy:.0f} % busy and {steal:.0f} % stolen of {100 * machine.cores} %"
    else:
        out["bottleneck"] = None
    return out


def short_of_target(summary: dict) -> dict | None:
    """How far the run is from issue 24's target (None: met): samples per student per second missing, and
    seconds of p95 frame->row latency over."""
    rate = float(summary.get("samples_per_student_per_s") or 0.0)
    p95 = summary.get("p95_frame_to_row_s")
    missing = max(0.0, TARGET_SAMPLES_PER_STUDENT_PER_S - rate)
    over = max(0.0, float(p95) - TARGET_P95_FRAME_TO_ROW_S) if p95 is not None else None
    if missing == 0.0 and over == 0.0:
        return None
    return {"samples_per_student_per_s": round(missing, 3),
            "p95_frame_to_row_s": round(over, 3) if over is not None else None}


def udp_receive_queues(pid: int) -> list[int]:
    """Bytes waiting in the kernel to be read, for each UDP socket of the process (Linux; [] elsewhere). Packets
    wait there when the process's event loop reads its sockets slower than they fill: time that the bot's
    frame->row latency cannot see, since its clock starts when a frame is decoded."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        queues = []
        for table in ("/proc/net/udp", "/proc/net/udp6"):
            with open(table) as f:
                for line in f.read().splitlines()[1:]:
                    fields = line.split()
                    if len(fields) > 9 and fields[9] in inodes:
                        queues.append(int(fields[4].split(":")[1], 16))
        return queues
    except OSError:
        return []


async def simulate(args: argparse.Namespace) -> dict[str, Any]:
    decoded = load_video_frames(args.video, args.width, args.height, args.fps)
    no_face = no_face_frames(args.width, args.height)
    bitrate = 1000 * sent_kbps(args)
    frames: list[np.ndarray] | EncodedClip = decoded if args.live_encode else EncodedClip(decoded, args.fps, bitrate)
    blank: list[np.ndarray] | EncodedClip = no_face if args.live_encode else EncodedClip(no_face, args.fps, bitrate)
    db = Path(args.db) if args.db else Path(tempfile.mkdtemp(prefix="classmood-sim-")) / "classmood.sqlite"
    db.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="classmood-bot-"))
    ready_file, stats_file = workdir / "ready.json", workdir / "stats.json"
    log_path = Path(args.keep_log) if args.keep_log else workdir / "bot.log"
    env = dict(os.environ, CLASSMOOD_LOG_LEVEL=os.environ.get("CLASSMOOD_LOG_LEVEL", "INFO"))
    flags = bot_settings_flags(args, port, db)
    if args.workers:
        # The server alone, and N bot workers as separate processes (what a deployment runs).
        cmd = [sys.executable, "-m", "bot", "serve", *flags]
    else:
        cmd = [sys.executable, "-m", "bot", "run", "--no-room", "--ready-file", str(ready_file),
               "--stats-file", str(stats_file), *flags]
    log_file = open(log_path, "w")
    bot = subprocess.Popen(cmd, cwd=PROJECT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    monitor = ProcessMonitor(bot.pid, with_children=True)
    monitor_task = asyncio.ensure_future(monitor.run())
    pool = WorkerPool(args.workers or 0, server, flags, workdir, env)
    janus_monitor: ProcessMonitor | None = None
    janus_task: asyncio.Task | None = None
    students: list[SimulatedStudent] = []
    teacher_alerts: list[dict[str, Any]] = []
    teacher_states = 0
    connections_lost = 0
    errors: list[str] = []
    leaked_sets: list[set[str]] = []
    try:
        deadline = time.monotonic() + 120
        while not (await serving(server) if args.workers else ready_file.exists()):
            if bot.poll() is not None:
                raise RuntimeError(f"bot exited with code {bot.returncode} before serving; log: {log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("bot did not start within 120 s")
            await asyncio.sleep(0.2)
        await pool.start(deadline)
        if args.via == "janus":
            janus_monitor = ProcessMonitor(janus_child(bot.pid))
            janus_task = asyncio.ensure_future(janus_monitor.run())
        async with aiohttp.ClientSession() as http:
            rooms: list[dict[str, Any]] = []
            teachers: list[aiohttp.ClientWebSocketResponse[bool]] = []

            async def read_teacher(teacher: aiohttp.ClientWebSocketResponse[bool]) -> None:
                nonlocal teacher_states
                async for msg in teacher:
                    data = json.loads(msg.data)
                    if data.get("type") == "alert":
                        teacher_alerts.append({**data["alert"], "received_at": time.time()})
                    elif data.get("type") == "state":
                        teacher_states += 1
            teacher_tasks = []
            for n in range(max(1, args.rooms)):
                title = "simulated class" if args.rooms <= 1 else f"simulated class {n + 1}"
                async with http.post(server + "/api/rooms", json={"title": title}) as r:
                    room = await r.json()
                rooms.append(room)
                teacher = await http.ws_connect(server.replace("http", "ws") + "/ws")
                await teacher.send_json({"v": 1, "type": "hello", "role": "teacher", "room": room["room"],
                                         "token": room["teacher_token"]})
                teachers.append(teacher)
                teacher_tasks.append(asyncio.ensure_future(read_teacher(teacher)))
                async with http.post(f"{server}/api/rooms/{room['room']}/invite",
                                     headers={"Authorization": f"Bearer {room['teacher_token']}"}) as r:
                    if r.status != 200:
                        raise RuntimeError(f"invite failed: HTTP {r.status} {await r.text()}")
            room_ids = [room["room"] for room in rooms]

            everyone: list[SimulatedStudent] = []     # with those who replaced churned students

            def make_student(i: int) -> SimulatedStudent:
                face = i >= args.no_face_students
                analysis = i >= args.no_face_students + args.opt_out_students or i < args.no_face_students
                room = rooms[i % len(rooms)]
                student = SimulatedStudent(server, room["room"], room["student_url"].split("k=", 1)[1],
                                           f"Student {i + 1:02d}", frames if face else blank,
                                           args.fps, analysis=analysis, offset=i * 3)
                everyone.append(student)
                return student

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
            machine = MachineMonitor()
            monitor.reset()
            pool.reset()
            if janus_monitor is not None:
                janus_monitor.reset()
            churn_task = asyncio.ensure_future(churn(students, make_student)) if args.churn else None
            await asyncio.sleep(args.seconds)
            ended = time.time()
            machine.stop()
            # A student whose media connection dies while in class is not analysed until it reconnects (an
            # overloaded bot that misses ICE consent checks ends connections this way): an error, not a quiet gap.
            connections_lost = sum(s.connections_lost for s in everyone)
            if connections_lost:
                errors.append(f"{connections_lost} media connections of students still in class failed or were closed")
            held = pool.holders(db)       # which worker held which room at the end of the window
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
            for task in teacher_tasks:
                task.cancel()
            for teacher in teachers:
                await teacher.close()
    finally:
        if args.workers:
            # The workers first: stopped with SIGTERM they hand their rooms over, and a server still running
            # would invite the next worker in; here the whole run is over.
            errors.extend(pool.stop())
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
    bot_stats = json.loads(stats_file.read_text()) if stats_file.exists() else pool.combined_stats()
    summary = summarise(db, room_ids, started, ended, args, bot_stats)
    bot_lost = int(bot_stats.get("connections_lost", 0) or 0)
    if bot_lost:
        errors.append(f"the bot lost the media connections of {bot_lost} students still in class")
    error_lines += pool.error_lines()
    leaked = set().union(*leaked_sets) if leaked_sets else set()
    delivery = sorted(a["received_at"] - float(a.get("t") or 0) for a in teacher_alerts)
    summary.update({
        "alerts_received_by_teacher": len(teacher_alerts), "teacher_state_messages": teacher_states,
        # From the frame at which an alert's condition first held (the alert's t) to the teacher's socket.
        "alert_latency_s": round(delivery[-1], 3) if delivery else None,
        "teacher_alerts": [{k: a.get(k) for k in ("level", "kind", "name", "message")} for a in teacher_alerts][:50],
        "students_received_teacher_data": sorted(leaked),
        "bot_cpu_percent": round(pool.cpu_percent() if args.workers else monitor.cpu_percent(), 1),
        "bot_peak_rss_mb": round((pool.peak_rss() if args.workers else monitor.peak_rss) / 2**20, 1),
        # Video that reached the bot's machine but waits in its sockets (kernel accounting, ~1.6x the payload).
        "bot_udp_backlog_kb_max": None if args.workers else round(monitor.peak_udp_backlog / 1024),
        "bot_udp_backlog_kb_total_max": None if args.workers else round(monitor.peak_udp_backlog_total / 1024),
        "via": args.via,
        "bitrate_kbps": None if args.live_encode else sent_kbps(args), "fps": args.fps,
        "janus_cpu_percent": round(janus_monitor.cpu_percent(), 1) if janus_monitor else None,
        "janus_peak_rss_mb": round(janus_monitor.peak_rss / 2**20, 1) if janus_monitor else None,
        "errors": len(errors) + len(error_lines) + int(bot_stats.get("frame_errors", 0) or 0),
        "error_messages": (errors + error_lines)[:20], "db": str(db), "bot_log": str(log_path),
        "rooms": len(room_ids), "connections_lost": connections_lost,
        "bot_connections_lost": bot_lost,
    })
    summary["time_breakdown"] = time_breakdown(summary, bot_stats, machine, max(ended - started, 1e-9))
    summary["short_of_target"] = short_of_target(summary)
    if args.workers:
        summary["server_cpu_percent"] = round(monitor.cpu_percent(), 1)
        summary["workers"] = pool.table(db, held, started, ended)
    return summary


async def serving(server: str) -> bool:
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(server + "/healthz") as r:
                return r.status == 200
    except (aiohttp.ClientError, OSError):
        return False


class WorkerPool:
    """--workers N: N `python -m bot worker` processes, each with its ready file, stats file, log and monitor."""

    def __init__(self, n: int, server: str, flags: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.n, self.server, self.flags, self.workdir, self.env = n, server, flags, workdir, env
        self.processes: list[subprocess.Popen] = []
        self.monitors: list[ProcessMonitor] = []
        self.tasks: list[asyncio.Task] = []
        self.ids: list[str] = []

    async def start(self, deadline: float) -> None:
        for i in range(self.n):
            files = [self.workdir / f"worker{i}.{kind}" for kind in ("ready.json", "stats.json", "log")]
            cmd = [sys.executable, "-m", "bot", "worker", "--server", self.server, "--ready-file", str(files[0]),
                   "--stats-file", str(files[1]), *self.flags]
            log_file = open(files[2], "w")
            self.processes.append(subprocess.Popen(cmd, cwd=PROJECT, env=self.env, stdout=log_file,
                                                   stderr=subprocess.STDOUT))
            log_file.close()
            self.monitors.append(ProcessMonitor(self.processes[-1].pid, with_children=True))
            self.tasks.append(asyncio.ensure_future(self.monitors[-1].run()))
        for i, process in enumerate(self.processes):
            ready = self.workdir / f"worker{i}.ready.json"
            while not (ready.exists() and ready.read_text()):
                if process.poll() is not None:
                    raise RuntimeError(f"bot worker {i} exited with code {process.returncode}; "
                                       f"log: {self.workdir / f'worker{i}.log'}")
                if time.monotonic() > deadline:
                    raise RuntimeError("the bot workers did not connect within 120 s")
                await asyncio.sleep(0.2)
            self.ids.append(str(json.loads(ready.read_text())["worker_id"]))

    def reset(self) -> None:
        for monitor in self.monitors:
            monitor.reset()

    def holders(self, db: Path) -> dict[str, str]:
        """room id -> the worker id holding its lease now."""
        if not self.n:
            return {}
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return dict(con.execute("SELECT room_id, worker_id FROM room_assignments").fetchall())
        finally:
            con.close()

    def stop(self) -> list[str]:
        errors = []
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for i, process in enumerate(self.processes):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                errors.append(f"bot worker {i} did not stop within 30 s of SIGTERM")
            if process.returncode not in (0, -signal.SIGTERM):
                errors.append(f"bot worker {i} exited with code {process.returncode}")
        for task in self.tasks:
            task.cancel()
        return errors

    def stats(self) -> list[dict[str, Any]]:
        out = []
        for i in range(len(self.processes)):
            path = self.workdir / f"worker{i}.stats.json"
            out.append(json.loads(path.read_text()) if path.exists() else {})
        return out

    def combined_stats(self) -> dict[str, Any]:
        """The workers' counters added up, in the shape of `bot run`'s stats file."""
        stats = self.stats()
        counted = ("samples_accepted", "frames_dropped", "frame_errors", "connections_lost", "decoder_frames_shed",
                   "decoder_frames_failed")
        total: dict[str, Any] = {"storage": {"lost": 0}, **{k: 0 for k in counted}}
        for one in stats:
            for k in counted:
                total[k] += int(one.get(k) or 0)
            total["storage"]["lost"] += int((one.get("storage") or {}).get("lost") or 0)
            total["sample_hz"] = one.get("sample_hz", total.get("sample_hz"))
        return total if stats else {}

    def error_lines(self) -> list[str]:
        lines: list[str] = []
        for i in range(len(self.processes)):
            text = (self.workdir / f"worker{i}.log").read_text(errors="replace")
            lines += [f"worker {i}: {line}" for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        return lines

    def cpu_percent(self) -> float:
        return sum(m.cpu_percent() for m in self.monitors)

    def peak_rss(self) -> int:
        return max((m.peak_rss for m in self.monitors), default=0)

    def table(self, db: Path, held: dict[str, str], started: float, ended: float) -> list[dict[str, Any]]:
        """Per worker: the rooms it held at the end of the window, their analysed students, and its samples
        (in the window), samples per second, CPU (% of one core) and peak memory."""
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            per_room = dict(con.execute(
                "SELECT se.room_id, COUNT(*) FROM samples s JOIN sessions se ON se.session_id = s.session_id "
                "WHERE s.t BETWEEN ? AND ? GROUP BY se.room_id", (started, ended)).fetchall())
            students = dict(con.execute(
                "SELECT se.room_id, COUNT(DISTINCT s.participant_id) FROM samples s JOIN sessions se "
                "ON se.session_id = s.session_id WHERE s.t BETWEEN ? AND ? GROUP BY se.room_id",
                (started, ended)).fetchall())
        finally:
            con.close()
        span = max(1e-6, ended - started)
        rows = []
        for worker_id, monitor in zip(self.ids, self.monitors):
            mine = sorted(room for room, holder in held.items() if holder == worker_id)
            samples = sum(int(per_room.get(room, 0)) for room in mine)
            rows.append({"worker_id": worker_id, "rooms": len(mine), "students": sum(int(students.get(r, 0)) for r in mine),
                         "samples": samples, "samples_per_s": round(samples / span, 2),
                         "cpu_percent": round(monitor.cpu_percent(), 1),
                         "peak_rss_mb": round(monitor.peak_rss / 2**20, 1)})
        return rows


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


def summarise(db: Path, room_ids: list[str], started: float, ended: float, args: argparse.Namespace,
              bot_stats: dict[str, Any]) -> dict[str, Any]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    sids: list[str | None] = []
    rows: list[Any] = []
    alerts: list[Any] = []
    try:
        for room_id in room_ids:         # each room's latest session: together, the whole simulated school
            session = con.execute("SELECT session_id FROM sessions WHERE room_id = ? ORDER BY started_at DESC "
                                  "LIMIT 1", (room_id,)).fetchone()
            sid = session[0] if session else None
            sids.append(sid)
            rows += con.execute("SELECT s.participant_id, p.name, s.t, s.face_found, s.latency_s, s.stored_at "
                                "FROM samples s JOIN participants p ON p.participant_id = s.participant_id "
                                "AND p.session_id = s.session_id WHERE s.session_id = ?", (sid,)).fetchall()
            alerts += con.execute("SELECT level, kind, t FROM alerts WHERE session_id = ?", (sid,)).fetchall()
    finally:
        con.close()
    sid = sids[0] if sids else None
    window = [r for r in rows if started <= r[2] <= ended]
    by_student: dict[str, list[float]] = {}
    for pid, _, t, *_ in window:
        by_student.setdefault(pid, []).append(t)
    period = 1.0 / (args.sample_hz or float(bot_stats.get("sample_hz", 2.0)))
    # Rate over each connection's own active span (a churned student is away part of the time).
    rates = [len(ts) / (max(ts) - min(ts) + period) for ts in by_student.values() if len(ts) >= 2]
    # The same over the whole window, for every student who has analysis on: a student analysed for half of it
    # counts half. Without --churn this is the stricter figure (the one above cannot see a student lost mid-run).
    analysed = max(1, args.students - args.opt_out_students)
    latencies = sorted((r[5] - r[2]) for r in rows if r[5] is not None)

    def pct(values: list[float], q: float) -> float | None:
        return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else None

    accepted = int(bot_stats.get("samples_accepted", len(rows)) or 0)
    names = {r[1] for r in rows}
    return {
        "students": args.students, "samples": len(rows), "samples_in_window": len(window),
        "samples_per_student_per_s": round(sum(rates) / len(rates), 3) if rates else 0.0,
        "min_samples_per_student_per_s": round(min(rates), 3) if rates else 0.0,
        "window_samples_per_student_per_s": round(len(window) / analysed / max(ended - started, 1e-9), 3),
        "students_with_samples": len(names), "faces_found": sum(1 for r in rows if r[3]),
        "p50_frame_to_row_s": pct(latencies, 0.5), "p95_frame_to_row_s": pct(latencies, 0.95),
        "alerts": len(alerts), "alert_kinds": sorted({f"{a[0]}:{a[1]}" for a in alerts}),
        "frames_dropped": bot_stats.get("frames_dropped"),
        # Frames the bot could not decode in time (dropped until a keyframe, bot.decoding) or at all (corrupt).
        "frames_shed_before_decoding": bot_stats.get("decoder_frames_shed"),
        "frames_undecodable": bot_stats.get("decoder_frames_failed"),
        "rows_lost": max(0, accepted - len(rows)) + int(bot_stats.get("storage", {}).get("lost", 0) or 0),
        "session_id": sid, "session_ids": sids, "seconds": args.seconds, "churn": args.churn, "live_encode": args.live_encode,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = harness_arg_problem(args.video, args.students, args.seconds)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if (args.workers is not None and args.workers < 1) or args.rooms < 1:
        print("error: --workers and --rooms must be >= 1", file=sys.stderr)
        return 2
    try:
        check_bot_settings(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(simulate(args))
    except (RuntimeError, OSError, ValueError) as exc:
        log.debug("simulation failed", exc_info=True)
        print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    width = max(len(k) for k in summary)
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")
    if args.json:
        print(json.dumps(summary))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
