"""The analyser in a child process, so that inference and the bot's event loop never share a GIL.

In one process, every OpenCV or TFLite call of the inference thread releases the GIL and must win it back
from an event loop that is busy with thousands of RTP packets a second; at 100 students the inference thread
measured ~19 ms per frame for ~4.5 ms of work (issue 24). Here the inference thread of the bot only copies
each decoded frame's YUV planes out (half the bytes of BGR, no colour conversion under the bot's GIL) and waits
on a pipe; a child process (spawned, not forked: the parent has threads) converts, detects, follows and
classifies. The bot's thread sends the next round while the child works on the last one (two in flight at
most), so the child does not wait while the bot prepares and pickles; the mailbox's drop-stale policy still
sets the pace.

A child that dies or hangs costs its round (the frames are reported as errors, as any failed round is) and
is started again; a child that cannot load the model fails the bot's start-up with the model's error.

The bot runs an InferencePool of such children (bot.inference_processes, one per core by default), each
analysing its share of the students, at a lower priority than the bot's connections (bot.inference_nice).
In a pool, a child that dies costs only its own share of the round: the other children's students keep that
sample (PartialRoundError carries their faces to the Analyzer).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import struct
import threading
import time
import zlib
from multiprocessing.connection import Connection
from typing import Any, Hashable, NoReturn, Sequence

import numpy as np

from bot.analyzer import I420, PartialRoundError, as_i420, to_bgr
from core.faces import Faces
from core.settings import Settings

log = logging.getLogger("classmood.bot.inference")

START_TIMEOUT = 120.0     # loading LiteRT and the models; generous for a slow machine
ROUND_TIMEOUT = 60.0      # one round of up to max_batch frames; a child slower than this is hung


class InferenceProcessError(RuntimeError):
    pass


# A round crosses the pipe as a pickle with its frames' pixels out of band (pickle protocol 5): a header
# (buffer count and sizes, then the pickle), then each frame's bytes as a message of its own, read by the child
# straight into a buffer of its own. `Connection.send` pickled a round of 20 frames into one growing stream first:
# ~0.28 ms a 320x240 frame under the bot's GIL and ~0.13 ms in the child, against ~0.05 ms each this way.
_SIZE = struct.Struct("!I")


def send_round(conn: Connection, message: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    conn.send_bytes(b"".join([_SIZE.pack(len(views)), *(_SIZE.pack(v.nbytes) for v in views), data]))
    for view in views:
        conn.send_bytes(view)


def recv_round(conn: Connection) -> Any:
    header = conn.recv_bytes()
    (count,) = _SIZE.unpack_from(header)
    sizes = [_SIZE.unpack_from(header, _SIZE.size * (1 + i))[0] for i in range(count)]
    buffers = []
    for size in sizes:
        buffer = bytearray(size)     # writable: the analyser gets arrays it may change, as before
        if conn.recv_bytes_into(buffer) != size:
            raise EOFError("a frame's bytes were cut short")
        buffers.append(buffer)
    return pickle.loads(memoryview(header)[_SIZE.size * (1 + count):], buffers=buffers)


def lower_priority(increment: int) -> None:
    """Raise this process's nice value by `increment` (at most 19). On Linux a nice value belongs to a thread and
    new threads inherit their creator's, so every thread already running (a spawned child has a few by the time
    its target runs, e.g. numpy's) is lowered, and the ones started later follow the calling thread's."""
    if increment <= 0:
        return
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]     # no /proc: the calling thread (the whole process where nice is per process)
    for tid in threads:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        except OSError:   # a thread that has just ended; or a platform without it: only the ordering is lost
            pass


def _serve(conn: Connection, settings: Settings) -> None:
    """The child: build the analyser, say ready (or why not), then answer rounds until the pipe closes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    lower_priority(settings.bot.inference_nice)
    try:
        from models.runtime.analyse import build_analyse
        analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                                min_score=settings.bot.min_face_score, redetect_every=settings.bot.redetect_every,
                                alternate_mirror=settings.bot.alternate_mirror)
    except Exception as exc:   # the parent raises it as the bot's start-up error
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    # Rounds are read by their own thread, so that the pipe is always drained: the parent sends the next
    # round while this one is analysed, and both sides writing to a full pipe at once would deadlock.
    rounds: queue.Queue[tuple[list[Any], list[Hashable] | None] | None] = queue.Queue()

    def read() -> None:
        while True:
            try:
                rounds.put(recv_round(conn))
            except BaseException:   # the pipe closed (or broke): the parent starts a new child if it needs one
                rounds.put(None)
                return

    threading.Thread(target=read, name="classmood-inference-reader", daemon=True).start()
    while True:
        try:
            request = rounds.get()
        except KeyboardInterrupt:
            return
        if request is None:
            return
        frames, keys = request
        try:
            started, started_wall = time.process_time(), time.perf_counter()
            faces = analyse([f.to_bgr() if isinstance(f, I420) else f for f in frames], keys)
            conn.send(("ok", (faces, time.process_time() - started, time.perf_counter() - started_wall, len(frames))))
        except Exception as exc:   # a bad round: the parent reports it; the child keeps serving
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class ProcessAnalyse:
    """`analyse(frames, keys) -> Faces`, computed by a child process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.restarts = 0
        self.child_cpu_seconds = 0.0    # CPU time the child spent analysing
        self.child_wall_seconds = 0.0   # wall time it took (more than the CPU time: the child waited for a core);
                                        # the rest of a round's wait is the trip through the pipe
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._conn: Connection | None = None
        self._generation = 0            # which child a round was sent to (see collect)
        self.seconds_per_frame = 0.0    # the child's recent wall time per frame (moving average), 0 until known
        self._start()

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=_serve, args=(child, self.settings), name="classmood-inference",
                                        daemon=True)
        process.start()
        child.close()
        self._process, self._conn = process, parent
        started = time.monotonic()
        if not parent.poll(START_TIMEOUT):
            self.close()
            raise InferenceProcessError(f"the inference process did not start within {START_TIMEOUT:.0f} s")
        try:
            status, detail = parent.recv()
        except (EOFError, OSError):
            self.close()
            raise InferenceProcessError(f"the inference process exited during start-up (code {process.exitcode})") from None
        if status != "ready":
            self.close()
            raise ValueError(detail)
        log.info("inference process %d ready in %.1f s", process.pid, time.monotonic() - started)

    @staticmethod
    def prepare(frame: Any) -> np.ndarray | I420:
        """What the bot's thread hands over for one frame: a video frame's planes (converted in the child), or BGR."""
        return as_i420(frame) or to_bgr(frame)

    def __call__(self, frames: Sequence[np.ndarray | I420], keys: Sequence[Hashable] | None = None) -> Faces:
        return self.collect(self.submit(frames, keys))

    def submit(self, frames: Sequence[np.ndarray | I420], keys: Sequence[Hashable] | None = None) -> int:
        """Send a round to the child and return at once; `collect(ticket)` reads its faces. The child answers
        rounds in the order they were sent, so collect them in that order."""
        if self._conn is None:
            self._start()
        assert self._conn is not None
        try:
            send_round(self._conn, (frames, list(keys) if keys is not None else None))
        except OSError as exc:
            self._restart(exc)
        return self._generation

    def collect(self, ticket: int) -> Faces:
        """The faces of the oldest round not yet collected (sent under `ticket`). A round sent to a child that
        has since been restarted is lost: InferenceProcessError, without waiting."""
        if ticket != self._generation or self._conn is None:
            raise InferenceProcessError("the inference process was restarted; this round is lost")
        try:
            if not self._conn.poll(ROUND_TIMEOUT):
                raise TimeoutError(f"no answer within {ROUND_TIMEOUT:.0f} s")
            status, payload = self._conn.recv()
        except (EOFError, OSError, TimeoutError) as exc:
            self._restart(exc)
        if status != "ok":
            raise InferenceProcessError(str(payload))
        faces: Faces = payload[0]
        self.child_cpu_seconds += float(payload[1])
        self.child_wall_seconds += float(payload[2])
        frames = int(payload[3])
        if frames:
            per_frame = float(payload[2]) / frames
            self.seconds_per_frame = per_frame if not self.seconds_per_frame else 0.7 * self.seconds_per_frame + 0.3 * per_frame
        return faces

    def wait(self, ticket: int, timeout: float) -> bool:
        """Whether the oldest round's answer (or its failure) can be collected without blocking, waiting up to
        `timeout` seconds for it."""
        if ticket != self._generation or self._conn is None:
            return True
        try:
            return self._conn.poll(max(0.0, timeout))
        except (EOFError, OSError):
            return True

    def _restart(self, exc: BaseException) -> NoReturn:
        code = self._process.exitcode if self._process is not None else None
        log.error("the inference process failed (%s; exit code %s); starting a new one", exc or type(exc).__name__, code)
        self.close()
        self.restarts += 1
        self._generation += 1       # rounds the old child held are lost
        self._start()
        raise InferenceProcessError("the inference process was restarted; this round is lost") from None

    def close(self) -> None:
        """Stop the child (closing the pipe ends its loop; terminate if it does not)."""
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is not None:
            conn.close()
        if process is not None:
            process.join(2.0)
            if process.is_alive():
                process.terminate()
                process.join(2.0)


def inference_process_count(setting: int) -> int:
    """bot.inference_processes, with 0 (auto) read as one per CPU core this process may run on, at most 4."""
    if setting > 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def shard_of(key: Hashable, shards: int) -> int:
    """Which of `shards` inference processes analyses a student: stable for the student's whole class, so
    that the face it follows between samples (models/runtime/tracking.py) stays in one process."""
    return zlib.crc32(repr(key).encode()) % shards if shards > 1 else 0


class InferencePool:
    """`analyse(frames, keys) -> Faces` over several inference processes, each analysing its share of the
    students (shard_of). One process can use one core at most, and at 100 students it was the bot's limit
    while the machine had idle time (issue 24); two can use what the event loop leaves on both cores.
    Same submit / collect / wait / prepare as ProcessAnalyse, which it holds one of per process."""

    def __init__(self, settings: Settings, processes: int) -> None:
        if processes < 1:
            raise ValueError("an inference pool needs at least one process")
        self.children: list[ProcessAnalyse] = []
        try:
            for _ in range(processes):
                self.children.append(ProcessAnalyse(settings))
        except BaseException:
            self.close()
            raise

    prepare = staticmethod(ProcessAnalyse.prepare)

    @property
    def restarts(self) -> int:
        return sum(child.restarts for child in self.children)

    @property
    def child_cpu_seconds(self) -> float:
        return sum(child.child_cpu_seconds for child in self.children)

    @property
    def child_wall_seconds(self) -> float:
        return sum(child.child_wall_seconds for child in self.children)

    @property
    def seconds_per_frame(self) -> float:
        """Wall time a round takes per frame: the processes work on their shares side by side."""
        known = [child.seconds_per_frame for child in self.children if child.seconds_per_frame]
        return sum(known) / len(known) / len(self.children) if known else 0.0

    def __call__(self, frames: Sequence[np.ndarray | I420], keys: Sequence[Hashable] | None = None) -> Faces:
        return self.collect(self.submit(frames, keys))

    def submit(self, frames: Sequence[np.ndarray | I420], keys: Sequence[Hashable] | None = None) -> list[tuple[int, int, list[int]]]:
        """Send each process its students' frames; the ticket lists (process, its ticket, the frames' places)."""
        shares: dict[int, list[int]] = {}
        for i in range(len(frames)):
            shard = shard_of(keys[i], len(self.children)) if keys is not None else i % len(self.children)
            shares.setdefault(shard, []).append(i)
        ticket = []
        for shard, places in sorted(shares.items()):
            child = self.children[shard]
            try:
                child_ticket = child.submit([frames[i] for i in places], [keys[i] for i in places] if keys is not None else None)
            except InferenceProcessError:
                child_ticket = -1        # restarted while sending: collect reports this share as lost
            ticket.append((shard, child_ticket, places))
        return ticket

    def collect(self, ticket: list[tuple[int, int, list[int]]]) -> Faces:
        """Every process's answer for the round (all are read, so that none is left in a pipe out of order),
        as one Faces in frame order. A process that failed loses its share: PartialRoundError carries the
        others' faces and the lost frames (the failure itself when the round had one share)."""
        parts: list[Faces] = []
        failure: Exception | None = None
        failed: list[int] = []
        for shard, child_ticket, places in ticket:
            try:
                faces = self.children[shard].collect(child_ticket)
            except Exception as exc:
                failure = failure or exc
                failed += places
                continue
            parts.append(Faces(faces.boxes, faces.scores, faces.keypoints,
                               np.asarray(places, np.int32)[faces.frame_ids] if len(faces) else faces.frame_ids, faces.probs))
        faces = Faces.concat(parts)
        faces = faces[np.argsort(faces.frame_ids, kind="stable")] if len(faces) else faces
        if failure is not None:
            if len(ticket) == 1:
                raise failure
            raise PartialRoundError(f"{type(failure).__name__}: {failure}", faces, sorted(failed)) from failure
        return faces

    def wait(self, ticket: list[tuple[int, int, list[int]]], timeout: float) -> bool:
        """Whether the whole round can be collected without blocking, waiting up to `timeout` seconds."""
        deadline = time.perf_counter() + max(0.0, timeout)
        return all(self.children[shard].wait(child_ticket, deadline - time.perf_counter())
                   for shard, child_ticket, _ in ticket)

    def close(self) -> None:
        for child in self.children:
            child.close()
