"""Detection, alignment and classification on real faces (../shared media), edge-case frames, batching
and thread safety of the classifier, the bot's analyser (models.runtime.analyse) and the mini-Xception reference.
The CLIs are in test_models_cli.py."""
from __future__ import annotations

import threading
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.faces import Faces
from core.settings import ModelSettings
from models.baseline import BaselineClassifier, baseline_path, shared_dir
from models.runtime.analyse import build_analyse, scripted_probs
from models.runtime.classifier import ExpressionClassifier
from models.runtime.detector import FaceDetector, anchor_pixels, fitted_model, make_detector, model_path, ssd_anchors
from models.runtime.preprocess import EYE_Y, align_faces, face_transform

SHARED = shared_dir()
MEDIA = SHARED / "media" if SHARED else None


def need_media() -> Path:
    if MEDIA is None or not MEDIA.is_dir():
        pytest.skip("../shared not found: set CLASSMOOD_SHARED to the shared folder (media/videos, media/images)")
    return MEDIA


def frames_of(name: str, every: int = 20, count: int = 4) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(need_media() / "videos" / name))
    frames, i = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if i % every == 0:
            frames.append(frame)
        i += 1
    capture.release()
    assert frames, f"could not read {name}"
    return frames


def build_tiny_model(path: Path) -> Path:
    """A random (N,48,48,1) -> (N,7) softmax TFLite model with a resizable batch dimension."""
    import keras
    import tensorflow as tf
    keras.utils.set_random_seed(0)
    inputs = keras.Input((48, 48, 1))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(7, activation="softmax")(x)
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(keras.Model(inputs, outputs)).convert())
    return path


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda x: (x[2] - x[0]) * (x[3] - x[1])  # noqa: E731
    return float(w * h / (area(a) + area(b) - w * h))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.tflite")


@pytest.fixture(scope="module")
def short() -> FaceDetector:
    return FaceDetector("short")


# ---------------------------------------------------------------- detector

def test_anchor_layout_matches_the_models():
    assert len(ssd_anchors(128, (8, 16, 16, 16), 2)) == 896
    assert len(ssd_anchors(192, (4,), 1)) == 2304
    assert len(FaceDetector("full").anchors) == 2304      # the constructor checks the model's output too


def test_a_fitted_input_has_the_anchors_of_its_own_grid():
    assert np.allclose(anchor_pixels(128, 128, (8, 16, 16, 16), 2), ssd_anchors(128, (8, 16, 16, 16), 2) * 128)
    fitted = anchor_pixels(96, 128, (8, 16, 16, 16), 2)
    assert len(fitted) == 12 * 16 * 2 + 6 * 8 * 6 == 672
    assert fitted[:, 1].max() < 96 and fitted[:, 0].max() < 128


def test_a_4_by_3_frame_gets_a_fitted_pass_that_finds_the_same_face_for_less_work():
    frame = cv2.resize(frames_of("woman2.mp4", count=1)[0], (320, 240))
    square, fitted = FaceDetector("short", fit=False), FaceDetector("short")
    tensor = fitted._letterbox(frame)[0]
    assert tensor.shape == (96, 128, 3)               # no letterbox rows: a quarter fewer pixels than 128x128
    a, b = square.detect([frame]), fitted.detect([frame])
    assert len(a) == len(b) == 1
    assert iou(a.boxes[0], b.boxes[0]) > 0.9 and abs(float(a.scores[0] - b.scores[0])) < 0.05
    assert np.abs(a.keypoints[0] - b.keypoints[0]).max() < 6
    assert (96, 128) in fitted._passes and fitted._passes[(96, 128)] is not None
    close_up, scale, pad_x, pad_y = fitted._letterbox(frame, margin=0.3)
    assert close_up.shape == (112, 128, 3)            # 320x240 inside a border of 0.3 x 320 px on every side
    assert min(pad_x, pad_y) >= 0.3 * 320 * scale - 1
    square_frame = cv2.resize(frame, (240, 240))      # a square frame keeps the shipped input
    assert fitted._letterbox(square_frame)[0].shape == (128, 128, 3)


