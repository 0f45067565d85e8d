"""GPU training path: the data pack carries Training/PublicTest only, weights survive the trip between Keras
and PyTorch layouts, and (where PyTorch is installed) a PyTorch run imports back into a Keras run that
models.export turns into the bot's TFLite file."""
from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from models.data import load_dataset
from models.torch_port import keras_to_torch, quantize_teacher, read_pack, read_teacher, torch_to_keras, write_pack
from tests.test_models_train import run_module, write_fer_csv

HAS_TORCH = importlib.util.find_spec("torch") is not None
requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (CI installs TensorFlow only); "
                                    "the GPU trainer is run where PyTorch is, see models/MODEL_CARD.md")


def _synthetic_pack(folder, n_train, n_public):
    """(data folder, pack file) of a synthetic FER2013 CSV, packed by the CLI as a GPU run's data would be."""
    data_dir = folder / "data"
    write_fer_csv(data_dir, n_train=n_train, n_public=n_public)
    pack = folder / "pack.xz"
    assert run_module("models.torch_port", "pack", "--data", str(data_dir), "--out", str(pack)).returncode == 0
    return data_dir, pack


def _csv_with_private_rows(folder):
    """The synthetic CSV plus PrivateTest rows, which a pack must never carry."""
    path = write_fer_csv(folder, n_train=60, n_public=20)
    lines = path.read_text().splitlines()
    private = [line.replace(",PublicTest", ",PrivateTest") for line in lines[-5:]]
    path.write_text("\n".join(lines + private) + "\n")
    votes = (folder / "fer2013new.csv").read_text().splitlines()
    (folder / "fer2013new.csv").write_text("\n".join(votes + [v.replace("PublicTest", "PrivateTest") for v in votes[-5:]]) + "\n")
    return folder


def test_the_pack_holds_training_and_publictest_faces_with_both_label_sets_and_no_privatetest(tmp_path):
    data = load_dataset(_csv_with_private_rows(tmp_path / "data"))
    assert (data.splits == "PrivateTest").sum() == 5
    write_pack(tmp_path / "pack.xz", data)
    pack = read_pack(tmp_path / "pack.xz")
    assert pack["train_images"].shape == (60, 48, 48) and pack["val_images"].shape == (20, 48, 48)
    assert np.array_equal(pack["train_images"], data.split("Training").images)
    assert np.array_equal(pack["val_fer2013"], data.split("PublicTest").labels)
    assert pack["train_soft_ferplus"].shape == (60, 7)
    assert np.allclose(pack["train_soft_ferplus"].sum(1), 1.0)
    assert np.array_equal(pack["train_soft_fer2013"].argmax(1), pack["train_hard_fer2013"])


def test_keras_weights_survive_the_round_trip_through_the_pytorch_layout():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from models.net import build_model
    source, target = build_model("tiny"), build_model("tiny")
    for layer in source.layers:  # non-trivial batch-norm statistics, so a swapped mean/variance shows
        for weight in layer.weights:
            weight.assign(np.random.default_rng(len(weight.path)).normal(0.5, 0.2, weight.shape).astype(np.float32) ** 2)
    arrays = keras_to_torch(source, "tiny")
    assert arrays["s1c1_conv.weight"].shape == (8, 1, 3, 3)           # PyTorch (out, in, kh, kw)
    assert arrays["head_dense.weight"].shape == (256, 3 * 3 * 32)     # Linear (out, in)
    torch_to_keras(arrays, target, "tiny")
    faces = np.random.default_rng(1).random((4, 48, 48, 1), dtype=np.float32)
    assert np.allclose(source.predict(faces, verbose=0), target.predict(faces, verbose=0), atol=1e-6)


