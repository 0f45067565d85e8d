"""Replay a class as a meeting-bot service would stream it to classmood's ingest endpoint.

    python -m bot.ingest_replay --service recall|attendee --video PATH --students N --seconds S --json
    python -m bot.ingest_replay --service recall --url wss://HOST/ingest/recall/SECRET --db classmood.sqlite ...

Plays one shared video as N students' webcams, in the service's exact message shapes (Recall.ai: base64 PNG
640x360; Attendee: base64 JPEG), 2 frames/s per participant, with the rest of a real meeting: joins, a rename,
a student who leaves, a participant who only shares their screen, one with no video, and the host (the
teacher, who must never be analysed). Without --url it starts its own server + bot (`python -m bot run`, one
process, as deployed) on a new SQLite file, creates a room, invites the bot, watches the teacher's socket for
alerts and checks the session's review and CSV export at the end.

With --json the last line is one JSON object: {"students", "frames_sent", "samples", "analysed_share",
"p95_frame_to_row_s", "errors"}; analysed_share = sample rows stored / webcam frames the students sent;
frame to row = from the capture time in the message to the moment the bot's writer committed the row
(samples.stored_at - samples.t). Samples are read from the SQLite file (--db with --url). Details go to stderr.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from bot.simulate import ProcessMonitor

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_VIDEO = PROJECT.parent / "shared" / "media" / "videos" / "short_hamilton_clip.mp4"
FPS = 2.0                       # both services send per-participant frames at about 2 per second
WIDTH, HEIGHT = 640, 360        # Recall's video_separate_png is 360p
log = logging.getLogger("classmood.ingest_replay")


# ---- the services' messages (shapes: tests/fixtures/ingest/README.md) ----------------------------------------
def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def recall_participant(pid: int, name: str | None, is_host: bool = False) -> dict[str, Any]:
    return {"id": pid, "name": name, "is_host": is_host, "platform": "zoom", "extra_data": {}, "email": None}


RECALL_META = {"realtime_endpoint": {"id": "replay-endpoint", "metadata": {}},
               "recording": {"id": "replay-recording", "metadata": {}}, "bot": {"id": "replay-bot", "metadata": {}}}


def recall_event(event: str, participant: dict[str, Any], t: float, started: float) -> str:
    inner = {"participant": participant, "timestamp": {"relative": round(t - started, 3), "absolute": iso(t)}}
    return json.dumps({"event": event, "data": {"data": inner, **RECALL_META}})


def recall_frame(participant: dict[str, Any], image_b64: str, t: float, started: float, kind: str = "webcam") -> str:
    inner = {"buffer": image_b64, "timestamp": {"relative": round(t - started, 3), "absolute": iso(t)},
             "type": kind, "participant": participant}
    return json.dumps({"event": "video_separate_png.data", "data": {"data": inner, **RECALL_META}})


def attendee_frame(bot_id: str, pid: str, name: str, image_b64: str, t: float, is_host: bool = False,
                   kind: str = "webcam") -> str:
    """The earlier assumed frame shape, with a name, a host flag and a timestamp (still accepted)."""
    return json.dumps({"bot_id": bot_id, "trigger": "realtime_video.frame",
                       "data": {"participant_id": pid, "participant_name": name, "is_host": is_host,
                                "timestamp_ms": int(t * 1000), "source": kind, "format": "jpeg", "image": image_b64}})


def attendee_documented_frame(bot_id: str, pid: str, image_b64: str, kind: str = "webcam") -> str:
    """A frame in the shape of Attendee's docs (realtime_video.per_participant): the participant's uuid only, no
    name, host flag or timestamp; who is who comes from the participant events."""
    return json.dumps({"bot_id": bot_id, "trigger": "realtime_video.per_participant",
                       "data": {"participant_uuid": pid, "frame": image_b64, "format": "jpeg", "source": kind}})


def attendee_event(bot_id: str, trigger: str, pid: str, name: str, t: float, is_host: bool = False) -> str:
    return json.dumps({"bot_id": bot_id, "trigger": trigger,
                       "data": {"participant_id": pid, "participant_name": name, "is_host": is_host,
                                "timestamp_ms": int(t * 1000)}})


@dataclass
class Person:
    pid: int
    name: str
    kind: str = "student"      # student | host | screenshare | novideo
    offset: int = 0
    present: bool = False
    sent: int = 0


class Service:
    """Speaks one service's dialect over one websocket."""

    def __init__(self, name: str, ws: aiohttp.ClientWebSocketResponse[bool], images: list[str],
                 attendee_frames: str = "documented") -> None:
        self.name, self.ws, self.images = name, ws, images
        self.attendee_frames = attendee_frames      # documented (Attendee's docs) | named (the earlier shape)
        self.started = time.time()
        self.bot_id = "replay-bot"

    def _recall_p(self, p: Person) -> dict[str, Any]:
        return recall_participant(p.pid, p.name, p.kind == "host")

    async def event(self, kind: str, p: Person) -> None:
        t = time.time()
        if self.name == "recall":
            await self.ws.send_str(recall_event(f"participant_events.{kind}", self._recall_p(p), t, self.started))
        else:
            await self.ws.send_str(attendee_event(self.bot_id, f"participant_events.{kind}", f"u{p.pid}", p.name, t,
                                                  p.kind == "host"))

    async def frame(self, p: Person, index: int) -> None:
        t = time.time()
        image = self.images[(index + p.offset) % len(self.images)]
        kind = "screenshare" if p.kind == "screenshare" else "webcam"
        if self.name == "recall":
            await self.ws.send_str(recall_frame(self._recall_p(p), image, t, self.started, kind))
        elif self.attendee_frames == "documented":
            await self.ws.send_str(attendee_documented_frame(self.bot_id, f"u{p.pid}", image, kind))
        else:
            await self.ws.send_str(attendee_frame(self.bot_id, f"u{p.pid}", p.name, image, t, p.kind == "host", kind))
        p.sent += 1


