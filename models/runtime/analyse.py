"""The one factory that builds the bot's analyser from settings: detect -> keep each frame's largest
face -> align -> classify, or `scripted:<name>` probabilities on the detected faces.

    analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                            min_score=settings.bot.min_face_score)
    faces = analyse(frames)     # core.faces.Faces with probs, at most one face per frame

Detection runs frame by frame (BlazeFace has a fixed batch of 1); the faces kept in all frames are then
aligned and classified in ONE batched classifier call.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from core.emotions import EMOTION_INDEX, NUM_EMOTIONS
from core.faces import Faces
from core.settings import ModelSettings
from models.runtime.classifier import ExpressionClassifier
from models.runtime.detector import make_detector

Analyse = Callable[[list[np.ndarray]], Faces]

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


def build_analyse(settings: ModelSettings | None = None, threads: int = 1, min_score: float = 0.5) -> Analyse:
    """frames -> Faces: detect all frames, keep each frame's largest face (a webcam shows its student),
    classify only those faces in one batch. Raises FileNotFoundError / ValueError for a model that
    cannot be loaded or an unknown detector or scripted pattern, before any frame is seen."""
    settings = settings or ModelSettings()
    detector = make_detector(settings.detector, threads=threads, min_score=min_score)
    model = settings.model
    if model.startswith("scripted:"):
        fixed = scripted_probs(model.split(":", 1)[1])

        def analyse_scripted(frames: list[np.ndarray]) -> Faces:
            faces = detector.detect(frames).largest_per_frame()
            return faces.with_probs(np.repeat(fixed[None], len(faces), axis=0))
        return analyse_scripted

    classifier = ExpressionClassifier(model, threads=threads, flip_average=settings.flip_average)

    def analyse(frames: list[np.ndarray]) -> Faces:
        faces = detector.detect(frames).largest_per_frame()
        return classifier.classify(frames, faces)
    return analyse