def test_a_model_file_fitted_model_does_not_know_is_refused_and_the_square_input_used(monkeypatch, caplog):
    with pytest.raises(ValueError, match="not the file"):
        fitted_model("short", model_path("full").read_bytes(), 96, 128)
    with pytest.raises(ValueError):
        fitted_model("short", model_path("short").read_bytes(), 100, 128)     # not a multiple of 16
    with pytest.raises(ValueError):
        fitted_model("full", model_path("full").read_bytes(), 160, 192)       # full range is only run square
    import models.runtime.detector as detector_module

    def unknown_file(*_args):
        raise ValueError("the short-range model is not the file fitted_model knows")

    monkeypatch.setattr(detector_module, "fitted_model", unknown_file)
    detector = FaceDetector("short")
    frame = cv2.resize(frames_of("woman2.mp4", count=1)[0], (320, 240))
    with caplog.at_level("WARNING"):
        faces = detector.detect([frame, frame])
    assert len(faces) == 2                            # found through the square input, both times
    assert detector._passes[(96, 128)] is None
    assert sum("no 128x96 input" in r.getMessage() for r in caplog.records) == 1   # logged once per shape


@pytest.mark.parametrize("video", ["emotions.mp4", "woman2.mp4"])
def test_detector_finds_the_webcam_face_in_every_frame_with_keypoints_inside(short, video):
    frames = frames_of(video)
    faces = short.detect(frames)
    assert sorted(set(faces.frame_ids.tolist())) == list(range(len(frames)))
    assert ((faces.scores >= 0.5) & (faces.scores <= 1)).all()
    for i in range(len(faces)):
        x1, y1, x2, y2 = faces.boxes[i]
        inner = faces.keypoints[i, :4]          # eyes, nose, mouth (ears may sit on the box edge)
        assert ((inner[:, 0] > x1) & (inner[:, 0] < x2) & (inner[:, 1] > y1) & (inner[:, 1] < y2)).all()
        assert faces.keypoints[i, 0, 0] < faces.keypoints[i, 1, 0]     # subject's right eye on the image's left
        assert faces.keypoints[i, 0, 1] < faces.keypoints[i, 3, 1]     # eyes above the mouth


def test_detector_finds_faces_in_the_shared_photos():
    detector = make_detector("auto")
    for path in sorted((need_media() / "images" / "faces").iterdir()):
        image = cv2.imread(str(path))
        assert len(detector.detect([image])) >= 1, path.name


def test_a_face_that_overflows_the_frame_is_found_by_the_close_up_pass():
    # A student leaning into the camera, or a tight face crop: the face is bigger than the frame.
    image = cv2.imread(str(need_media() / "images" / "faces" / "justin.jpg"))
    detector = make_detector("auto")
    x0, y0, x1, y1 = detector.detect([image]).boxes[0]
    w, h = x1 - x0, y1 - y0
    crop = cv2.resize(image[int(y0 + 0.2 * h):int(y1 - 0.2 * h), int(x0 + 0.2 * w):int(x1 - 0.2 * w)], (240, 240))
    assert len(detector.short.detect([crop])) == 0 and len(detector.full.detect([crop])) == 0
    (fid,), box, eyes = (lambda f: (f.frame_ids, f.boxes[0], f.keypoints[0, :2]))(
        detector.detect([np.zeros((50, 50, 3), np.uint8), crop]))
    assert fid == 1                                                        # frame ids survive the extra pass
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= 240 and box[3] <= 240 and box[2] - box[0] > 150
    assert ((eyes > 0) & (eyes < 240)).all() and abs(eyes[0, 1] - eyes[1, 1]) < 30   # both eyes inside, level


def test_no_faces_in_noise_blank_or_degenerate_frames():
    rng = np.random.default_rng(0)
    detector = make_detector("auto")
    frames = [rng.integers(0, 255, (240, 320, 3), dtype=np.uint8), np.zeros((240, 320, 3), np.uint8),
              np.full((480, 640, 3), 255, np.uint8), np.zeros((0, 0, 3), np.uint8), np.zeros((1, 1, 3), np.uint8),
              np.zeros((1, 500, 3), np.uint8), np.zeros((240, 320), np.uint8)]
    assert len(detector.detect(frames)) == 0
    assert len(detector.detect([])) == 0


def test_gray_bgra_float_and_huge_frames_work_and_non_images_are_refused(short):
    frame = frames_of("woman2.mp4", count=1)[0]
    base = short.detect([frame])
    assert len(base) == 1
    # BGRA and float frames hold the same pixels; a gray one lost its colour, so its box moves a little
    # (IoU 0.86 with the square input, 0.85 with the fitted one).
    for variant, overlap in ((cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA), 0.99), (frame.astype(np.float32), 0.99),
                             (cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), 0.8)):
        other = short.detect([variant])
        assert len(other) == 1 and iou(other.boxes[0], base.boxes[0]) > overlap
    huge = cv2.resize(frame, None, fx=8000 / frame.shape[1], fy=8000 / frame.shape[1])    # 8000 x ~4500
    big = short.detect([huge])
    assert len(big) == 1 and iou(big.boxes[0] / (8000 / frame.shape[1]), base.boxes[0]) > 0.85
    for bad in (None, "frame.png", np.zeros((10, 10, 2), np.uint8), np.zeros(5, np.uint8)):
        with pytest.raises(ValueError, match="frame 0"):
            short.detect([bad])


