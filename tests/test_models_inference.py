"""Detection, alignment and classification on real faces, and the evaluate/detect/bench commands,
including their clear errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.faces import Faces
from models.classifier import ExpressionClassifier
from models.detector import FaceDetector, make_detector, ssd_anchors
from models.preprocess import align_faces
from tests.test_models_train import write_fer_csv

PROJECT = Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / "shared"
MEDIA = SHARED / "media"
needs_media = pytest.mark.skipif(not MEDIA.exists(), reason=f"{MEDIA} not found: the shared media folder is absent")
SHIPPED = PROJECT / "models" / "weights" / "ferplus.tflite"


def frames_of(name: str, every: int = 20, count: int = 4) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(MEDIA / "videos" / name))
    frames, i = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if i % every == 0:
            frames.append(frame)
        i += 1
    return frames


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300)


def test_anchor_layout_matches_the_models():
    assert len(ssd_anchors(128, (8, 16, 16, 16), 2)) == 896
    assert len(ssd_anchors(192, (4,), 1)) == 2304


@needs_media
@pytest.mark.parametrize("video", ["emotions.mp4", "woman2.mp4"])
def test_detector_finds_the_webcam_face_in_every_frame_with_keypoints_inside(video):
    frames = frames_of(video)
    faces = FaceDetector("short").detect(frames)
    assert sorted(set(faces.frame_ids.tolist())) == list(range(len(frames)))
    for i in range(len(faces)):
        x1, y1, x2, y2 = faces.boxes[i]
        eyes = faces.keypoints[i, :3]
        assert ((eyes[:, 0] > x1) & (eyes[:, 0] < x2) & (eyes[:, 1] > y1) & (eyes[:, 1] < y2)).all()
        assert faces.keypoints[i, 0, 0] < faces.keypoints[i, 1, 0]     # subject's right eye on the image's left


def test_no_faces_in_noise_or_degenerate_frames():
    rng = np.random.default_rng(0)
    detector = make_detector("auto")
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), np.zeros((240, 320, 3), np.uint8),
              np.zeros((0, 0, 3), np.uint8), np.zeros((1, 1, 3), np.uint8), np.zeros((240, 320), np.uint8)]
    assert len(detector.detect(frames)) == 0


@needs_media
def test_boxes_map_back_to_the_original_frame_through_letterboxing():
    frame = frames_of("woman2.mp4", count=1)[0]
    detector = FaceDetector("short")
    base = detector.detect([frame])
    padded = cv2.copyMakeBorder(frame, 100, 0, 60, 0, cv2.BORDER_CONSTANT)
    moved = detector.detect([padded])
    assert len(base) == len(moved) == 1
    assert np.allclose(moved.boxes[0], base.boxes[0] + [60, 100, 60, 100], atol=8)


@needs_media
def test_tiles_find_small_faces_in_a_video_call_gallery():
    tiles = [cv2.resize(f, (256, 144)) for f in frames_of("woman2.mp4", count=5) * 5][:25]
    gallery = np.vstack([np.hstack(tiles[r * 5:(r + 1) * 5]) for r in range(5)])
    assert len(FaceDetector("full", tile=320).detect([gallery])) >= 20
    assert len(FaceDetector("full").detect([gallery])) < 20   # why tiles exist


@needs_media
def test_alignment_levels_a_tilted_face():
    frame = frames_of("woman2.mp4", count=1)[0]
    detector = FaceDetector("short")
    upright = detector.detect([frame])
    h, w = frame.shape[:2]
    rotated = cv2.warpAffine(frame, cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0), (w, h))
    tilted = detector.detect([rotated])
    assert len(upright) == len(tilted) == 1
    a, b = align_faces([frame], upright), align_faces([rotated], tilted)
    assert a.shape == (1, 48, 48, 1) and 0 <= a.min() and a.max() <= 1
    # In the crop the eyes sit level, where FER2013 puts them, whatever the head tilt.
    from models.preprocess import EYE_Y, face_transform
    for faces in (upright, tilted):
        m = face_transform(faces.boxes[0], faces.keypoints[0])
        eyes = np.c_[faces.keypoints[0, :2], np.ones(2)] @ m.T
        assert abs(eyes[0, 1] - eyes[1, 1]) < 0.5 and abs(eyes[0, 1] - 48 * EYE_Y) < 0.5



def tiny_model(path: Path) -> Path:
    import keras
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Conv2D(4, 3, strides=4, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    import tensorflow as tf
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs)).convert())
    return path


def test_batched_predictions_equal_one_by_one(tmp_path):
    clf = ExpressionClassifier(str(tiny_model(tmp_path / "tiny.tflite")), max_batch=16)
    faces = np.random.default_rng(1).random((33, 48, 48, 1), dtype=np.float32)
    together = clf.predict(faces)
    alone = np.concatenate([clf.predict(faces[i:i + 1]) for i in range(len(faces))])
    assert together.shape == (33, 7) and np.allclose(together, alone, atol=1e-5)
    assert clf.classify([], Faces.empty()).probs.shape == (0, 7)


def test_missing_model_names_the_file():
    with pytest.raises(FileNotFoundError, match="nosuch.tflite"):
        ExpressionClassifier("nosuch.tflite")


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped ferplus model is not exported yet")
@needs_media
def test_detect_cli_reports_faces_with_probabilities_and_annotates(tmp_path):
    out = tmp_path / "annotated.png"
    result = run("models.detect", str(MEDIA / "images" / "faces" / "justin.jpg"), "--json", "--annotate", str(out))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(data["faces"]) == 1 and abs(sum(data["faces"][0]["probs"].values()) - 1) < 0.01
    assert set(data["faces"][0]["keypoints"]) >= {"right_eye", "left_eye", "nose"}
    assert cv2.imread(str(out)) is not None


def test_evaluate_cli_on_a_csv_and_on_folders(tmp_path):
    model = str(tiny_model(tmp_path / "tiny.tflite"))
    data = write_fer_csv(tmp_path / "data", n_train=10, n_public=30).parent
    result = run("models.evaluate", "--model", model, "--data", str(data), "--split", "PublicTest", "--labels",
                 "ferplus", "--json", "--confusion", str(tmp_path / "cm.png"))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 30 and set(summary["per_class"]) == {"angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"}
    assert cv2.imread(str(tmp_path / "cm.png")) is not None

    folder = tmp_path / "folder"
    for name in ("Happiness", "surprised", "contempt"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(folder / name / f"{i}.png"), np.full((64, 80, 3), 40 * i, np.uint8))
    (folder / "surprised" / "broken.jpg").write_bytes(b"not an image")
    gif = folder / "Happiness" / "anim.gif"
    from PIL import Image
    Image.new("RGB", (30, 30), (200, 10, 10)).save(gif)
    result = run("models.evaluate", "--model", model, "--folder", str(folder), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 7 and summary["skipped"] == 3 and summary["unreadable"] == 1


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "wrong csv header", "empty folder", "missing model"])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, case):
    model = str(tiny_model(tmp_path / "tiny.tflite"))
    if case == "missing image":
        args = ["models.detect", str(tmp_path / "nope.jpg"), "--model", model]
    elif case == "corrupt image":
        (tmp_path / "bad.jpg").write_bytes(b"\x89PNG garbage")
        args = ["models.detect", str(tmp_path / "bad.jpg"), "--model", model]
    elif case == "wrong csv header":
        (tmp_path / "fer2013.csv").write_text("label,image\n1,2\n")
        args = ["models.evaluate", "--model", model, "--data", str(tmp_path / "fer2013.csv")]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args = ["models.evaluate", "--model", model, "--folder", str(tmp_path / "empty")]
    else:
        args = ["models.evaluate", "--model", str(tmp_path / "none.tflite"), "--folder", str(tmp_path)]
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and "Traceback" not in result.stderr


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped ferplus model is not exported yet")
def test_bench_measures_ours_and_the_detectors():
    result = run("models.bench", "--repeats", "5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    ours = [r for r in data["classifier"] if r["model"].startswith("ours")]
    assert ours and all(r["ms_per_face_batch32"] > 0 for r in ours)
    assert any(r["detector"].startswith("ours") for r in data["detector"])
