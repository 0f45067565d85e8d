"""Detector + aligner + classifier behind one call: `FacePipeline(settings.model, threads).analyse(frames)`.

    pipeline = FacePipeline(settings.model, threads=settings.bot.inference_threads,
                            min_score=settings.bot.min_face_score)
    faces = pipeline.analyse(frames)          # every face of every frame, with probs
    faces = pipeline.analyse(frames, largest_only=True)   # one face per frame (a student's webcam)

Detection runs frame by frame (BlazeFace has a fixed batch of 1); all faces found in all frames are
then aligned and classified in ONE batched classifier call.
"""
from __future__ import annotations

import numpy as np

from core.faces import Faces
from core.settings import ModelSettings
from models.classifier import ExpressionClassifier
from models.detector import make_detector


class FacePipeline:
    def __init__(self, settings: ModelSettings | None = None, threads: int = 1, min_score: float = 0.5) -> None:
        settings = settings or ModelSettings()
        self.settings = settings
        self.detector = make_detector(settings.detector, threads=threads, min_score=min_score)
        self.classifier = ExpressionClassifier(settings.model, threads=threads, flip_average=settings.flip_average)

    def analyse(self, frames: list[np.ndarray], largest_only: bool = False) -> Faces:
        """Faces (with probs) in all frames; frame_ids index into `frames`."""
        faces = self.detector.detect(frames)
        if largest_only:
            faces = faces.largest_per_frame()
        return self.classifier.classify(frames, faces)

    __call__ = analyse
