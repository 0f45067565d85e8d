"""`Faces`: the one result type that flows detector -> preprocess -> classifier -> bot.

Like supervision's `Detections`: a struct of parallel numpy arrays, one row per face, so a
whole batch of frames (all students' pending frames) travels as one object.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from core.emotions import EMOTIONS, NUM_EMOTIONS

# Keypoint order (BlazeFace's six): right eye, left eye, nose tip, mouth centre, right ear, left ear
# ("right" is the subject's right, which is on the image's left for a frontal face).
KEYPOINT_NAMES: tuple[str, ...] = ("right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear")


@dataclass(frozen=True)
class Faces:
    """Faces found in a batch of frames.

    boxes:      (N, 4) float32, x1, y1, x2, y2 in pixels of the source frame
    scores:     (N,) float32 detector confidence in [0, 1]
    keypoints:  (N, 6, 2) float32 pixel coordinates in KEYPOINT_NAMES order
    frame_ids:  (N,) int32, index of the source frame within the batch handed to the detector
    probs:      (N, 7) float32 expression probabilities in EMOTIONS order, or None before classification
    """

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: np.ndarray
    frame_ids: np.ndarray
    probs: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        n = len(self.boxes)
        if self.boxes.shape != (n, 4) or self.scores.shape != (n,) or self.keypoints.shape != (n, 6, 2) \
                or self.frame_ids.shape != (n,):
            raise ValueError("Faces arrays disagree in length or shape")
        if self.probs is not None and self.probs.shape != (n, NUM_EMOTIONS):
            raise ValueError(f"probs must be (N, {NUM_EMOTIONS})")

    @classmethod
    def empty(cls) -> "Faces":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32),
                   np.zeros((0, 6, 2), np.float32), np.zeros((0,), np.int32))

    @classmethod
    def concat(cls, parts: list["Faces"]) -> "Faces":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        has_probs = all(p.probs is not None for p in parts)
        return cls(np.concatenate([p.boxes for p in parts]), np.concatenate([p.scores for p in parts]),
                   np.concatenate([p.keypoints for p in parts]), np.concatenate([p.frame_ids for p in parts]),
                   np.concatenate([p.probs for p in parts if p.probs is not None]) if has_probs else None)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: np.ndarray | slice | int) -> "Faces":
        if isinstance(index, (int, np.integer)):
            index = slice(int(index), int(index) + 1)
        return Faces(self.boxes[index], self.scores[index], self.keypoints[index], self.frame_ids[index],
                     None if self.probs is None else self.probs[index])

    def with_probs(self, probs: np.ndarray) -> "Faces":
        return replace(self, probs=np.asarray(probs, np.float32))

    def of_frame(self, frame_id: int) -> "Faces":
        return self[self.frame_ids == frame_id]

    @property
    def areas(self) -> np.ndarray:
        return (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])

    def largest_per_frame(self) -> "Faces":
        """Keep one face per frame (the largest): a student's own webcam shows that student."""
        if not len(self):
            return self
        keep = []
        areas = self.areas
        for fid in np.unique(self.frame_ids):
            idx = np.flatnonzero(self.frame_ids == fid)
            keep.append(idx[np.argmax(areas[idx])])
        return self[np.asarray(keep)]

    @property
    def labels(self) -> list[str]:
        if self.probs is None:
            raise ValueError("faces are not classified yet")
        return [EMOTIONS[i] for i in np.argmax(self.probs, axis=1)]
