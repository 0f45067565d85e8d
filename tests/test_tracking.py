"""Following a student's face between samples (models.runtime.tracking): the detector runs every Nth
sample, the followed box moves with the face, and anything doubtful goes back to the detector."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from core.faces import Faces
from core.settings import ModelSettings
from models.baseline import shared_dir
from models.runtime.analyse import build_analyse
from models.runtime.tracking import FaceTracker

KEYPOINTS = np.array([[12, 14], [28, 14], [20, 22], [20, 30], [6, 16], [34, 16]], np.float32)


def textured_face(side: int = 40, seed: int = 0) -> np.ndarray:
    """A patch with enough structure for a template match (a smoothed random texture)."""
    noise = np.random.default_rng(seed).integers(0, 255, (side // 4, side // 4, 3), np.uint8)
    return cv2.resize(noise, (side, side), interpolation=cv2.INTER_CUBIC)


def frame_with_face(x: int, y: int, face: np.ndarray, shape: tuple[int, int] = (240, 320)) -> np.ndarray:
    frame = np.full((*shape, 3), 90, np.uint8)
    frame[y:y + face.shape[0], x:x + face.shape[1]] = face
    return frame


class CountingDetector:
    """Finds the textured patch where the test put it; counts how often it is asked."""

    def __init__(self, score: float = 0.9, side: int = 40) -> None:
        self.where: dict[int, tuple[int, int]] = {}   # id(frame) -> top-left of the face, or absent
        self.calls = 0
        self.score = score
        self.side = side

    def detect(self, frames: list[np.ndarray]) -> Faces:
        self.calls += len(frames)
        parts = []
        for i, frame in enumerate(frames):
            if id(frame) in self.where:
                x, y = self.where[id(frame)]
                parts.append(Faces(np.array([[x, y, x + self.side, y + self.side]], np.float32),
                                   np.array([self.score], np.float32),
                                   (KEYPOINTS * self.side / 40 + [x, y])[None], np.array([i], np.int32)))
        return Faces.concat(parts)


def test_the_detector_runs_every_nth_sample_and_the_box_follows_the_face():
    detector = CountingDetector()
    tracker = FaceTracker(detector, redetect_every=4)
    face = textured_face()
    boxes = []
    for step in range(8):
        x, y = 100 + 3 * step, 80 + 2 * step
        detector.where.clear()
        frame = frame_with_face(x, y, face)
        detector.where[id(frame)] = (x, y)
        faces = tracker.detect([frame], ["student"])
        assert len(faces) == 1
        boxes.append(faces.boxes[0])
        assert np.allclose(faces.boxes[0], [x, y, x + 40, y + 40], atol=1.5)
        assert np.allclose(faces.keypoints[0], KEYPOINTS + [x, y], atol=1.5)
    assert detector.calls == 2            # samples 0 and 4; the six others were followed
    assert tracker.stats.tracked == 6


def test_a_face_that_is_gone_or_a_resized_frame_goes_back_to_the_detector():
    detector = CountingDetector()
    tracker = FaceTracker(detector, redetect_every=10)
    face = textured_face()
    first = frame_with_face(100, 80, face)
    detector.where[id(first)] = (100, 80)
    tracker.detect([first], ["s"])
    other = frame_with_face(100, 80, textured_face(seed=7))       # somebody else's face
    assert len(tracker.detect([other], ["s"])) == 0 and detector.calls == 2
    assert tracker.stats.lost == 1
    detector.where[id(first)] = (100, 80)
    tracker.detect([first], ["s"])                                 # anchored again
    bigger = frame_with_face(100, 80, face, shape=(480, 640))      # the sender switched resolution
    detector.where[id(bigger)] = (100, 80)
    tracker.detect([bigger], ["s"])
    assert detector.calls == 4


def test_students_are_followed_separately_in_one_batch():
    detector = CountingDetector()
    tracker = FaceTracker(detector, redetect_every=4)
    faces_of = {"a": textured_face(seed=1), "b": textured_face(seed=2)}
    for step in range(4):
        detector.where.clear()     # ids of the previous step's frames may be reused by this step's
        frames = [frame_with_face(50 + step, 60, faces_of["a"]), np.full((240, 320, 3), 90, np.uint8),
                  frame_with_face(200, 100 + step, faces_of["b"])]
        detector.where[id(frames[0])] = (50 + step, 60)
        detector.where[id(frames[2])] = (200, 100 + step)
        faces = tracker.detect(frames, ["a", "nobody", "b"])
        assert faces.frame_ids.tolist() == [0, 2]
        assert np.allclose(faces.boxes[0][:2], [50 + step, 60], atol=1.5)
        assert np.allclose(faces.boxes[1][:2], [200, 100 + step], atol=1.5)
    # a and b: detected once each; the empty frame: every sample (the quick pass after two misses)
    assert detector.calls == 2 + 4


def test_an_empty_chair_gets_the_quick_pass_and_the_full_chain_every_few_samples():
    full, quick = CountingDetector(), CountingDetector()
    tracker = FaceTracker(full, quick, redetect_every=4, miss_backoff=4)
    empty = np.full((240, 320, 3), 90, np.uint8)
    for _ in range(9):
        tracker.detect([empty], ["away"])
    # miss 0 -> full chain; then 1, 2, 3 quick; 4 full; 5, 6, 7 quick; 8 full
    assert (full.calls, quick.calls) == (3, 6)
    patient = FaceTracker(CountingDetector(), CountingDetector(), redetect_every=4, miss_backoff=4, quick_after=2)
    for _ in range(9):
        patient.detect([empty], ["away"])
    # quick_after=2 (the policy before 2026-12-01): misses 0 and 1 -> full chain; 2, 3 quick; 4 full; ...
    assert (patient.detector.calls, patient.quick.calls) == (4, 5)


def test_doubtful_faces_and_calls_without_keys_are_always_detected():
    detector = CountingDetector(score=0.6)
    tracker = FaceTracker(detector, redetect_every=4, min_anchor_score=0.75)
    frame = frame_with_face(100, 80, textured_face())
    detector.where[id(frame)] = (100, 80)
    for _ in range(3):
        assert len(tracker.detect([frame], ["s"])) == 1
    assert detector.calls == 3
    confident = CountingDetector()
    keyless = FaceTracker(confident, redetect_every=4)
    confident.where[id(frame)] = (100, 80)
    for _ in range(3):
        keyless.detect([frame])
    assert confident.calls == 3


def test_mismatched_keys_are_refused():
    with pytest.raises(ValueError, match="2 frames but 1 keys"):
        FaceTracker(CountingDetector()).detect([np.zeros((8, 8, 3), np.uint8)] * 2, ["a"])
    with pytest.raises(ValueError):
        FaceTracker(CountingDetector(), redetect_every=0)


def test_the_bots_analyser_follows_a_real_webcam_face_with_fewer_detections():
    shared = shared_dir()
    if shared is None:
        pytest.skip("../shared not found: set CLASSMOOD_SHARED to the shared folder (media/videos)")
    from models.bench import bot_samples
    frames = bot_samples(Path(shared) / "media" / "videos" / "woman2.mp4")[:12]
    every = build_analyse(ModelSettings(model="scripted:neutral"), redetect_every=1)
    followed = build_analyse(ModelSettings(model="scripted:neutral"), redetect_every=4)
    reference = [every([f], ["s"]) for f in frames]
    tracked = [followed([f], ["s"]) for f in frames]
    assert all(len(r) == 1 for r in reference), "the shared clip shows its face in every sample"
    assert all(len(t) == 1 for t in tracked)
    ious = []
    for r, t in zip(reference, tracked):
        a, b = r.boxes[0], t.boxes[0]
        inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
        ious.append(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))
    assert min(ious) > 0.6 and float(np.mean(ious)) > 0.85
    assert followed.tracker.stats.detected <= 6 and followed.tracker.stats.tracked >= 6


def test_a_face_seen_close_up_is_looked_for_without_the_far_face_pass_then_quickly_and_fully_every_few_samples():
    full, quick, near = CountingDetector(side=120), CountingDetector(), CountingDetector()
    tracker = FaceTracker(full, quick, redetect_every=4, near=near)
    big = cv2.resize(textured_face(), (120, 120))                  # half the frame's height: close to the camera
    frame = frame_with_face(100, 60, big)
    full.where[id(frame)] = (100, 60)
    tracker.detect([frame], ["s"])                                # anchored by the full chain (first sample)
    gone = np.full((240, 320, 3), 90, np.uint8)
    tracker.detect([gone], ["s"])                                 # the match fails: close up, no far-face pass
    assert (full.calls, near.calls) == (1, 1)
    for _ in range(3):
        tracker.detect([gone], ["s"])                             # nobody there: the quick pass (misses 1-3)
    assert (full.calls, near.calls, quick.calls) == (1, 1, 3)
    tracker.detect([gone], ["s"])                                 # the 4th miss: the whole chain
    assert (full.calls, near.calls, quick.calls) == (2, 1, 3)


def test_the_auto_detectors_near_mode_skips_the_full_range_pass(monkeypatch):
    from models.runtime.detector import AutoDetector
    auto = AutoDetector()
    calls: list[str] = []
    monkeypatch.setattr(auto.full, "detect", lambda frames, margin=0.0: calls.append("full") or Faces.empty())
    empty = [np.full((240, 320, 3), 90, np.uint8)]
    assert len(auto.detect(empty, near=True)) == 0 and calls == []
    auto.detect(empty)
    assert calls == ["full"]