def encode_clip(video: str, service: str, seconds: float) -> list[str]:
    import cv2

    from bot.students import load_video_frames
    frames = load_video_frames(video, WIDTH, HEIGHT, FPS, max_seconds=min(30.0, seconds))
    ext = ".png" if service == "recall" else ".jpg"
    return [base64.b64encode(cv2.imencode(ext, f)[1].tobytes()).decode("ascii") for f in frames]


async def play(url: str, service: str, images: list[str], students: int, seconds: float,
               errors: list[str], attendee_frames: str = "documented") -> tuple[list[Person], float, float]:
    """Stream the meeting for `seconds`; returns the participants, and the wall-clock start and end."""
    people = [Person(1, "Teacher (host)", "host")]
    people += [Person(1000 + i, f"Student {i + 1:02d}", offset=i * 3) for i in range(students)]
    people += [Person(900, "Presenter", "screenshare"), Person(901, "No Camera", "novideo")]
    leaver = people[students] if students >= 2 else None            # the last student leaves at 2/3
    renamed = people[2] if students >= 2 else None                  # the second student renames at 1/2
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url, max_msg_size=0) as ws:
            svc = Service(service, ws, images, attendee_frames)
            started = time.time()
            for p in people:
                await svc.event("join", p)
                p.present = True
            senders = [p for p in people if p.kind != "novideo"]
            period = 1.0 / FPS
            t0 = time.monotonic()
            # Each sender at FPS, phases spread over the period (as independent cameras would be).
            due = [(t0 + period * i / len(senders), i, p) for i, p in enumerate(senders)]
            frame_index = {p.pid: 0 for p in senders}
            halfway = twothirds = False
            end = t0 + seconds
            while True:
                due.sort(key=lambda d: d[0])
                when, i, p = due[0]
                if when >= end:
                    break
                delay = when - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if ws.closed:
                    errors.append(f"the ingest socket was closed by the server (code {ws.close_code})")
                    break
                elapsed = time.monotonic() - t0
                if renamed is not None and not halfway and elapsed >= seconds / 2:
                    halfway = True
                    renamed.name += " (renamed)"
                    await svc.event("update", renamed)
                if leaver is not None and not twothirds and elapsed >= 2 * seconds / 3:
                    twothirds = True
                    await svc.event("leave", leaver)
                    leaver.present = False
                if p.present:
                    await svc.frame(p, frame_index[p.pid])
                    frame_index[p.pid] += 1
                due[0] = (when + period, i, p)
            ended = time.time()
            for p in people:
                if p.present:
                    await svc.event("leave", p)
            await asyncio.sleep(0.5)
    return people, started, ended


