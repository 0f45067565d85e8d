"""Training reproduces from one command: a tiny run on a synthetic FER2013-format CSV trains, resumes,
and exports a TFLite file with the bot's I/O contract. Data loaders read every layout people have."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.data import DatasetError, FerData, load_dataset, load_fer2013_csv

PROJECT = Path(__file__).resolve().parent.parent
SHARED = PROJECT.parent / "shared"


def write_fer_csv(folder: Path, n_train: int = 160, n_public: int = 48, seed: int = 0) -> Path:
    """A FER2013-format CSV (+ fer2013new.csv votes) whose classes are learnable: class k is a
    bright horizontal band at row 6k, so a few steps of training beat chance."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "fer2013.csv"
    with open(path, "w", newline="") as f, open(folder / "fer2013new.csv", "w", newline="") as g:
        w, v = csv.writer(f), csv.writer(g)
        w.writerow(["emotion", "pixels", "Usage"])
        v.writerow(["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                    "fear", "contempt", "unknown", "NF"])
        ferplus_col = {0: 4, 1: 5, 2: 6, 3: 1, 4: 3, 5: 2, 6: 0}
        for i in range(n_train + n_public):
            label = int(rng.integers(0, 7))
            img = rng.integers(0, 60, (48, 48))
            img[6 * label:6 * label + 6] = 230
            usage = "Training" if i < n_train else "PublicTest"
            w.writerow([label, " ".join(map(str, img.ravel())), usage])
            votes = [0] * 10
            votes[ferplus_col[label]] = 8
            votes[8] = 2
            v.writerow([usage, f"fer{i:07d}.png", *votes])
    return path


def run_module(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT, capture_output=True, text=True, timeout=timeout)


def test_csv_loader_attaches_ferplus_votes_and_scores_majority(tmp_path):
    data = load_dataset(write_fer_csv(tmp_path / "d", n_train=20, n_public=10))
    assert data.images.shape == (30, 48, 48) and data.images.dtype == np.uint8
    assert data.votes is not None and data.votes.shape == (30, 10)
    # Every synthetic row has an 8-vote majority for its own FER2013 label.
    assert (data.ferplus_majority() == data.labels).all()
    assert np.allclose(data.ferplus_soft().sum(1), 1.0)


def test_ferplus_majority_skips_ties_and_non_emotions():
    votes = np.array([[5, 5, 0, 0, 0, 0, 0, 0, 0, 0],    # tie neutral/happiness
                      [0, 0, 0, 0, 0, 0, 0, 6, 4, 0],    # contempt wins
                      [0, 0, 0, 0, 0, 0, 0, 0, 0, 10],   # not a face
                      [1, 7, 2, 0, 0, 0, 0, 0, 0, 0]])   # happiness
    data = FerData(np.zeros((4, 48, 48), np.uint8), np.zeros(4, np.int64), np.array(["PrivateTest"] * 4), votes)
    assert data.ferplus_majority().tolist() == [-1, -1, -1, 3]


@pytest.mark.parametrize("content, message", [
    ("label,pixels,Usage\n0,1 2,Training\n", "expected header"),
    ("emotion,pixels,Usage\n0,1 2 3,Training\n", "2304 values"),
    ("emotion,pixels,Usage\n", "no rows"),
])
def test_bad_csv_gives_a_clear_dataset_error(tmp_path, content, message):
    path = tmp_path / "fer2013.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_fer2013_csv(path)


def test_missing_and_empty_datasets_are_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty folder"):
        load_dataset(tmp_path / "empty")


def test_image_folder_layout_loads_with_splits_from_file_names():
    sample = SHARED / "datasets" / "fer2013" / "folder-sample"
    if not sample.exists():
        pytest.skip(f"{sample} not found: the shared datasets folder is absent")
    data = load_dataset(sample)
    assert len(data) == 140 and data.images.shape[1:] == (48, 48)
    assert set(np.unique(data.labels)) == set(range(7))
    assert (data.splits == "Training").sum() == 70


def test_train_resume_and_export_make_a_working_tflite_model(tmp_path):
    data_dir = tmp_path / "data"
    write_fer_csv(data_dir)
    run = tmp_path / "runs" / "tiny"
    common = ["models.train", "--data", str(data_dir), "--labels", "ferplus", "--width", "tiny", "--batch", "32",
              "--out", str(run), "--quiet", "--lr", "0.05", "--no-jit"]
    first = run_module(*common, "--epochs", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    state = json.loads((run / "state.json").read_text())
    assert state["epoch"] == 2 and (run / "last.keras").exists() and (run / "best.weights.h5").exists()
    assert (run / "metrics.csv").read_text().count("\n") == 3  # header + 2 epochs

    resumed = run_module(*common, "--epochs", "4", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stdout
    assert json.loads((run / "state.json").read_text())["epoch"] == 4

    target = tmp_path / "tiny.tflite"
    export = run_module("models.export", "--run", str(run), "--name", str(target), "--data", str(data_dir))
    assert export.returncode == 0, export.stderr[-2000:]
    card = json.loads(target.with_suffix(".json").read_text())
    assert card["labels"] == "ferplus" and card["epochs"] == 4
    # Float32 and both quantisations are scored on PublicTest; a quantised file ships only within --max-drop.
    acc = card["publictest_accuracy"]
    assert {"tflite_float32", "tflite_dynamic", "tflite_int8"} <= set(acc)
    if card["quantisation"] != "float32":
        shipped = acc["tflite_dynamic"] if "dynamic range" in card["quantisation"] else acc["tflite_int8"]
        assert acc["tflite_float32"] - shipped <= 0.005
        assert shipped == max(a for a in (acc["tflite_dynamic"], acc["tflite_int8"]) if acc["tflite_float32"] - a <= 0.005)

    from models.runtime.detector import load_interpreter
    interpreter = load_interpreter(target, threads=1)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, (5, 48, 48, 1))
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, np.random.default_rng(0).random((5, 48, 48, 1), dtype=np.float32))
    interpreter.invoke()
    probs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    assert probs.shape == (5, 7)
    assert np.allclose(probs.sum(1), 1.0, atol=0.02)
    # Learnable synthetic classes: the tiny net must beat chance (1/7) on the held-out rows.
    assert card["publictest_accuracy"]["keras"] > 0.3


def test_train_reports_unreadable_data_without_traceback(tmp_path):
    bad = tmp_path / "fer2013.csv"
    bad.write_text("foo,bar\n1,2\n")
    result = run_module("models.train", "--data", str(bad), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert result.returncode == 2
    assert "expected header" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("extra, message", [
    ("\n\n", None),                                               # trailing blank lines are fine
    ("PublicTest,x.png,1,2\n", r"fer2013new.csv:\d+: expected 12 columns"),
    ("PublicTest,x.png,1,2,3,four,5,6,7,8,9,10\n", r"fer2013new.csv:\d+: votes must be whole numbers"),
])
def test_damaged_ferplus_vote_files_name_the_line(tmp_path, extra, message):
    path = write_fer_csv(tmp_path / "d", n_train=6, n_public=2)
    with open(path.with_name("fer2013new.csv"), "a") as f:
        f.write(extra)
    if message is None:
        assert load_dataset(path).votes.shape == (8, 10)
    else:
        with pytest.raises(DatasetError, match=message):
            load_dataset(path)


def write_image_tree(root: Path, names: dict[str, list[str]]) -> None:
    """root/<split>/<class>/<file>.png with a face-sized gray image in each."""
    import cv2
    for folder, files in names.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in files:
            cv2.imwrite(str(root / folder / name), np.full((48, 48), 128, np.uint8))


def test_image_trees_name_a_corrupt_file_and_ignore_folders_that_look_like_images(tmp_path):
    root = tmp_path / "tree"
    write_image_tree(root, {"train/happy": ["Training_1.png"], "test/sad": ["PrivateTest_2.png"]})
    (root / "train" / "happy" / "album.jpg").mkdir()               # a folder named like an image
    assert len(load_dataset(root)) == 2
    (root / "train" / "happy" / "broken.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"broken\.png: not a readable image"):
        load_dataset(root)


def test_a_zip_with_damaged_compressed_data_is_a_clear_error(tmp_path):
    import zipfile
    import cv2
    archive = tmp_path / "archive.zip"
    ok, png = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8))
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("train/happy/Training_1.png", png.tobytes())
    raw = bytearray(archive.read_bytes())
    start = raw.index(b"Training_1.png") + len(b"Training_1.png")    # compressed data follows the local header
    raw[start:start + 40] = b"\xff" * 40
    archive.write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match="archive.zip"):
        load_dataset(archive)


def test_the_training_cache_notices_images_added_to_a_tree(tmp_path):
    from models.train import dataset_fingerprint
    root = tmp_path / "tree"
    write_image_tree(root, {"train/happy": ["Training_1.png"]})
    before = dataset_fingerprint(root)
    assert dataset_fingerprint(root) == before
    write_image_tree(root, {"train/sad": ["Training_2.png"]})     # the root folder's own mtime is unchanged
    assert dataset_fingerprint(root) != before


def test_train_on_the_downloaded_folder_layout_selects_on_held_out_training_faces(tmp_path):
    sample = SHARED / "datasets" / "fer2013" / "folder-sample"
    if not sample.exists():
        pytest.skip(f"{sample} not found: the shared datasets folder is absent")
    result = run_module("models.train", "--data", str(sample), "--labels", "fer2013", "--out", str(tmp_path / "run"),
                        "--epochs", "1", "--steps-per-epoch", "1", "--batch", "16", "--threads", "1", "--quiet",
                        "--no-jit")    # XLA compiling the step would be most of this test's time
    assert result.returncode == 0, result.stderr[-2000:]
    assert "selecting on 7 held-out Training faces" in result.stdout
    assert (tmp_path / "run" / "best.weights.h5").exists()


@pytest.mark.parametrize("flag", ["--init-weights", "--out"])
def test_train_refuses_a_missing_weights_file_or_a_file_as_run_folder(tmp_path, flag):
    not_a_folder = tmp_path / "file.txt"
    not_a_folder.write_text("x")
    value = str(tmp_path / "missing.weights.h5") if flag == "--init-weights" else str(not_a_folder)
    args = ["models.train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), flag, value]
    result = run_module(*args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("no such weights file" if flag == "--init-weights" else "is a file, not a run folder") in result.stderr


def test_distillation_and_weight_averaging_select_the_best_candidate_on_publictest(tmp_path):
    data_dir = tmp_path / "data"
    write_fer_csv(data_dir)
    common = ["models.train", "--data", str(data_dir), "--labels", "fer2013", "--width", "tiny", "--batch", "32",
              "--quiet", "--no-jit", "--threads", "1"]
    teacher = tmp_path / "teacher"
    assert run_module(*common, "--out", str(teacher), "--epochs", "2", "--lr", "0.05").returncode == 0
    student = tmp_path / "student"
    args = [*common, "--out", str(student), "--epochs", "2", "--lr", "0.01", "--swa", "--teacher", str(teacher),
            "--init-weights", str(teacher / "best.weights.h5")]
    result = run_module(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "distilling from 1 teacher(s)" in result.stdout and "teacher " in result.stdout
    assert (student / "swa.weights.h5").exists() and (student / "teacher-targets.npz").exists()
    with open(student / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    scores = [float(r[k]) for r in rows for k in ("val_accuracy_mirror", "val_accuracy_swa")]
    assert json.loads((student / "state.json").read_text())["best_val_accuracy"] == pytest.approx(max(scores))


def test_teacher_targets_are_the_mirror_averaged_teacher_predictions_cached_until_a_teacher_changes(tmp_path, capsys):
    import os
    import keras
    from models.net import build_model
    from models.train import mirror_averaged, teacher_targets
    keras.utils.set_random_seed(0)
    model = build_model("tiny")
    weights = tmp_path / "t.weights.h5"
    model.save_weights(weights)
    faces = np.random.default_rng(0).integers(0, 255, (20, 48, 48), dtype=np.uint8)
    targets = teacher_targets([str(weights)], faces, "tiny", tmp_path / "cache.npz")
    expected = mirror_averaged(model, (faces.astype(np.float32) / 255)[..., None])
    assert np.allclose(targets, expected, atol=1e-5)
    assert not np.allclose(expected, model.predict((faces.astype(np.float32) / 255)[..., None], verbose=0), atol=1e-4)
    # Cached: the same faces and teachers are not run through the teachers again ("teacher ...: done" says a pass).
    assert "done" in capsys.readouterr().out
    assert np.array_equal(teacher_targets([str(weights)], faces, "tiny", tmp_path / "cache.npz"), targets)
    assert "done" not in capsys.readouterr().out
    # A teacher file that changed (here: its modification time) is run again.
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert np.allclose(teacher_targets([str(weights)], faces, "tiny", tmp_path / "cache.npz"), targets, atol=1e-5)
    assert "done" in capsys.readouterr().out


def test_recomputed_batch_norm_statistics_are_those_of_the_given_faces():
    import keras
    from models.net import build_model
    from models.train import recompute_batch_norm
    model = build_model("tiny")
    x = np.random.default_rng(1).random((64, 48, 48, 1), dtype=np.float32)
    recompute_batch_norm(model, x, batch=64, batches=3)
    conv = keras.Model(model.input, model.get_layer("s1c1_conv").output)(x).numpy()
    bn = model.get_layer("s1c1_bn")
    assert np.allclose(bn.moving_mean.numpy(), conv.mean((0, 1, 2)), atol=1e-5)
    assert np.allclose(bn.moving_variance.numpy(), conv.var((0, 1, 2)), rtol=1e-3, atol=1e-6)


def test_train_refuses_a_missing_teacher(tmp_path):
    result = run_module("models.train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
                        "--teacher", str(tmp_path / "nope"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--teacher" in result.stderr and "no such run folder" in result.stderr


def test_a_shipped_model_rebuilt_from_its_tflite_file_computes_what_the_file_computes():
    from models.from_tflite import rebuild
    from models.runtime.classifier import ExpressionClassifier
    path = PROJECT / "models" / "weights" / "ferplus.tflite"
    rng = np.random.default_rng(3)
    # Face-like inputs: smooth blobs, so that classes differ and the check is not on noise alone.
    import cv2
    faces = np.stack([cv2.GaussianBlur(rng.random((48, 48), dtype=np.float32), (0, 0), 3) for _ in range(48)])
    faces = ((faces - faces.min()) / (faces.max() - faces.min()))[..., None].astype(np.float32)
    shipped = ExpressionClassifier(str(path), threads=1, flip_average=False, calibrated=False).predict(faces)
    rebuilt = rebuild(str(path)).predict(faces, verbose=0)
    # The file quantises activations at run time; the rebuilt net is float32 with the same (int8) weights.
    assert np.abs(shipped - rebuilt).max() < 0.05
    assert (shipped.argmax(1) == rebuilt.argmax(1)).mean() >= 0.95
    assert len(set(shipped.argmax(1))) > 1


def test_a_fine_tune_of_rebuilt_weights_keeps_the_folded_batch_norms_frozen(tmp_path):
    data_dir = tmp_path / "data"
    write_fer_csv(data_dir, n_train=64, n_public=16)
    rebuilt = tmp_path / "rebuilt"
    made = run_module("models.from_tflite", "--model", "ferplus", "--out", str(rebuilt))
    assert made.returncode == 0, made.stderr[-2000:]
    assert "same top class" in made.stdout
    run = tmp_path / "tuned"
    result = run_module("models.train", "--data", str(data_dir), "--labels", "ferplus", "--out", str(run), "--quiet",
                        "--no-jit", "--threads", "1", "--epochs", "1", "--batch", "32", "--lr", "0.01",
                        "--init-weights", str(rebuilt / "best.weights.h5"), "--freeze-bn", "--logit-adjust", "1",
                        "--camera-aug", "0.5", "--select", "balanced")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mean per-class recall" in result.stdout
    from models.net import build_model
    before, after = build_model("small"), build_model("small")
    before.load_weights(rebuilt / "best.weights.h5")
    import keras
    after.set_weights(keras.saving.load_model(run / "last.keras", compile=False).get_weights())
    bn_before, bn_after = before.get_layer("s2c1_bn").get_weights(), after.get_layer("s2c1_bn").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(bn_before, bn_after))      # frozen: statistics and affine kept
    assert not np.array_equal(before.get_layer("s2c1_conv").get_weights()[0], after.get_layer("s2c1_conv").get_weights()[0])


def test_logit_adjusted_loss_is_cross_entropy_shifted_against_common_classes():
    import keras
    from models.train import logit_adjusted_loss
    prior = np.array([0.1, 0.01, 0.04, 0.3, 0.1, 0.1, 0.35], np.float32)
    p = np.full((1, 7), 1 / 7, np.float32)
    rare, common = np.eye(7, dtype=np.float32)[[1]], np.eye(7, dtype=np.float32)[[6]]
    plain = float(keras.losses.categorical_crossentropy(rare, p)[0])
    assert float(logit_adjusted_loss(prior, 0.0)(rare, p)[0]) == pytest.approx(plain, rel=1e-5)
    # With the prior added to its logits, a uniform output under-predicts the rare class (larger loss) and
    # over-predicts the common one (smaller loss): training pushes the plain output towards rare classes.
    assert float(logit_adjusted_loss(prior, 1.0)(rare, p)[0]) > plain + 1.0
    assert float(logit_adjusted_loss(prior, 1.0)(common, p)[0]) < plain


@pytest.mark.parametrize("kind", ["blur", "dark", "noise", "downscale", "jpeg", "hand"])
def test_each_camera_degradation_changes_a_face_and_the_hand_stays_on_the_lower_face(kind, monkeypatch):
    import models.train as train
    face = np.clip(np.random.default_rng(0).normal(120, 40, (48, 48)), 0, 255).astype(np.uint8)
    monkeypatch.setattr(train, "CAMERA_KINDS", (kind,))
    for seed in range(5):
        out = train.camera_degrade(face, np.random.default_rng(seed))
        assert out.shape == (48, 48) and out.dtype == np.uint8
        assert not np.array_equal(out, face)
        if kind == "hand":
            assert np.array_equal(out[:20], face[:20])
