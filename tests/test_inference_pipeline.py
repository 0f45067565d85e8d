"""The inference thread keeps the analyser busy: the next round is sent while the last one is analysed,
results come back in order, and a restarted child loses only the rounds it held."""
from __future__ import annotations

import os
import queue
import signal
import threading
import time

import cv2
import numpy as np
import pytest

from bot.analyzer import Analyzer, PartialRoundError, PendingFrame
from bot.inference_process import InferenceProcessError, ProcessAnalyse
from bot.mailbox import FrameMailbox
from core.faces import Faces
from core.settings import Settings
from tests.spine import VIDEOS, one_face_per_frame


class WorkerAnalyse:
    """An analyser that takes rounds ahead, as the child process does: a worker thread analyses them in
    order (5 ms a frame), and the test sees how many were outstanding at once."""

    def __init__(self) -> None:
        self.seconds_per_frame = 0.0
        self.outstanding = 0
        self.most_outstanding = 0
        self.submitted: list[int] = []       # each round's size, in the order sent
        self._jobs: queue.Queue = queue.Queue()
        self._done: dict[int, threading.Event] = {}
        self._faces: dict[int, Faces] = {}
        self._lock = threading.Lock()
        threading.Thread(target=self._work, daemon=True).start()

    def _work(self) -> None:
        while True:
            ticket, frames = self._jobs.get()
            time.sleep(0.005 * len(frames))
            self._faces[ticket] = one_face_per_frame(frames)
            self._done[ticket].set()

    def submit(self, frames, keys) -> int:
        with self._lock:
            ticket = len(self.submitted)
            self.submitted.append(len(frames))
            self.outstanding += 1
            self.most_outstanding = max(self.most_outstanding, self.outstanding)
            self._done[ticket] = threading.Event()
        self._jobs.put((ticket, list(frames)))
        return ticket

    def wait(self, ticket: int, timeout: float) -> bool:
        return self._done[ticket].wait(max(0.0, timeout))

    def collect(self, ticket: int) -> Faces:
        assert self._done[ticket].wait(5)
        with self._lock:
            self.outstanding -= 1
        self.seconds_per_frame = 0.005
        return self._faces.pop(ticket)

    def __call__(self, frames, keys=None) -> Faces:
        return self.collect(self.submit(frames, keys))


def test_the_next_round_is_sent_while_the_analyser_works_and_every_frame_taken_gets_its_result():
    rounds: list[list] = []
    box: FrameMailbox[tuple[str, str], PendingFrame] = FrameMailbox()
    analyse = WorkerAnalyse()
    analyzer = Analyzer(analyse, box, rounds.append, max_batch=64)
    frame = np.full((240, 320, 3), 128, np.uint8)
    analyzer.start()
    # 40 students sending 20 frames/s each: more than 5 ms a frame can keep up with, as at 100 students
    ends = time.monotonic() + 1.5
    while time.monotonic() < ends:
        for student in range(40):
            box.put(("room", f"s{student}"), PendingFrame(frame, time.time(), time.monotonic()))
        time.sleep(0.05)
    analyzer.stop()
    assert analyse.most_outstanding == 2            # a round was sent before the last one's results were read
    assert len(rounds) == len(analyse.submitted)    # every round sent was delivered, those in flight at stop too
    assert [len(r) for r in rounds] == analyse.submitted      # in the order they were sent
    delivered = sum(len(r) for r in rounds)
    assert delivered == analyzer.frames == box.accepted - box.dropped - box.pending()
    assert all(r.face_found and r.probs.argmax() == 3 for batch in rounds for r in batch)


def test_an_analyser_that_takes_one_round_at_a_time_is_called_round_by_round():
    calls: list[int] = []
    busy = threading.Lock()

    def analyse(frames, keys):
        assert busy.acquire(blocking=False), "called while a round was running"
        try:
            calls.append(len(frames))
            time.sleep(0.01)
            return one_face_per_frame(frames)
        finally:
            busy.release()
    results: list = []
    box: FrameMailbox[tuple[str, str], PendingFrame] = FrameMailbox()
    analyzer = Analyzer(analyse, box, results.extend)
    analyzer.start()
    frame = np.full((240, 320, 3), 128, np.uint8)
    for _ in range(20):
        for student in range(5):
            box.put(("room", f"s{student}"), PendingFrame(frame, time.time(), time.monotonic()))
        time.sleep(0.01)
    deadline = time.monotonic() + 5
    while box.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    analyzer.stop()
    assert sum(calls) == len(results) == box.accepted - box.dropped
    assert all(r.face_found for r in results)


