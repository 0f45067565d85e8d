"""The one factory that builds the bot's analyser from settings: detect -> keep each frame's largest
face -> align -> classify, or `scripted:<name>` probabilities on the detected faces.

    analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                            min_score=settings.bot.min_face_score, redetect_every=settings.bot.redetect_every,
                            alternate_mirror=settings.bot.alternate_mirror)
    faces = analyse(frames, keys)   # core.faces.Faces with probs, at most one face per frame

Detection runs frame by frame (BlazeFace has a fixed batch of 1); the faces kept in all frames are then
aligned and classified in ONE batched classifier call. With keys (whose frame each one is: the bot passes
(room, participant)) and redetect_every > 1, a student's face is followed between samples by
models.runtime.tracking and the detector runs only every redetect_every-th sample.
"""
from __future__ import annotations

from typing import Hashable, Protocol, Sequence

import numpy as np

from core.emotions import EMOTION_INDEX, NUM_EMOTIONS
from core.faces import Faces
from core.settings import ModelSettings
from models.runtime.classifier import ExpressionClassifier
from models.runtime.detector import AutoDetector, make_detector
from models.runtime.tracking import FaceTracker


class Analyse(Protocol):
    """frames (BGR), optionally whose frame each one is -> Faces with probs, at most one per frame."""
    def __call__(self, frames: list[np.ndarray], keys: Sequence[Hashable] | None = None) -> Faces: ...

# Expression patterns for `--model-model scripted:<name>`: the real detector runs, and every face
# found gets these probabilities. For demos and tests that must produce a known classroom mood.
SCRIPTED_PATTERNS: dict[str, dict[str, float]] = {
    "confused": {"sad": 0.35, "angry": 0.25, "fear": 0.2, "surprise": 0.1, "neutral": 0.1},
    "bored": {"neutral": 0.85, "sad": 0.15},
    "happy": {"happy": 0.9, "neutral": 0.1},
    "neutral": {"neutral": 1.0},
}


def scripted_probs(name: str) -> np.ndarray:
    if name not in SCRIPTED_PATTERNS:
        raise ValueError(f"unknown scripted pattern {name!r}; choose from {', '.join(SCRIPTED_PATTERNS)}")
    probs = np.zeros(NUM_EMOTIONS, np.float32)
    for label, p in SCRIPTED_PATTERNS[name].items():
        probs[EMOTION_INDEX[label]] = p
    return probs / probs.sum()


def build_analyse(settings: ModelSettings | None = None, threads: int = 1, min_score: float = 0.5,
                  redetect_every: int = 1, alternate_mirror: bool = False, quick_after: int = 1) -> TrackedAnalyse:
    """frames -> Faces: detect all frames (or follow keyed students' faces, see module doc), keep each
    frame's largest face (a webcam shows its student), classify only those faces in one batch. Raises
    FileNotFoundError / ValueError for a model that cannot be loaded or an unknown detector or scripted
    pattern, before any frame is seen. alternate_mirror (with settings.flip_average, for keyed frames):
    each student's face and its mirror image on alternate samples, one classifier pass per sample. quick_after:
    see FaceTracker (benchmarks compare policies; the bot uses the default)."""
    settings = settings or ModelSettings()
    detector = make_detector(settings.detector, threads=threads, min_score=min_score)
    # A student whose last sample showed nobody gets the quick short-range pass most of the time.
    quick = detector.short if isinstance(detector, AutoDetector) else detector
    near = _Near(detector) if isinstance(detector, AutoDetector) else detector
    tracker = FaceTracker(detector, quick, redetect_every=redetect_every,
                          miss_backoff=1 if redetect_every == 1 else 4, near=near if redetect_every > 1 else None,
                          quick_after=quick_after)
    model = settings.model
    if model.startswith("scripted:"):
        return TrackedAnalyse(tracker, None, scripted_probs(model.split(":", 1)[1]))
    return TrackedAnalyse(tracker, ExpressionClassifier(model, threads=threads, flip_average=settings.flip_average,
                                                       calibrated=settings.calibrated),
                          alternate_mirror=alternate_mirror and settings.flip_average)


class _Near:
    """The auto detector without its far-face pass (short range, then close-up)."""

    def __init__(self, auto: AutoDetector) -> None:
        self.auto = auto

    def detect(self, frames: list[np.ndarray]) -> Faces:
        return self.auto.detect(frames, near=True)


class TrackedAnalyse:
    """The analyser build_analyse returns: the tracker (its stats say how often the detector ran), then
    the classifier, or fixed probabilities for a scripted model."""

    MAX_KEYS = 10_000

    def __init__(self, tracker: FaceTracker, classifier: ExpressionClassifier | None,
                 fixed: np.ndarray | None = None, alternate_mirror: bool = False) -> None:
        self.tracker = tracker
        self.classifier = classifier
        self.fixed = fixed
        self.alternate_mirror = alternate_mirror
        self._mirror_next: dict[Hashable, bool] = {}    # per student: classify the mirror image next time

    def __call__(self, frames: list[np.ndarray], keys: Sequence[Hashable] | None = None) -> Faces:
        faces = self.tracker.detect(frames, keys)
        if self.classifier is None:
            assert self.fixed is not None
            return faces.with_probs(np.repeat(self.fixed[None], len(faces), axis=0))
        if not (self.alternate_mirror and keys is not None):
            return self.classifier.classify(frames, faces)
        if len(self._mirror_next) > self.MAX_KEYS:
            self._mirror_next.clear()
        face_keys = [keys[int(i)] for i in faces.frame_ids]
        mirrored = np.array([self._mirror_next.get(key, False) for key in face_keys], bool)
        for key, flag in zip(face_keys, mirrored):
            self._mirror_next[key] = not flag
        return self.classifier.classify(frames, faces, mirrored)