def read_samples(db: Path, ids: list[str], started: float) -> list[tuple[str, float, float | None]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        marks = ",".join("?" * len(ids))
        return con.execute(f"SELECT participant_id, t, stored_at FROM samples WHERE participant_id IN ({marks}) "
                           f"AND t >= ?", (*ids, started - 1)).fetchall()
    finally:
        con.close()


class OwnClass:
    """`python -m bot run` in a subprocess (server + bot, as deployed), a room, the bot invited, a teacher."""

    def __init__(self, args: argparse.Namespace, db: Path) -> None:
        from bot.simulate import free_port
        self.args, self.db, self.port = args, db, free_port()
        self.server = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="classmood-replay-"))
        self.log_path = Path(args.keep_log) if args.keep_log else self.workdir / "bot.log"
        self.alerts: list[dict[str, Any]] = []
        self.proc: subprocess.Popen | None = None
        self.monitor: ProcessMonitor | None = None          # the bot's CPU and memory (needs psutil)
        self.monitor_task: asyncio.Task[None] | None = None

    async def start(self, http: aiohttp.ClientSession) -> str:
        ready = self.workdir / "ready.json"
        flags = ["--server-port", str(self.port), "--server-host", "127.0.0.1", "--storage-url", f"sqlite:///{self.db}",
                 "--server-max-participants-per-room", str(max(200, self.args.students + 10)), "--janus-mode", "off"]
        if self.args.pattern:
            flags += ["--model-model", f"scripted:{self.args.pattern}"]
        cmd = [sys.executable, "-m", "bot", "run", "--no-room", "--ready-file", str(ready),
               "--stats-file", str(self.workdir / "stats.json"), *flags, *self.args.bot_arg]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, CLASSMOOD_LOG_LEVEL=os.environ.get("CLASSMOOD_LOG_LEVEL", "INFO")))
        try:       # psutil comes with the [loadtest] extra: without it, no CPU/memory figures
            from bot.simulate import ProcessMonitor
            self.monitor = ProcessMonitor(self.proc.pid)
            self.monitor_task = asyncio.ensure_future(self.monitor.run())
        except ImportError:
            pass
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"bot exited with code {self.proc.returncode}; log: {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError("bot did not start within 120 s")
            await asyncio.sleep(0.2)
        async with http.post(self.server + "/api/rooms", json={"title": "replayed meeting"}) as r:
            self.room = await r.json()
        self.auth = {"Authorization": f"Bearer {self.room['teacher_token']}"}
        self.teacher = await http.ws_connect(self.server.replace("http", "ws", 1) + "/ws")
        await self.teacher.send_json({"v": 1, "type": "hello", "role": "teacher", "room": self.room["room"],
                                      "token": self.room["teacher_token"]})
        self.teacher_task = asyncio.ensure_future(self._read_teacher())
        async with http.post(f"{self.server}/api/rooms/{self.room['room']}/invite", headers=self.auth) as r:
            if r.status != 200:
                raise RuntimeError(f"invite failed: HTTP {r.status}")
        for _ in range(100):      # the bot's hello: frames before it would be dropped (no bot in the room)
            async with http.get(f"{self.server}/api/rooms/{self.room['room']}", headers=self.auth) as r:
                if (await r.json()).get("bot"):
                    break
            await asyncio.sleep(0.1)
        async with http.post(f"{self.server}/api/rooms/{self.room['room']}/ingest", headers=self.auth,
                             json={"service": self.args.service}) as r:
            return (await r.json())["url"]

    async def _read_teacher(self) -> None:
        async for msg in self.teacher:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                if data.get("type") == "alert":
                    self.alerts.append(data["alert"])

    async def finish(self, http: aiohttp.ClientSession, errors: list[str]) -> dict[str, Any]:
        """Ingest counters, review and CSV export (checked while the server runs), then stop the bot."""
        room_id, info = self.room["room"], {}
        async with http.get(f"{self.server}/api/rooms/{room_id}/ingest", headers=self.auth) as r:
            info["ingest_counters"] = (await r.json()).get("counters")
        async with http.get(f"{self.server}/api/rooms/{room_id}/sessions", headers=self.auth) as r:
            sessions = (await r.json()).get("sessions") or []
        if sessions:
            sid = sessions[0].get("session_id")
            async with http.get(f"{self.server}/api/sessions/{sid}/review", headers=self.auth) as r:
                info["review_status"] = r.status
            async with http.get(f"{self.server}/api/sessions/{sid}/samples.csv", headers=self.auth) as r:
                info["samples_csv_status"], info["samples_csv_lines"] = r.status, (await r.text()).count("\n")
            if info["review_status"] != 200 or info["samples_csv_status"] != 200:
                errors.append("the session's review or CSV export failed")
        else:
            errors.append("no session to review")
        self.teacher_task.cancel()
        await self.teacher.close()
        info["alerts_received_by_teacher"] = len(self.alerts)
        # The bot process's CPU over the replay (of one core), and how busy the whole machine was.
        if self.monitor is not None:
            info["bot_cpu_percent"] = round(self.monitor.cpu_percent(), 1)
            info["bot_peak_rss_mb"] = round(self.monitor.peak_rss / 2**20, 1)
            if self.monitor_task is not None:
                self.monitor_task.cancel()
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
        self.stop(errors)
        text = self.log_path.read_text(errors="replace")
        bad = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        errors.extend(bad[:20])
        stats_file = self.workdir / "stats.json"
        stats = json.loads(stats_file.read_text()) if stats_file.exists() else {}
        if stats.get("frame_errors"):
            errors.append(f"{stats['frame_errors']} frame errors in the bot")
        info["bot_stats"] = {k: stats.get(k) for k in ("frames_analysed", "frames_dropped", "frame_errors",
                                                      "inference_busy_s")}
        info["bot_log"] = str(self.log_path)
        return info

    def stop(self, errors: list[str]) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                errors.append("bot did not stop within 30 s of SIGTERM")
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            errors.append(f"bot exited with code {self.proc.returncode}")
        self._log.close()