def test_boxes_map_back_to_the_original_frame_through_letterboxing(short):
    frame = frames_of("woman2.mp4", count=1)[0]                  # 596x336: landscape, padded top/bottom
    base = short.detect([frame])
    shifted = short.detect([cv2.copyMakeBorder(frame, 100, 0, 60, 0, cv2.BORDER_CONSTANT)])
    portrait = short.detect([cv2.copyMakeBorder(frame, 0, 300, 0, 0, cv2.BORDER_CONSTANT)])   # padded left/right
    assert len(base) == len(shifted) == len(portrait) == 1
    assert np.allclose(shifted.boxes[0], base.boxes[0] + [60, 100, 60, 100], atol=8)
    assert np.allclose(shifted.keypoints[0], base.keypoints[0] + [60, 100], atol=8)
    assert np.allclose(portrait.boxes[0], base.boxes[0], atol=8)
    # frame_ids index into the list, whatever frames come before
    two = short.detect([np.zeros((50, 50, 3), np.uint8), frame])
    assert two.frame_ids.tolist() == [1] and np.allclose(two.boxes, base.boxes)


@pytest.mark.parametrize("shape, size", [((240, 320, 3), (128, 96)), ((240, 320, 3), (192, 144)),
                                         ((481, 641, 3), (128, 96)), ((336, 596), (128, 72)), ((97, 61, 3), (37, 59))])
def test_the_detectors_downscale_is_the_area_average_to_within_two_grey_levels(shape, size):
    """shrink replaces INTER_AREA (5x slower at fractional factors) before detection: same size, same picture."""
    from models.runtime.detector import shrink
    frame = cv2.resize(frames_of("woman2.mp4", count=1)[0], shape[1::-1], interpolation=cv2.INTER_AREA)
    frame = frame if len(shape) == 3 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
    small, area = shrink(frame, size), cv2.resize(frame, size, interpolation=cv2.INTER_AREA)
    assert small.shape == area.shape and small.dtype == np.uint8
    assert np.abs(small.astype(float) - area).mean() < 2
    if shape[1] >= 2 * size[0] and shape[0] >= 2 * size[1]:
        # Shrunk 2x or more, a pixel-fine stripe pattern (which bilinear alone would alias into bands) averages
        # out to grey, as with area averaging.
        stripes = np.zeros(shape, np.uint8)
        stripes[:, ::2] = 255
        assert np.ptp(shrink(stripes, size)[2:-2, 2:-2]) < 64
        assert np.ptp(cv2.resize(stripes, size, interpolation=cv2.INTER_LINEAR)[2:-2, 2:-2]) > 100