def test_import_refuses_weights_whose_outputs_keras_cannot_reproduce(tmp_path):
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from models.net import build_model
    arrays = keras_to_torch(build_model("tiny"), "tiny")
    probe = np.random.default_rng(0).random((3, 48, 48, 1), dtype=np.float32)
    meta = {"best_val_accuracy": 0.5, "best_epoch": 1, "epochs": 1, "elapsed_s": 1.0, "args": {"width": "tiny"}}
    wrong = np.full((3, 7), 1 / 7, np.float32)
    np.savez(tmp_path / "w.npz", **arrays, probe_images=probe, probe_probs=wrong, meta=np.array(json.dumps(meta)))
    result = run_module("models.torch_port", "import", "--weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "does not reproduce" in result.stderr
    assert not (tmp_path / "run" / "best.weights.h5").exists()


def _trainer_output(path, width="tiny"):
    """A file shaped like models.train_torch's output, with a tiny net's (non-trivial) weights."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from models.net import build_model
    arrays = keras_to_torch(build_model(width), width)
    arrays = {k: v + np.random.default_rng(len(k)).normal(0, 0.05, v.shape).astype(np.float32) for k, v in arrays.items()}
    meta = {"best_val_accuracy": 0.5, "best_epoch": 1, "epochs": 1, "elapsed_s": 1.0,
            "args": {"width": width, "labels": "ferplus"}}
    np.savez(path, **arrays, probe_images=np.zeros((1, 48, 48, 1), np.float32),
             probe_probs=np.full((1, 7), 1 / 7, np.float32), meta=np.array(json.dumps(meta)))
    return arrays


def test_a_teacher_file_keeps_each_weight_within_half_a_step_of_its_channels_int8_scale(tmp_path):
    original = _trainer_output(tmp_path / "run.npz")
    result = run_module("models.torch_port", "teacher", "--weights", str(tmp_path / "run.npz"), "--out", str(tmp_path / "t.npz"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t.npz").stat().st_size < (tmp_path / "run.npz").stat().st_size / 3
    restored, meta = read_teacher(tmp_path / "t.npz")
    assert meta["args"]["width"] == "tiny" and restored.keys() == original.keys()
    for key, value in original.items():
        if key.endswith(".weight") and value.ndim >= 2:
            step = np.abs(value.reshape(len(value), -1)).max(1) / 127
            error = np.abs(restored[key] - value).reshape(len(value), -1).max(1)
            assert np.all(error <= step / 2 + 1e-7), key
        else:   # biases and batch-norm statistics travel exactly
            assert np.array_equal(restored[key], value), key
    assert read_teacher(tmp_path / "run.npz")[0].keys() == original.keys()   # a trainer output teaches as it is
    with np.load(tmp_path / "t.npz") as z:   # an int8 kernel without its scale is not a teacher file
        cut = {k: z[k] for k in z.files if k != "s1c1_conv.weight.scale"}
    np.savez(tmp_path / "cut.npz", **cut)
    with pytest.raises(ValueError, match="not a models.train_torch output"):
        read_teacher(tmp_path / "cut.npz")


def test_an_all_zero_channel_survives_quantisation():
    weights = {"w.weight": np.zeros((2, 3), np.float32), "w.bias": np.ones(2, np.float32)}
    weights["w.weight"][1] = [0.5, -1.0, 0.25]
    q = quantize_teacher(weights)
    assert q["w.weight"].dtype == np.int8 and np.all(np.isfinite(q["w.weight.scale"]))
    assert np.array_equal(q["w.weight"][0], [0, 0, 0]) and q["w.weight"][1, 1] == -127


@pytest.mark.parametrize("content", [b"", b"not an npz"])
def test_the_teacher_command_refuses_files_that_are_not_trained_runs(tmp_path, content):
    (tmp_path / "bad.npz").write_bytes(content)
    result = run_module("models.torch_port", "teacher", "--weights", str(tmp_path / "bad.npz"), "--out", str(tmp_path / "t.npz"))
    assert result.returncode == 2 and "not a models.train_torch output" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "t.npz").exists()


def test_the_gpu_trainer_says_plainly_when_pytorch_is_missing(tmp_path):
    if HAS_TORCH:
        pytest.skip("PyTorch is installed here; the message is for machines without it")
    result = run_module("models.train_torch", "--pack", str(tmp_path / "none.xz"), "--out", str(tmp_path / "o.npz"))
    assert result.returncode == 2 and "PyTorch is not installed" in result.stderr and "Traceback" not in result.stderr


@requires_torch
def test_a_pytorch_run_imports_into_keras_and_exports_a_working_tflite_model(tmp_path):
    data_dir, pack = _synthetic_pack(tmp_path, n_train=160, n_public=48)
    trained = run_module("models.train_torch", "--pack", str(pack), "--labels", "ferplus", "--width", "tiny",
                         "--device", "cpu", "--epochs", "6", "--batch", "32", "--lr", "0.05", "--out", str(tmp_path / "w.npz"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    imported = run_module("models.torch_port", "import", "--weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "run"))
    assert imported.returncode == 0, imported.stderr[-2000:]
    target = tmp_path / "tiny.tflite"
    export = run_module("models.export", "--run", str(tmp_path / "run"), "--name", str(target), "--data", str(data_dir))
    assert export.returncode == 0, export.stderr[-2000:]
    card = json.loads(target.with_suffix(".json").read_text())
    assert card["epochs"] == 6 and card["publictest_accuracy"]["keras"] > 0.3


@requires_torch
def test_a_run_taught_by_a_teacher_file_reports_the_teacher_and_a_broken_teacher_is_a_clear_error(tmp_path):
    _, pack = _synthetic_pack(tmp_path, n_train=96, n_public=32)
    _trainer_output(tmp_path / "teacher-run.npz")
    assert run_module("models.torch_port", "teacher", "--weights", str(tmp_path / "teacher-run.npz"),
                      "--out", str(tmp_path / "teacher.npz")).returncode == 0
    (tmp_path / "broken.npz").write_bytes(b"garbage")

    def train(teacher):
        return run_module("models.train_torch", "--pack", str(pack), "--width", "tiny", "--device", "cpu",
                          "--epochs", "2", "--batch", "32", "--teacher", str(teacher), "--distill", "0.7",
                          "--out", str(tmp_path / "w.npz"))
    taught = train(tmp_path / "teacher.npz")
    assert taught.returncode == 0, taught.stderr[-2000:]
    assert "1 teachers, distill 0.7: PublicTest" in taught.stdout
    assert run_module("models.torch_port", "import", "--weights", str(tmp_path / "w.npz"),
                      "--out", str(tmp_path / "run")).returncode == 0
    broken = train(tmp_path / "broken.npz")
    assert broken.returncode == 2 and "--teacher" in broken.stderr and "Traceback" not in broken.stderr


@pytest.mark.parametrize("content", [b"", b"not a pack", b"\xfd7zXZ\x00\x00cut short"])
def test_import_and_the_trainer_refuse_files_that_are_not_theirs_without_a_traceback(tmp_path, content):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(content)
    result = run_module("models.torch_port", "import", "--weights", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "not the output of models.train_torch" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(ValueError, match="not a data pack"):
        read_pack(bad)


def test_a_pack_missing_arrays_is_not_a_pack(tmp_path):
    import lzma
    with lzma.open(tmp_path / "p.xz", "wb") as handle:
        np.savez(handle, train_images=np.zeros((1, 48, 48), np.uint8))
    with pytest.raises(ValueError, match="missing val_images"):
        read_pack(tmp_path / "p.xz")


@requires_torch
def test_a_logit_adjusted_pytorch_run_selected_for_balanced_recall_trains_and_imports(tmp_path):
    _, pack = _synthetic_pack(tmp_path, n_train=160, n_public=48)
    trained = run_module("models.train_torch", "--pack", str(pack), "--labels", "ferplus", "--width", "tiny",
                         "--device", "cpu", "--epochs", "4", "--batch", "32", "--lr", "0.05", "--logit-adjust", "1",
                         "--select", "balanced", "--camera-aug", "0.3", "--out", str(tmp_path / "w.npz"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    meta = json.loads(str(np.load(tmp_path / "w.npz")["meta"]))
    assert meta["args"]["logit_adjust"] == "1.0" and meta["args"]["select"] == "balanced"
    assert 0.3 < meta["best_val_accuracy"] <= 1.0
    assert run_module("models.torch_port", "import", "--weights", str(tmp_path / "w.npz"),
                      "--out", str(tmp_path / "run")).returncode == 0


@requires_torch
@pytest.mark.parametrize("kind", ["blur", "dark", "noise", "downscale", "hand"])
def test_the_gpu_augmenter_degrades_faces_as_a_webcam_does_and_the_hand_stays_on_the_lower_face(kind):
    import torch
    from models.train_torch import GpuAugmenter
    g = torch.Generator().manual_seed(0)
    faces = (torch.rand(16, 1, 48, 48, generator=g) * 0.5 + 0.25)
    out = GpuAugmenter("light", g, camera=1.0).degrade(faces, kind)
    assert out.shape == faces.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    changed = (out - faces).abs().flatten(1).amax(1)
    assert bool((changed > 1 / 255).all())      # every face degraded
    if kind == "hand":
        assert torch.equal(out[:, :, :20], faces[:, :, :20])