async def replay(args: argparse.Namespace) -> dict[str, Any]:
    images = encode_clip(args.video, args.service, args.seconds)
    errors: list[str] = []
    db = Path(args.db) if args.db else None
    details: dict[str, Any] = {}
    own: OwnClass | None = None
    async with aiohttp.ClientSession() as http:
        if args.url:
            url = args.url
        else:
            db = db or Path(tempfile.mkdtemp(prefix="classmood-replay-")) / "classmood.sqlite"
            own = OwnClass(args, db)
            try:
                url = await own.start(http)
            except BaseException:
                own.stop(errors)
                raise
        if own is not None and own.monitor is not None:
            own.monitor.reset()
        try:
            people, started, ended = await play(url, args.service, images, args.students, args.seconds, errors,
                                                args.attendee_frames)
        except (aiohttp.ClientError, OSError) as exc:
            errors.append(f"cannot stream to {url.split('/ingest/')[0]}: {exc}")
            people, started, ended = [], time.time(), time.time()
        finally:
            if own is not None:
                await asyncio.sleep(1.5)       # the last frames' rows: the writer commits every 0.5 s
                details = await own.finish(http, errors)
    prefix = "rc" if args.service == "recall" else "at"
    pid = (lambda p: f"{prefix}-{p.pid}") if args.service == "recall" else (lambda p: f"{prefix}-u{p.pid}")
    students = [p for p in people if p.kind == "student"]
    sent = sum(p.sent for p in students)
    rows = read_samples(db, [pid(p) for p in people], started) if db is not None and people else []
    by_pid: dict[str, int] = {}
    for participant_id, _, _ in rows:
        by_pid[participant_id] = by_pid.get(participant_id, 0) + 1
    leaked = {pid(p): by_pid[pid(p)] for p in people if p.kind != "student" and pid(p) in by_pid}
    if leaked:
        errors.append(f"participants who must not be analysed have samples: {leaked}")
    latencies = sorted(stored - t for _, t, stored in rows if stored is not None)
    p95 = round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3) if latencies else None
    student_rows = sum(by_pid.get(pid(p), 0) for p in students)
    # Per student: samples per second of their own presence (the leaver was there 2/3 of the time).
    rates = {pid(p): round(by_pid.get(pid(p), 0) / max(1e-6, p.sent / FPS), 3) for p in students if p.sent}
    details.update({"service": args.service, "seconds": round(ended - started, 1), "db": str(db) if db else None,
                    "min_student_rate_hz": min(rates.values()) if rates else None,
                    "mean_student_rate_hz": round(sum(rates.values()) / len(rates), 3) if rates else None,
                    "p50_frame_to_row_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
                    "error_messages": errors[:20]})
    print(json.dumps(details), file=sys.stderr)
    return {"students": len(students), "frames_sent": sent, "samples": student_rows,
            "analysed_share": round(student_rows / sent, 3) if sent else 0.0,
            "p95_frame_to_row_s": p95, "errors": len(errors)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bot.ingest_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--service", choices=("recall", "attendee"), required=True)
    p.add_argument("--url", default=None, help="the ingest URL (default: start a server + bot here)")
    p.add_argument("--video", default=str(DEFAULT_VIDEO), help="the video every student's webcam shows")
    p.add_argument("--students", type=int, default=5)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--db", default=None, help="the SQLite file to read samples from (default with --url: none)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    p.add_argument("--attendee-frames", choices=("documented", "named"), default="documented",
                   help="attendee: frames in the shape of Attendee's docs (participant_uuid only; names and the host "
                   "from participant events; the default) or the earlier shape with a name, host flag and timestamp")
    p.add_argument("--pattern", default=None, help="own bot only: scripted expressions (confused|bored|happy|neutral)")
    p.add_argument("--bot-arg", action="append", default=[], help="own bot only: an extra flag for `python -m bot run`")
    p.add_argument("--keep-log", default=None, help="own bot only: write its log here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from bot.students import harness_arg_problem
    problem = harness_arg_problem(args.video, args.students, args.seconds)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.url and not args.url.startswith(("ws://", "wss://")):
        print("error: --url must be the ws:// or wss:// ingest URL", file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(replay(args))
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:<20}  {v}")
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
