"""The evaluate / detect / bench commands, run as a user would (subprocess, cwd = project root), with a
tiny temporary model: JSON on the last line, and a one-line error with exit code 2 for bad input."""
from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from core.emotions import EMOTIONS
from tests.test_models_inference import MEDIA, frames_of, need_media, tiny_model  # noqa: F401 (fixture)

PROJECT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT, capture_output=True, text=True, timeout=timeout)


def last_json(result: subprocess.CompletedProcess, returncode: int = 0) -> dict:
    assert result.returncode == returncode, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_csv(folder: Path, rows: int = 21) -> Path:
    """FER2013-format CSV with FER+ votes beside it; row i has label i % 7, every third vote is tied."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ferplus_col = {0: 4, 1: 5, 2: 6, 3: 1, 4: 3, 5: 2, 6: 0}
    with open(folder / "fer2013.csv", "w", newline="") as f, open(folder / "fer2013new.csv", "w", newline="") as g:
        w, v = csv.writer(f), csv.writer(g)
        w.writerow(["emotion", "pixels", "Usage"])
        v.writerow(["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                    "fear", "contempt", "unknown", "NF"])
        for i in range(rows):
            usage = "PublicTest" if i % 2 else "PrivateTest"
            w.writerow([i % 7, " ".join(map(str, rng.integers(0, 256, 48 * 48))), usage])
            votes = [0] * 10
            votes[ferplus_col[i % 7]] = 6
            if i % 3 == 0:
                votes[7] = 6                      # tied with contempt: excluded from FER+ scoring
            v.writerow([usage, f"fer{i:07d}.png", *votes])
    return folder


def test_evaluate_on_a_csv_with_both_label_sets_and_a_confusion_image(tiny_model, tmp_path):
    data = write_csv(tmp_path / "data")
    summary = last_json(run("models.evaluate", "--model", str(tiny_model), "--data", str(data), "--split", "PublicTest",
                            "--labels", "fer2013", "--json", "--no-baseline"))
    assert summary["n"] == 10 and summary["split"] == "PublicTest" and summary["labels"] == "fer2013"
    assert set(summary["per_class"]) == set(EMOTIONS) and summary["baseline_accuracy"] is None
    assert sum(c["n"] for c in summary["per_class"].values()) == 10 and 0 <= summary["accuracy"] <= 1
    for c in summary["per_class"].values():
        assert set(c) == {"accuracy", "precision", "n"}
    assert 0 <= summary["mean_recall"] <= 1 and 0 <= summary["ece"] <= 1 and summary["baseline_ece"] is None
    png = tmp_path / "cm.png"
    result = run("models.evaluate", "--model", str(tiny_model), "--data", str(data / "fer2013.csv"), "--split",
                 "PrivateTest", "--labels", "ferplus", "--json", "--confusion", str(png))
    summary = last_json(result)
    assert summary["n"] == 7 and summary["excluded"] == 4          # 11 PrivateTest rows, 4 tied with contempt
    assert "overall" in result.stdout and cv2.imread(str(png)).shape[0] > 300
    if summary["baseline"] is not None:                             # ../shared present: measured in the same run
        assert 0 <= summary["baseline_accuracy"] <= 1


def test_evaluate_on_the_shared_folder_sample(tiny_model):
    sample = need_media().parent / "datasets" / "fer2013" / "folder-sample" / "test"
    if not sample.is_dir():
        pytest.skip("../shared not found: datasets/fer2013/folder-sample is absent")
    summary = last_json(run("models.evaluate", "--model", str(tiny_model), "--folder", str(sample), "--json"))
    assert summary["n"] == 70 and summary["skipped"] == 0 and summary["unreadable"] == 0
    assert all(summary["per_class"][label]["n"] == 10 for label in EMOTIONS)
    assert summary["baseline_accuracy"] is not None and summary["baseline_accuracy"] > 0.3   # mini-Xception


def test_evaluate_folders_any_spelling_unknown_classes_unreadable_images_and_gif(tiny_model, tmp_path):
    folder = tmp_path / "folder"
    for name in ("Happiness", "surprised", "contempt"):
        (folder / name).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(folder / name / f"{i}.png"), np.full((64, 80, 3), 40 * i, np.uint8))
    (folder / "surprised" / "broken.jpg").write_bytes(b"not an image")
    (folder / "surprised" / "notes.txt").write_text("ignored")
    from PIL import Image
    Image.new("RGB", (30, 30), (200, 10, 10)).save(folder / "Happiness" / "anim.gif")
    cv2.imwrite(str(folder / "Happiness" / "gray.png"), np.full((200, 100), 90, np.uint8))
    result = run("models.evaluate", "--model", str(tiny_model), "--folder", str(folder), "--json", "--no-baseline")
    summary = last_json(result, returncode=1)
    assert summary["n"] == 8 and summary["skipped"] == 3 and summary["unreadable"] == 1
    assert summary["per_class"]["happy"]["n"] == 5 and summary["per_class"]["surprise"]["n"] == 3
    assert "broken.jpg" in result.stderr and "Traceback" not in result.stderr
    # Scored, but not passed: a corrupt input makes the run fail (exit 1) and names the file.
    assert summary["unreadable_files"] == [str(folder / "surprised" / "broken.jpg")]


def test_evaluate_with_detection_counts_images_without_a_face(tiny_model, tmp_path):
    folder = tmp_path / "faces"
    (folder / "neutral").mkdir(parents=True)
    (folder / "happy").mkdir()
    for i, frame in enumerate(frames_of("woman2.mp4", count=2)):
        cv2.imwrite(str(folder / "neutral" / f"{i}.jpg"), frame)
    cv2.imwrite(str(folder / "happy" / "wall.png"), np.full((240, 320, 3), 128, np.uint8))
    summary = last_json(run("models.evaluate", "--model", str(tiny_model), "--folder", str(folder), "--detect",
                            "--json", "--no-baseline"))
    assert summary["n"] == 3 and summary["no_face"] == 1 and summary["detect"] is True
    assert summary["per_class"]["happy"]["accuracy"] == 0.0       # no face counts as wrong


def test_evaluate_runs_benchmark_faces_through_detection_and_alignment(tiny_model, tmp_path):
    # 48x48 face crops tighter than the face (as many FER2013 faces are) and two blank rows: with --detect
    # each is upscaled, and the faces must be found (most only by the detector's close-up pass); the blank
    # rows count under no_face.
    from models.runtime.detector import make_detector
    frames = frames_of("woman2.mp4", count=4)
    crops = []
    for frame, (x0, y0, x1, y1) in zip(frames, make_detector("auto").detect(frames).boxes):
        w, h = x1 - x0, y1 - y0
        face = frame[int(y0 + 0.2 * h):int(y1 - 0.2 * h), int(x0 + 0.2 * w):int(x1 - 0.2 * w)]
        crops.append(cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48)))
    crops += [np.full((48, 48), 128, np.uint8)] * 2
    data = tmp_path / "fer2013.csv"
    data.write_text("emotion,pixels,Usage\n" + "".join(
        f"{6 if i < 4 else 3},{' '.join(map(str, crop.ravel()))},PrivateTest\n" for i, crop in enumerate(crops)))
    summary = last_json(run("models.evaluate", "--model", str(tiny_model), "--data", str(data), "--labels", "fer2013",
                            "--detect", "--json", "--no-baseline"))
    assert summary["n"] == 6 and summary["detect"] is True and summary["no_face"] == 2
    assert summary["per_class"]["happy"]["accuracy"] == 0.0       # the blank rows: no face counts as wrong


def test_detect_reports_faces_with_probabilities_and_annotates(tiny_model, tmp_path):
    photo = need_media() / "images" / "faces" / "two_people.jpg"
    out = tmp_path / "annotated.png"
    data = last_json(run("models.detect", str(photo), "--json", "--annotate", str(out), "--model", str(tiny_model),
                         "--detector", "full"))
    assert data["image"] == str(photo) and len(data["faces"]) == 2
    for face in data["faces"]:
        x1, y1, x2, y2 = face["box"]
        assert 0 <= x1 < x2 <= data["width"] and 0 <= y1 < y2 <= data["height"] and 0.5 <= face["score"] <= 1
        assert set(face["keypoints"]) == {"right_eye", "left_eye", "nose", "mouth", "right_ear", "left_ear"}
        assert set(face["probs"]) == set(EMOTIONS) and abs(sum(face["probs"].values()) - 1) < 0.01
        assert face["label"] == max(face["probs"], key=face["probs"].get)
    assert cv2.imread(str(out)).shape == cv2.imread(str(photo)).shape
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.zeros((120, 160, 3), np.uint8))
    assert last_json(run("models.detect", str(blank), "--json", "--model", str(tiny_model)))["faces"] == []


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "empty image", "wrong csv header",
                                  "empty folder", "missing data", "missing model", "missing shipped model",
                                  "corrupt model", "unwritable confusion", "pixel value overflowing an int",
                                  "image over the decoder's pixel limit", "only unknown class folders"])
def test_bad_input_is_a_one_line_error_with_exit_code_2(tiny_model, tmp_path, case):
    model = str(tiny_model)
    (tmp_path / "empty").mkdir()
    if case == "missing image":
        args = ["models.detect", str(tmp_path / "nope.jpg"), "--model", model]
    elif case == "corrupt image":
        (tmp_path / "bad.jpg").write_bytes(b"\x89PNG garbage")
        args = ["models.detect", str(tmp_path / "bad.jpg"), "--model", model]
    elif case == "empty image":
        (tmp_path / "zero.png").write_bytes(b"")
        args = ["models.detect", str(tmp_path / "zero.png"), "--model", model]
    elif case == "wrong csv header":
        (tmp_path / "fer2013.csv").write_text("label,image\n1,2\n")
        args = ["models.evaluate", "--model", model, "--data", str(tmp_path / "fer2013.csv")]
    elif case == "empty folder":
        args = ["models.evaluate", "--model", model, "--folder", str(tmp_path / "empty")]
    elif case == "missing data":
        args = ["models.evaluate", "--model", model, "--data", str(tmp_path / "nowhere")]
    elif case == "missing model":
        args = ["models.evaluate", "--model", str(tmp_path / "none.tflite"), "--folder", str(tmp_path)]
    elif case == "missing shipped model":
        args = ["models.bench", "--model", str(tmp_path / "none.tflite")]
    elif case == "corrupt model":
        (tmp_path / "junk.tflite").write_bytes(b"junk" * 100)
        args = ["models.detect", str(tmp_path / "nope.jpg"), "--model", str(tmp_path / "junk.tflite")]
        (tmp_path / "nope.jpg").write_bytes(cv2.imencode(".jpg", np.zeros((50, 50, 3), np.uint8))[1].tobytes())
    elif case == "pixel value overflowing an int":
        (tmp_path / "big.csv").write_text("emotion,pixels,Usage\n0," + " ".join(["9" * 30] * 2304) + ",Training\n")
        args = ["models.evaluate", "--model", model, "--data", str(tmp_path / "big.csv")]
    elif case == "image over the decoder's pixel limit":
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        header = chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))   # claims 3.6 G pixels
        (tmp_path / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"\0" * 99))
                                            + chunk(b"IEND", b""))
        args = ["models.detect", str(tmp_path / "bomb.png"), "--model", model]
    elif case == "only unknown class folders":
        for name in ("contempt", "misc"):
            (tmp_path / "classes" / name).mkdir(parents=True)
            cv2.imwrite(str(tmp_path / "classes" / name / "a.png"), np.zeros((48, 48), np.uint8))
        args = ["models.evaluate", "--model", model, "--folder", str(tmp_path / "classes")]
    else:
        write_csv(tmp_path / "data")
        args = ["models.evaluate", "--model", model, "--data", str(tmp_path / "data"), "--no-baseline",
                "--confusion", str(tmp_path / "cm.unknown-extension")]
    result = run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error:") and "Traceback" not in result.stderr
    if "model" in case:
        assert ".tflite" in lines[-1]
    if case == "only unknown class folders":
        assert "contempt, misc" in lines[-1]
    if case == "image over the decoder's pixel limit":
        assert "too large" in lines[-1]


@pytest.mark.parametrize("args", [["models.bench", "--repeats", "0"], ["models.evaluate", "--threads", "0"],
                                  ["models.detect", "x.jpg", "--min-score", "nan"],
                                  ["models.detect", "x.jpg", "--min-score", "-1"]])
def test_out_of_range_options_are_usage_errors(args):
    result = run(*args)
    assert result.returncode == 2 and "error: argument" in result.stderr and "Traceback" not in result.stderr


def test_a_thin_strip_of_an_image_has_no_faces_rather_than_an_error(tiny_model, tmp_path):
    cv2.imwrite(str(tmp_path / "strip.png"), np.full((2, 30000, 3), 128, np.uint8))
    result = run("models.detect", str(tmp_path / "strip.png"), "--model", str(tiny_model), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["faces"] == []


def test_bench_measures_the_default_ferplus_model_unless_told_otherwise():
    data = last_json(run("models.bench", "--repeats", "1", "--json", timeout=240))
    ours = [r["model"] for r in data["classifier"] if r["model"].startswith("ours")]
    assert len(ours) == 2 and all("ferplus" in name for name in ours), ours


def test_bench_measures_ours_beside_the_references(tiny_model):
    data = last_json(run("models.bench", "--repeats", "3", "--json", "--model", str(tiny_model), timeout=240))
    ours = [r for r in data["classifier"] if r["model"].startswith("ours")]
    assert len(ours) == 2 and all(r["ms_per_face_batch1"] > 0 and r["ms_per_face_batch32"] > 0 for r in ours)
    assert any("as shipped" in r["model"] for r in ours) and any("--no-flip" in r["model"] for r in ours)
    detectors = {r["detector"] for r in data["detector"]}
    assert {"ours: short", "ours: full", "ours: full+tiles", "ours: auto (bot)"} <= detectors
    if MEDIA is not None:
        assert any(r["model"].startswith("baseline") for r in data["classifier"])
        assert any(d.startswith("reference: YuNet") for d in detectors)


def test_mean_recall_weighs_every_class_alike_and_ece_is_the_gap_between_confidence_and_accuracy():
    from models.evaluate import expected_calibration_error, mean_recall
    truth = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1])             # accuracy 5/6, but class 1 is found half the time
    assert mean_recall(pred, truth) == pytest.approx((1.0 + 0.5) / 2)
    sure = np.zeros((6, 7), np.float32)
    sure[np.arange(6), pred] = 1.0                   # always 100 % sure, right 5 times of 6
    assert expected_calibration_error(sure, truth) == pytest.approx(1 / 6)
    honest = np.full((5, 7), 0.1, np.float32)
    honest[:, 0] = 0.4                               # 40 % sure of class 0, and right 2 times of 5
    assert expected_calibration_error(honest, np.array([0, 0, 1, 2, 3])) == pytest.approx(0.0, abs=1e-6)
    gaps = np.full((2, 7), np.nan, np.float32)       # faces the detector missed are not scored
    assert expected_calibration_error(gaps, np.array([0, 1])) == 0.0


def test_calibrate_fits_a_temperature_on_publictest_and_the_classifier_applies_it(tiny_model, tmp_path):
    import shutil

    from models.runtime.classifier import ExpressionClassifier
    data = write_csv(tmp_path / "data")
    model = tmp_path / "tiny.tflite"
    shutil.copy(tiny_model, model)
    summary = last_json(run("models.calibrate", "--model", str(model), "--data", str(data), "--labels", "fer2013", "--write"))
    assert summary["fitted_on"].startswith("PublicTest") and 0.2 <= summary["temperature"] <= 5
    assert summary["publictest_nll_after"] <= summary["publictest_nll_before"] + 1e-6
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["calibration"]["temperature"] == summary["temperature"]
    faces = np.random.default_rng(0).random((6, 48, 48, 1), dtype=np.float32)
    raw = ExpressionClassifier(str(model), calibrated=False).predict(faces)
    scaled = ExpressionClassifier(str(model)).predict(faces)
    assert (raw.argmax(1) == scaled.argmax(1)).all() and np.allclose(scaled.sum(1), 1, atol=1e-5)
    if abs(summary["temperature"] - 1) > 0.05:
        assert not np.allclose(raw, scaled, atol=1e-4)
    bad = run("models.calibrate", "--model", str(model), "--data", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "error:" in bad.stderr


def test_vp8_degradation_takes_a_frame_rate_and_fewer_bits_a_frame_cost_more_detail():
    """vp8@FPS:KBPS: what a camera track capped at FPS and KBPS leaves of each face (every frame holds another face)."""
    from models.degrade import degrade_images, parse
    assert parse("vp8@3:90") == ("vp8@3", 90.0) and parse("vp8@2.5") == ("vp8@2.5", 300.0) and parse("vp8:90") == ("vp8", 90.0)
    for spec in ("jpeg@3:50", "vp8@0:90", "vp8@fast:90", "vp8@99:90"):
        with pytest.raises(ValueError):
            parse(spec)
    rng = np.random.default_rng(3)
    faces = ([cv2.cvtColor(cv2.resize(f, (144, 144)), cv2.COLOR_BGR2GRAY) for f in frames_of("woman2.mp4", count=12)]
             if MEDIA else [cv2.GaussianBlur(rng.integers(0, 255, (144, 144), np.uint8), (0, 0), 2) for _ in range(12)])

    def error(kind: str, kbps: float) -> float:
        out = degrade_images(faces, kind, kbps)
        assert len(out) == len(faces) and all(o.shape == f.shape for o, f in zip(out, faces))
        return float(np.mean([np.abs(o.astype(float) - f).mean() for o, f in zip(out, faces)]))

    # The same 90 kbit/s spread over 15 frames/s leaves each face 6 kbit instead of 30.
    assert error("vp8@15", 90) > 1.2 * error("vp8@3", 90)


def test_evaluate_scores_degraded_faces_one_kind_or_all_of_them(tiny_model, tmp_path):
    from models.degrade import KINDS, degrade_faces, parse
    assert parse("jpeg") == ("jpeg", 50.0) and parse("blur:high") == ("blur", 3.0) and parse("noise:12") == ("noise", 12.0)
    for spec in ("fog", "jpeg:-3", "jpeg:lots"):
        with pytest.raises(ValueError):
            parse(spec)
    face = (frames_of("woman2.mp4", count=1)[0] if MEDIA else np.random.default_rng(1).integers(0, 255, (96, 96, 3), np.uint8))
    face48 = (cv2.resize(cv2.cvtColor(face, cv2.COLOR_BGR2GRAY), (48, 48)).astype(np.float32) / 255)[None, ..., None]
    reference = degrade_faces(face48, "none", 1)
    for kind in KINDS:
        out = degrade_faces(face48, *parse(kind))
        assert out.shape == face48.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
        if kind != "none":
            assert np.abs(out - reference).mean() > 1e-3, kind
    data = write_csv(tmp_path / "data")
    one = last_json(run("models.evaluate", "--model", str(tiny_model), "--data", str(data), "--split", "PublicTest",
                        "--degrade", "jpeg:30", "--no-baseline", "--json"))
    assert one["degrade"] == "jpeg:30" and one["n"] == 10
    table = run("models.evaluate", "--model", str(tiny_model), "--data", str(data), "--split", "PublicTest",
                "--degrade", "all", "--no-baseline", "--json", timeout=300)
    rows = last_json(table)["degradations"]
    assert [r["degradation"].split(":")[0] for r in rows] == ["clean", *KINDS] and rows[0]["accuracy_change"] == 0
    assert "vp8:300" in table.stdout and "occlude:0.3" in table.stdout
    bad = run("models.evaluate", "--model", str(tiny_model), "--data", str(data), "--degrade", "fog")
    assert bad.returncode == 2 and "unknown degradation 'fog'" in bad.stderr