def test_tiles_find_small_faces_in_a_video_call_gallery():
    tiles = [cv2.resize(f, (256, 144)) for f in frames_of("woman2.mp4", count=5) * 5][:25]
    gallery = np.vstack([np.hstack(tiles[r * 5:(r + 1) * 5]) for r in range(5)])      # 1280x720
    tiled = FaceDetector("full", tiles="auto").detect([gallery])
    assert len(tiled) >= 23
    centres = (tiled.boxes[:, :2] + tiled.boxes[:, 2:]) / 2
    cells = {(int(x // 256), int(y // 144)) for x, y in centres}
    assert len(cells) == len(tiled)                              # one face per webcam tile: no duplicates
    assert len(FaceDetector("full").detect([gallery])) < 20      # why tiles exist
    with pytest.raises(ValueError):
        FaceDetector("full", tiles="sometimes")


# ---------------------------------------------------------------- alignment

def test_alignment_levels_a_tilted_face_and_crops_like_fer2013(short):
    frame = frames_of("woman2.mp4", count=1)[0]
    upright = short.detect([frame])
    h, w = frame.shape[:2]
    rotated = cv2.warpAffine(frame, cv2.getRotationMatrix2D((w / 2, h / 2), 20, 1.0), (w, h))
    tilted = short.detect([rotated])
    assert len(upright) == len(tilted) == 1
    eyes = tilted.keypoints[0, 1] - tilted.keypoints[0, 0]
    assert abs(np.degrees(np.arctan2(eyes[1], eyes[0])) + 20) < 6          # the detector sees the tilt
    a, b = align_faces([frame], upright), align_faces([rotated], tilted)
    assert a.shape == b.shape == (1, 48, 48, 1) and a.dtype == np.float32
    assert 0 <= a.min() and a.max() <= 1 and a.std() > 0.05
    # In the crop the eyes sit level, where FER2013 puts them, whatever the head tilt ...
    for faces in (upright, tilted):
        m = face_transform(faces.boxes[0], faces.keypoints[0])
        eye_px = np.c_[faces.keypoints[0, :2], np.ones(2)] @ m.T
        assert abs(eye_px[0, 1] - eye_px[1, 1]) < 0.5 and abs(eye_px[0, 1] - 48 * EYE_Y) < 0.5
    # ... so the tilted face's crop looks like the upright one's, unlike a crop that ignores the tilt.
    level = tilted.keypoints.copy()
    level[0, 1, 1] = level[0, 0, 1]
    naive = align_faces([rotated], Faces(tilted.boxes, tilted.scores, level, tilted.frame_ids))

    def similarity(x: np.ndarray, y: np.ndarray) -> float:
        blur = lambda c: cv2.GaussianBlur(c[..., 0], (0, 0), 1.5).ravel()  # noqa: E731
        return float(np.corrcoef(blur(x), blur(y))[0, 1])
    assert similarity(a, b) > 0.65 and similarity(a, b) > similarity(a, naive) + 0.2
    # margin widens the crop around the same centre
    wide = face_transform(upright.boxes[0], upright.keypoints[0], margin=1.5)
    tight = face_transform(upright.boxes[0], upright.keypoints[0])
    assert np.hypot(*wide[0, :2]) == pytest.approx(np.hypot(*tight[0, :2]) / 1.5)


def test_align_batches_faces_of_many_frames_gray_or_colour():
    frame = frames_of("emotions.mp4", count=1)[0]
    one = FaceDetector("short").detect([frame])
    faces = Faces.concat([Faces(one.boxes, one.scores, one.keypoints, np.full(1, i, np.int32)) for i in range(3)])
    frames = [frame, cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY), cv2.cvtColor(frame, cv2.COLOR_BGR2BGRA)]
    crops = align_faces(frames, faces)
    assert crops.shape == (3, 48, 48, 1)
    assert np.abs(crops[0] - crops[1]).max() < 0.02 and np.abs(crops[0] - crops[2]).max() < 0.02
    assert align_faces(frames, Faces.empty()).shape == (0, 48, 48, 1)
    # a face off the frame's edge is padded by replication, not black
    edge = Faces(np.array([[-20, -20, 60, 60]], np.float32), np.ones(1, np.float32),
                 np.array([[[5, 10], [35, 10], [20, 25], [20, 40], [0, 15], [40, 15]]], np.float32),
                 np.zeros(1, np.int32))
    white = np.full((100, 100, 3), 200, np.uint8)
    assert np.allclose(align_faces([white], edge), 200 / 255, atol=1e-3)


# ---------------------------------------------------------------- classifier

def test_batch_sizes_agree_with_one_by_one_predictions(tiny_model):
    clf = ExpressionClassifier(str(tiny_model), max_batch=16)
    faces = np.random.default_rng(1).random((40, 48, 48, 1), dtype=np.float32)
    alone = np.concatenate([clf.predict(faces[i:i + 1]) for i in range(len(faces))])
    assert alone.shape == (40, 7) and np.allclose(alone.sum(1), 1, atol=1e-5)
    for n in (1, 3, 32, 40, 5, 3, 17, 1):            # more sizes than cached interpreters, and back again
        assert np.allclose(clf.predict(faces[:n]), alone[:n], atol=1e-5), n
    assert clf.predict(np.zeros((0, 48, 48, 1), np.float32)).shape == (0, 7)
    with pytest.raises(ValueError):
        clf.predict(np.zeros((2, 64, 64, 1), np.float32))


def test_mirror_averaging_scores_a_face_and_its_mirror_image_alike(tiny_model):
    single = ExpressionClassifier(str(tiny_model), flip_average=False)
    averaged = ExpressionClassifier(str(tiny_model))
    faces = np.random.default_rng(3).random((5, 48, 48, 1), dtype=np.float32)
    mirrored = faces[:, :, ::-1]
    expected = (single.predict(faces) + single.predict(mirrored)) / 2
    assert np.allclose(averaged.predict(faces), expected, atol=1e-5)
    assert np.allclose(averaged.predict(mirrored), averaged.predict(faces), atol=1e-5)
    assert not np.allclose(single.predict(mirrored), single.predict(faces), atol=1e-5)


def test_predict_is_thread_safe(tiny_model):
    clf = ExpressionClassifier(str(tiny_model))
    rng = np.random.default_rng(2)
    batches = [rng.random((n, 48, 48, 1), dtype=np.float32) for n in (1, 2, 3, 7, 12, 5)]
    expected = [clf.predict(b) for b in batches]
    errors = []

    def work(k: int) -> None:
        for _ in range(15):
            i = (k + _) % len(batches)
            if not np.allclose(clf.predict(batches[i]), expected[i], atol=1e-5):
                errors.append(i)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nosuch.tflite"):
        ExpressionClassifier(str(tmp_path / "nosuch.tflite"))
    (tmp_path / "junk.tflite").write_bytes(b"definitely not a flatbuffer")
    with pytest.raises(ValueError, match="junk.tflite"):
        ExpressionClassifier(str(tmp_path / "junk.tflite"))


def test_the_analyser_classifies_each_frames_largest_face_in_one_batch(tiny_model, monkeypatch):
    frames = frames_of("emotions.mp4", count=2) + frames_of("woman2.mp4", count=2) + [np.zeros((240, 320, 3), np.uint8)]
    calls = []
    real = ExpressionClassifier.predict
    monkeypatch.setattr(ExpressionClassifier, "predict",
                        lambda self, x, mirrored=None: calls.append(len(x)) or real(self, x, mirrored))
    analyse = build_analyse(ModelSettings(model=str(tiny_model), detector="short"), threads=1)
    faces = analyse(frames)
    assert calls == [len(faces)]                     # one classifier call for the faces of all frames
    assert sorted(faces.frame_ids.tolist()) == [0, 1, 2, 3] and len(faces.labels) == 4    # the black frame has none
    assert faces.probs.shape == (4, 7) and np.allclose(faces.probs.sum(1), 1, atol=1e-4)
    every = make_detector("short").detect(frames)
    for area, frame_id in zip(faces.areas, faces.frame_ids):       # the largest face of its frame
        assert area == pytest.approx(every.of_frame(int(frame_id)).areas.max())


def test_the_bot_alternates_each_students_face_and_its_mirror_image_between_samples(tiny_model):
    frames = frames_of("woman2.mp4", count=1) + frames_of("emotions.mp4", count=1)
    settings = ModelSettings(model=str(tiny_model), detector="short")
    averaged = build_analyse(settings)(frames)
    alternating = build_analyse(settings, alternate_mirror=True)
    first, second = alternating(frames, ["a", "b"]), alternating(frames, ["a", "b"])
    assert not np.allclose(first.probs, averaged.probs, atol=1e-4)       # one pass each sample...
    assert np.allclose((first.probs + second.probs) / 2, averaged.probs, atol=1e-4)   # ...averaged over two
    single = ExpressionClassifier(str(tiny_model), flip_average=False)
    with pytest.raises(ValueError, match="2 faces but 1 mirror flags"):
        single.predict(np.zeros((2, 48, 48, 1), np.float32), np.array([True]))
    assert np.allclose(build_analyse(settings, alternate_mirror=True)(frames).probs, averaged.probs)   # no keys


def test_a_scripted_model_gives_its_pattern_to_the_face_of_every_frame():
    frames = frames_of("emotions.mp4", count=2) + [np.zeros((240, 320, 3), np.uint8)]
    faces = build_analyse(ModelSettings(model="scripted:confused", detector="short"))(frames)
    assert faces.frame_ids.tolist() == [0, 1]
    assert np.allclose(faces.probs, scripted_probs("confused")) and faces.labels == ["sad", "sad"]
    with pytest.raises(ValueError, match="choose from confused, bored, happy, neutral"):
        build_analyse(ModelSettings(model="scripted:elated"))


# ---------------------------------------------------------------- references

def test_baseline_path_follows_the_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("CLASSMOOD_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path and baseline_path() is None
    monkeypatch.setenv("CLASSMOOD_SHARED", str(tmp_path / "missing"))
    assert shared_dir() is None and BaselineClassifier.load() is None


def test_mini_xception_in_opencv_matches_onnxruntime():
    path = baseline_path()
    if path is None:
        pytest.skip("../shared not found: the mini-Xception baseline lives in ../shared/models")
    pytest.importorskip("onnxruntime")
    faces = np.random.default_rng(3).random((5, 48, 48, 1), dtype=np.float32)
    dnn = BaselineClassifier(path, backend="cv2.dnn").predict(faces)
    ort = BaselineClassifier(path, backend="onnxruntime").predict(faces)
    assert dnn.shape == (5, 7) and np.allclose(dnn.sum(1), 1, atol=1e-5)
    assert np.abs(dnn - ort).max() < 1e-4