def test_a_round_that_partly_fails_keeps_the_other_students_samples():
    """One of several inference processes died: its students' frames are reported as errors, every other
    student's sample of that round is delivered."""
    def analyse(frames, keys):
        faces = one_face_per_frame(frames)
        lost = [i for i, key in enumerate(keys) if key[1] in ("s1", "s3")]
        kept = np.array([i not in lost for i in range(len(frames))])
        raise PartialRoundError("InferenceProcessError: the inference process died", faces[kept], lost)
    results: list = []
    box: FrameMailbox[tuple[str, str], PendingFrame] = FrameMailbox()
    analyzer = Analyzer(analyse, box, results.extend)
    frame = np.full((240, 320, 3), 128, np.uint8)
    for student in range(5):
        box.put(("room", f"s{student}"), PendingFrame(frame, time.time(), time.monotonic()))
    analyzer.start()
    deadline = time.monotonic() + 5
    while len(results) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    analyzer.stop()
    by_student = {r.key[1]: r for r in results}
    assert sorted(by_student) == ["s0", "s1", "s2", "s3", "s4"]
    assert [s for s, r in sorted(by_student.items()) if r.face_found and r.error is None] == ["s0", "s2", "s4"]
    assert all(by_student[s].error == "inference failed" and not by_student[s].face_found for s in ("s1", "s3"))
    assert analyzer.errors == 2


