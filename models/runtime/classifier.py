"""The expression classifier: a TFLite model (N,48,48,1) [0,1] -> (N,7) softmax in EMOTIONS order."""
from __future__ import annotations

import threading
from typing import Any
from collections import OrderedDict
from pathlib import Path

import numpy as np

from core.emotions import NUM_EMOTIONS
from core.faces import Faces
from models.runtime.detector import load_interpreter
from models.runtime.preprocess import align_faces

# The shipped models live beside the CLIs that export them (models/weights/, package data of `models`).
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MODEL_NAMES = ("ferplus", "fer2013")


def resolve_model(model: str) -> Path:
    """'ferplus' | 'fer2013' | a path to a .tflite file -> an existing file, or FileNotFoundError."""
    path = WEIGHTS_DIR / f"{model}.tflite" if model in MODEL_NAMES else Path(model)
    if not path.is_file():
        hint = " (train and export it: see models/MODEL_CARD.md)" if model in MODEL_NAMES else ""
        raise FileNotFoundError(f"expression model {model!r} not found at {path}{hint}")
    return path


def shipped_temperature(path: Path) -> float:
    """The temperature in the model's card file (`<name>.json` beside the .tflite), or 1.0 if none."""
    import json
    card = path.with_suffix(".json")
    try:
        temperature = float(json.loads(card.read_text())["calibration"]["temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1.0
    return temperature if np.isfinite(temperature) and 0.05 <= temperature <= 20 else 1.0


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(p) / T) row by row; float32."""
    if temperature == 1.0 or len(probs) == 0:
        return probs.astype(np.float32, copy=False)
    logits = np.log(np.clip(probs.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(1, keepdims=True)).astype(np.float32)


class ExpressionClassifier:
    """Thread-safe batched inference. Batches larger than max_batch are chunked; a few interpreters
    are kept, one per recent batch size, because resizing one costs ~1 ms (about two faces' worth) and
    the bot's batch size wobbles by a face or two from round to round."""

    CACHED_SIZES = 3

    def __init__(self, model: str = "ferplus", threads: int = 1, max_batch: int = 64,
                 flip_average: bool = True, calibrated: bool = True) -> None:
        """calibrated: apply the temperature shipped beside the file (`<name>.json`, written by
        models.calibrate), so that a probability of 0.8 is right about 80 % of the time."""
        self.path = resolve_model(model)
        self.name = self.path.stem
        self.temperature = shipped_temperature(self.path) if calibrated else 1.0
        self.threads = threads
        # Averaging with the mirrored face: +0.5 point on PublicTest for twice the (small) classifier cost.
        self.flip_average = flip_average
        self.max_batch = max(1, int(max_batch))
        self._content = self.path.read_bytes()
        interpreter = self._new_interpreter()
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
        if tuple(inp["shape"][1:]) != (48, 48, 1) or int(out["shape"][-1]) != NUM_EMOTIONS:
            raise ValueError(f"{self.path}: expected input (N,48,48,1) and output (N,{NUM_EMOTIONS}), "
                             f"found {tuple(int(d) for d in inp['shape'])} -> {tuple(int(d) for d in out['shape'])}")
        self.input_index, self.output_index = inp["index"], out["index"]
        # LiteRT's Interpreter (untyped): one per batch size
        self._interpreters: OrderedDict[int, Any] = OrderedDict({int(inp["shape"][0]): interpreter})
        self._lock = threading.Lock()

    def _new_interpreter(self) -> Any:
        try:
            interpreter = load_interpreter(self._content, self.threads)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{self.path} is not a usable TFLite model ({exc})") from None
        return interpreter

    def _interpreter_for(self, n: int) -> Any:
        """An interpreter whose input is (n,48,48,1): a cached one, or the least recently used resized."""
        if n in self._interpreters:
            self._interpreters.move_to_end(n)
            return self._interpreters[n]
        if len(self._interpreters) >= self.CACHED_SIZES:
            _, interpreter = self._interpreters.popitem(last=False)
        else:
            interpreter = self._new_interpreter()
        interpreter.resize_tensor_input(self.input_index, (n, 48, 48, 1))
        interpreter.allocate_tensors()
        self._interpreters[n] = interpreter
        return interpreter

    def predict(self, faces48: np.ndarray, mirrored: np.ndarray | None = None) -> np.ndarray:
        """(N,48,48,1) float32 gray in [0,1] -> (N,7) probabilities in EMOTIONS order. `mirrored` (N bools)
        replaces mirror averaging by one pass over each face, or its mirror image where True: the bot
        alternates per student, so that the average of a face and its mirror forms over samples."""
        faces48 = np.ascontiguousarray(faces48, np.float32)
        if faces48.ndim != 4 or faces48.shape[1:] != (48, 48, 1):
            raise ValueError(f"expected (N, 48, 48, 1) faces, got {faces48.shape}")
        if len(faces48) == 0:
            return np.zeros((0, NUM_EMOTIONS), np.float32)
        if mirrored is not None:
            if len(mirrored) != len(faces48):
                raise ValueError(f"{len(faces48)} faces but {len(mirrored)} mirror flags")
            flags = np.asarray(mirrored, bool)[:, None, None, None]
            return self._calibrate(self._predict(np.ascontiguousarray(np.where(flags, faces48[:, :, ::-1], faces48))))
        if self.flip_average:
            n = len(faces48)
            both = self._predict(np.concatenate([faces48, faces48[:, :, ::-1]]))
            return self._calibrate((both[:n] + both[n:]) / 2)
        return self._calibrate(self._predict(faces48))

    def _calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Temperature scaling of the probabilities: softmax(log p / T); T = 1 leaves them as they are."""
        return apply_temperature(probs, self.temperature)

    def _predict(self, faces48: np.ndarray) -> np.ndarray:
        outputs = []
        with self._lock:
            for start in range(0, len(faces48), self.max_batch):
                chunk = faces48[start:start + self.max_batch]
                interpreter = self._interpreter_for(len(chunk))
                interpreter.set_tensor(self.input_index, chunk)
                interpreter.invoke()
                outputs.append(interpreter.get_tensor(self.output_index).copy())
        return np.concatenate(outputs)

    def classify(self, frames: list[np.ndarray], faces: Faces, mirrored: np.ndarray | None = None) -> Faces:
        """Align every face (from the frames its frame_ids point at) and classify them in one batch
        (`mirrored`: see predict)."""
        if len(faces) == 0:
            return faces.with_probs(np.zeros((0, NUM_EMOTIONS), np.float32))
        return faces.with_probs(self.predict(align_faces(frames, faces), mirrored))
