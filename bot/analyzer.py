"""The inference worker thread: takes every student's pending frame, runs ONE batched
detect -> classify over all of them, and hands per-student results back to the event loop.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np

from bot.mailbox import FrameMailbox
from core import images
from core.faces import Faces

log = logging.getLogger("classmood.bot.analyzer")

DECODE_THREADS = 2       # PNG/JPEG decoders beside the inference thread (a bot gets about 2 cores)
MAX_SIDE = 1920          # larger frames are downscaled before detection (a 4K webcam adds nothing)


FrameKey = tuple[str, str]   # (room_id, participant_id): whose frame, in which room


@dataclass
class PendingFrame:
    frame: Any               # av.VideoFrame or encoded PNG/JPEG bytes (converted in this thread) or a BGR ndarray
    received_at: float       # wall clock, when the bot's track handed it over
    received_mono: float     # monotonic twin of received_at, for latency


@dataclass
class FrameResult:
    key: FrameKey
    received_at: float
    received_mono: float
    face_found: bool
    probs: np.ndarray | None = None      # (7,)
    box: np.ndarray | None = None        # (4,)
    keypoints: np.ndarray | None = None  # (6, 2)
    score: float | None = None
    frame_shape: tuple[int, int] | None = None
    error: str | None = None             # why this frame could not be analysed


class PartialRoundError(RuntimeError):
    """A round of which only some frames could be analysed (one of several inference processes failed):
    `faces` are the others' faces (frame ids index the round's frames), `failed` the frames that were lost."""

    def __init__(self, message: str, faces: Faces, failed: list[int]) -> None:
        super().__init__(message)
        self.faces = faces
        self.failed = failed


def decode_image(data: bytes) -> np.ndarray:
    """PNG/JPEG bytes (a meeting-bot service's frame) -> BGR; ValueError for a non-image, a truncated file or
    one larger than MAX_SIDE (checked from the header, before decoding: the server checks too)."""
    images.check(data, MAX_SIDE, MAX_SIDE)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("the image could not be decoded")
    return image


@dataclass(frozen=True)
class I420:
    """A decoded video frame as the VP8 decoder made it: the Y, U and V planes stacked, (height * 3/2, width)
    uint8. Half the bytes of BGR, so it is what crosses the pipe to the inference process, converted there."""
    planes: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.planes.shape[0] * 2 // 3, self.planes.shape[1]

    def to_bgr(self) -> np.ndarray:
        return cv2.cvtColor(self.planes, cv2.COLOR_YUV2BGR_I420)


def as_i420(frame: Any) -> I420 | None:
    """The planes of a yuv420p av.VideoFrame of a usable size (even sides, 8 to MAX_SIDE px), else None.
    Copying the planes out costs ~0.03 ms at 320x240; converting to BGR with OpenCV 0.05 ms, against 0.4 ms
    for PyAV's own conversion (swscale)."""
    fmt = getattr(getattr(frame, "format", None), "name", None)
    width, height = int(getattr(frame, "width", 0) or 0), int(getattr(frame, "height", 0) or 0)
    if fmt != "yuv420p" or width % 2 or height % 2 or min(width, height) < 8 or max(width, height) > MAX_SIDE:
        return None
    return I420(frame.to_ndarray())


def to_bgr(frame: Any) -> np.ndarray:
    """av.VideoFrame, PNG/JPEG bytes, I420 planes or ndarray -> a sane BGR uint8 image; ValueError for zero-size or
    odd frames."""
    planes = frame if isinstance(frame, I420) else as_i420(frame)
    if planes is not None:
        return planes.to_bgr()
    if isinstance(frame, np.ndarray):
        image = frame
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        image = decode_image(bytes(frame))
    else:
        width, height = int(getattr(frame, "width", 0) or 0), int(getattr(frame, "height", 0) or 0)
        if min(width, height) > 0 and max(width, height) > MAX_SIDE:
            # Scale while converting: a full-size BGR copy of a 16000x16000 frame is 768 MB and 4 s.
            scale = MAX_SIDE / max(width, height)
            frame = frame.reformat(width=max(8, round(width * scale)), height=max(8, round(height * scale)),
                                   format="bgr24")
        image = frame.to_ndarray(format="bgr24")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.shape[0] < 8 or image.shape[1] < 8:
        raise ValueError(f"unusable frame shape {image.shape}")
    if image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.dtype != np.uint8:
        raise ValueError(f"unusable frame dtype {image.dtype}")
    if max(image.shape[:2]) > MAX_SIDE:
        scale = MAX_SIDE / max(image.shape[:2])
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


class Analyzer:
    """One thread, one batched inference per round; `analyse(frames, keys) -> Faces` (one face per frame
    at most, with probs; keys say whose frame each is, so a face can be followed between samples) is
    injected so tests and the scripted model can stand in for the real one."""

    def __init__(self, analyse: Callable[[list[np.ndarray], list[FrameKey]], Faces], mailbox: FrameMailbox[FrameKey, PendingFrame],
                 on_results: Callable[[list[FrameResult]], None], max_batch: int = 64) -> None:
        self.analyse = analyse
        self.mailbox = mailbox
        self.on_results = on_results
        self.max_batch = max_batch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.frames = 0
        self.errors = 0
        self.busy_seconds = 0.0         # each round from its start to its results (rounds in flight together overlap)
        self.convert_seconds = 0.0      # of busy_seconds: preparing frames (planes copied out, or BGR); the rest is analyse()
        self._decode_pool: ThreadPoolExecutor | None = None
        self.observe_round: Callable[[float], None] | None = None   # seconds of each round (bot/metrics.py)
        self._prepare_seconds = 0.0     # recent time to prepare and send a round (moving average)

    def _decoder(self) -> ThreadPoolExecutor:
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="classmood-decode")
        return self._decode_pool

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="classmood-inference", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.mailbox.wake()
        if self._thread:
            self._thread.join(timeout)
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.analyse, "close", None)     # an analyser in a child process (inference_process.py)
        if callable(close):
            close()

    def _run(self) -> None:
        # An analyser that can take a round while it works on another (the child process: `submit`/`collect`)
        # gets the next round shortly before it finishes the last one. Preparing and pickling a round happens
        # in this thread, which shares the bot's GIL with the event loop (at 100 students ~15 % of a round's
        # time); done after the last round's results, it left the child idle meanwhile. Taken as late as that
        # allows, the next round's frames are as fresh as before.
        depth = 2 if callable(getattr(self.analyse, "submit", None)) else 1
        in_flight: deque[_Round] = deque()
        while not self._stop.is_set():
            if in_flight:
                self._until_next_round(in_flight[0])
            batch = self.mailbox.take_all(self.max_batch, timeout=0.0 if in_flight else 0.2)
            if batch:
                in_flight.append(self._start_round(batch, in_flight[-1] if in_flight else None))
            if in_flight and (len(in_flight) >= depth or not batch):
                self._end_round(in_flight.popleft())
        while in_flight:   # stopping: rounds already sent still deliver their results
            self._end_round(in_flight.popleft())

    def _until_next_round(self, busy: _Round) -> None:
        """Wait while the analyser works on `busy`, until its results are in or until it is time to prepare the
        next round: the expected end of `busy` less what preparing a round takes, with a margin."""
        wait = getattr(self.analyse, "wait", None)
        if busy.ticket is None or not callable(wait):
            return
        lead = 1.5 * self._prepare_seconds + 0.005
        wait(busy.ticket, busy.expected_end - lead - time.perf_counter())

    def _start_round(self, batch: list[tuple[FrameKey, PendingFrame]], previous: _Round | None = None) -> _Round:
        """Prepare a round and, for an analyser that takes rounds ahead, send it; `previous` is the round it
        will wait behind, for its expected end."""
        started = time.perf_counter()
        round_ = _Round(batch, started)
        try:
            self._prepare(round_)
            submit = getattr(self.analyse, "submit", None)
            if round_.images and callable(submit):
                round_.ticket = submit(round_.images, [batch[i][0] for i in round_.owners])
        except Exception as exc:  # the analyser refused the round; _end_round reports it
            round_.failure = exc
        sent = time.perf_counter()
        self._prepare_seconds = 0.7 * self._prepare_seconds + 0.3 * (sent - started)
        per_frame = float(getattr(self.analyse, "seconds_per_frame", 0.0) or 0.0)
        begins = max(sent, previous.expected_end if previous is not None else sent)
        round_.expected_end = begins + per_frame * len(round_.images)
        return round_

    def _end_round(self, round_: _Round) -> None:
        try:
            if round_.failure is not None:
                raise round_.failure
            results = self._analyse(round_)
        except Exception:  # never let one bad round kill analysis for the whole class
            log.exception("inference round failed; %d frames skipped", len(round_.batch))
            self.errors += len(round_.batch)
            results = [FrameResult(key, item.received_at, item.received_mono, False, error="inference failed")
                       for key, item in round_.batch]
        elapsed = time.perf_counter() - round_.started
        self.busy_seconds += elapsed
        if self.observe_round is not None:
            self.observe_round(elapsed)
        self.rounds += 1
        self.frames += len(round_.batch)
        try:
            self.on_results(results)
        except Exception:
            log.exception("delivering inference results failed")

    def process(self, batch: list[tuple[FrameKey, PendingFrame]]) -> list[FrameResult]:
        """One round, start to finish: prepare the frames, analyse them, one FrameResult per frame."""
        round_ = _Round(batch, time.perf_counter())
        self._prepare(round_)
        return self._analyse(round_)

    def _prepare(self, round_: _Round) -> None:
        """Each frame as the analyser takes it; a corrupt one is this student's error, not the round's."""
        # An analyser in another process takes a decoded video frame's planes and converts them itself.
        prepare: Callable[[Any], Any] = getattr(self.analyse, "prepare", to_bgr)
        batch = round_.batch
        # Encoded frames (meeting-bot services) are decoded in parallel: OpenCV releases the GIL while it
        # inflates a PNG, and a 640x360 PNG costs about as much as finding the face in it.
        encoded = {i: item.frame for i, (_, item) in enumerate(batch) if isinstance(item.frame, (bytes, bytearray))}
        started = time.perf_counter()
        decoding = {i: self._decoder().submit(to_bgr, data) for i, data in encoded.items()} if len(encoded) > 1 else {}
        for i, (key, item) in enumerate(batch):
            result = FrameResult(key, item.received_at, item.received_mono, False)
            round_.results.append(result)
            try:
                image = decoding[i].result() if i in decoding else prepare(item.frame)
            except Exception as exc:  # corrupt / zero-size frame: this student's sample only
                result.error = f"bad frame: {exc}"
                self.errors += 1
                log.warning("dropping a bad frame from %s: %s", key, exc)
                continue
            result.frame_shape = image.shape[:2]
            round_.images.append(image)
            round_.owners.append(i)
        self.convert_seconds += time.perf_counter() - started

    def _analyse(self, round_: _Round) -> list[FrameResult]:
        """The round's faces (collected from the analyser it was submitted to, or computed now) into its results."""
        if not round_.images:
            return round_.results
        try:
            if round_.ticket is not None:
                faces = self.analyse.collect(round_.ticket)   # type: ignore[attr-defined]
            else:
                faces = self.analyse(round_.images, [round_.batch[i][0] for i in round_.owners])
        except PartialRoundError as partial:
            # The students of the process that failed lose this sample; the rest of the class keeps theirs.
            log.warning("inference round partly failed (%s); %d of %d frames skipped", partial, len(partial.failed),
                        len(round_.images))
            faces = partial.faces
            for k in partial.failed:
                round_.results[round_.owners[k]].error = "inference failed"
            self.errors += len(partial.failed)
        for j in range(len(faces)):
            result = round_.results[round_.owners[int(faces.frame_ids[j])]]
            result.face_found = True
            result.box = faces.boxes[j]
            result.keypoints = faces.keypoints[j]
            result.score = float(faces.scores[j])
            result.probs = None if faces.probs is None else faces.probs[j]
        return round_.results


@dataclass
class _Round:
    """One batch on its way through the analyser: the frames taken, what was sent, and whose each face is."""
    batch: list[tuple[FrameKey, PendingFrame]]
    started: float
    results: list[FrameResult] = field(default_factory=list)
    images: list[Any] = field(default_factory=list)    # what the analyser takes, for the frames that could be prepared
    owners: list[int] = field(default_factory=list)    # images[k] is batch[owners[k]]
    ticket: Any = None                                 # the analyser's receipt for a submitted round
    expected_end: float = 0.0                          # perf_counter when the analyser should be done with it
    failure: Exception | None = None