def wait_until_stopped(pid: int, timeout: float = 5.0) -> bool:
    """Whether the process is stopped (state T in /proc) within `timeout` seconds: a signal is delivered
    asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                return True
        time.sleep(0.005)
    return False


def face_and_empty_frame() -> tuple[np.ndarray, np.ndarray]:
    """A 320x240 webcam frame with a real face (the shared video's first), and one with nobody; skips without it."""
    capture = cv2.VideoCapture(str(VIDEOS / "woman2.mp4"))
    ok, face = capture.read()
    capture.release()
    if not ok:
        pytest.skip(f"needs ../shared/media/videos/woman2.mp4 (a real face): {VIDEOS} is absent")
    return cv2.resize(face, (320, 240)), np.full((240, 320, 3), 90, np.uint8)


def test_rounds_sent_ahead_to_the_inference_process_come_back_in_order_and_a_restart_loses_only_those():
    settings = Settings().replace(model={"model": "scripted:happy", "detector": "short"})
    face, blank = face_and_empty_frame()
    analyse = ProcessAnalyse(settings)
    try:
        first = analyse.submit([face], [("r", "a")])
        second = analyse.submit([blank, blank, face], [("r", "b"), ("r", "c"), ("r", "d")])
        assert analyse.collect(first).frame_ids.tolist() == [0]
        assert analyse.collect(second).frame_ids.tolist() == [2]
        assert analyse.seconds_per_frame > 0

        # The child is stopped first, so that it cannot answer the two rounds before it dies (small frames:
        # both fit in the pipe while nobody reads it).
        small = np.full((48, 64, 3), 90, np.uint8)
        os.kill(analyse._process.pid, signal.SIGSTOP)
        assert wait_until_stopped(analyse._process.pid)
        held = [analyse.submit([small], [("r", "a")]), analyse.submit([small], [("r", "b")])]
        os.kill(analyse._process.pid, signal.SIGKILL)
        for ticket in held:
            with pytest.raises(InferenceProcessError, match="restarted"):
                analyse.collect(ticket)
        assert analyse.restarts == 1                # the second lost round did not restart the new child
        assert analyse([face], [("r", "a")]).frame_ids.tolist() == [0]
    finally:
        analyse.close()


def test_a_pool_of_inference_processes_splits_the_class_and_answers_in_frame_order():
    """Each student always goes to the same process (its followed face lives there); every process gets its
    share; the pool's faces point at the frames as sent, like one process's; a dead process costs one round."""
    from bot.inference_process import InferencePool, shard_of
    settings = Settings().replace(model={"model": "scripted:happy", "detector": "short"})
    face, blank = face_and_empty_frame()
    students = [("room", f"student-{i}") for i in range(12)]
    assert {shard_of(key, 2) for key in students} == {0, 1}
    assert all(shard_of(key, 2) == shard_of(("room", key[1]), 2) for key in students)   # stable
    frames = [face if i % 3 else blank for i in range(len(students))]                   # every third: nobody
    pool = InferencePool(settings, 2)
    single = ProcessAnalyse(settings)
    try:
        first = pool.submit(frames, students)
        second = pool.submit(frames[:5], students[:5])                                  # two rounds in flight
        assert pool.wait(first, 30)
        faces = pool.collect(first)
        assert faces.frame_ids.tolist() == [i for i in range(len(students)) if i % 3]
        alone = single(frames, students)                                                 # one process, same round
        assert faces.frame_ids.tolist() == alone.frame_ids.tolist()
        assert np.allclose(faces.boxes, alone.boxes, atol=1e-3) and np.allclose(faces.probs, alone.probs)
        assert pool.collect(second).frame_ids.tolist() == [1, 2, 4]
        assert all(child.child_wall_seconds > 0 for child in pool.children)
        assert pool.seconds_per_frame > 0 and pool.child_cpu_seconds > 0

        # One process dies: its share of the round is lost, the other process's answer is read and kept
        # (nothing is left in its pipe to be taken for the next round's), and the pool carries on.
        os.kill(pool.children[0]._process.pid, signal.SIGKILL)
        pool.children[0]._process.join(5)
        with pytest.raises(PartialRoundError) as partial:
            pool(frames, students)
        lost = [i for i, key in enumerate(students) if shard_of(key, 2) == 0]
        assert partial.value.failed == lost
        assert partial.value.faces.frame_ids.tolist() == [i for i in range(len(students)) if i % 3 and i not in lost]
        assert isinstance(partial.value.__cause__, InferenceProcessError)
        assert pool.restarts == 1
        assert pool(frames, students).frame_ids.tolist() == [i for i in range(len(students)) if i % 3]
    finally:
        pool.close()
        single.close()


def process_nice(pid: int) -> int:
    """Every thread's nice value of a process, from /proc (field 19 of each thread's stat line)."""
    values = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/stat") as stat:
            values.add(int(stat.read().rsplit(")", 1)[1].split()[16]))
    assert len(values) == 1, f"threads of {pid} at different nice values: {values}"
    return values.pop()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads per-thread nice values from Linux's /proc")
def test_the_inference_processes_yield_the_cpu_to_the_bots_connections_and_a_restarted_one_too():
    """bot.inference_nice: every thread of every inference process (TFLite's, the pipe reader) runs at the
    lower priority, including a process started again after a crash; the bot's own process is untouched."""
    from bot.inference_process import InferencePool
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base + 5 > 19:
        pytest.skip(f"this test process already runs at nice {base}")
    pool = InferencePool(Settings().replace(model={"model": "scripted:happy", "detector": "short"}), 2)
    try:
        pool([np.full((240, 320, 3), 90, np.uint8)] * 4, [("r", f"s{i}") for i in range(4)])
        assert [process_nice(child._process.pid) for child in pool.children] == [base + 5, base + 5]
        os.kill(pool.children[1]._process.pid, signal.SIGKILL)
        pool.children[1]._process.join(5)
        with pytest.raises(PartialRoundError):      # the dead process's share of the round is lost
            pool([np.full((240, 320, 3), 90, np.uint8)] * 4, [("r", f"s{i}") for i in range(4)])
        assert process_nice(pool.children[1]._process.pid) == base + 5
        assert os.getpriority(os.PRIO_PROCESS, 0) == base
    finally:
        pool.close()
    unniced = InferencePool(Settings().replace(model={"model": "scripted:happy"}, bot={"inference_nice": 0}), 1)
    try:
        assert process_nice(unniced.children[0]._process.pid) == base
    finally:
        unniced.close()
    # An increment beyond what nice can express is refused at start-up.
    with pytest.raises(ValueError, match="bot.inference_nice"):
        Settings().replace(bot={"inference_nice": 20}).validate()
