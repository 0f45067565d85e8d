"""GPU training path: the data pack carries Training/PublicTest only, weights survive the trip between Keras
and PyTorch layouts, and (where PyTorch is installed) a PyTorch run imports back into a Keras run that
models.export turns into the bot's TFLite file."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from models.data import load_dataset
from models.torch_port import keras_to_torch, read_pack, torch_to_keras, write_pack
from tests.test_models_train import PROJECT, run_module, write_fer_csv

HAS_TORCH = importlib.util.find_spec("torch") is not None


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


def test_the_gpu_trainer_says_plainly_when_pytorch_is_missing(tmp_path):
    if HAS_TORCH:
        pytest.skip("PyTorch is installed here; the message is for machines without it")
    result = run_module("models.train_torch", "--pack", str(tmp_path / "none.xz"), "--out", str(tmp_path / "o.npz"))
    assert result.returncode == 2 and "PyTorch is not installed" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed (CI installs TensorFlow only); "
                    "the GPU trainer is run where PyTorch is, see models/MODEL_CARD.md")
def test_a_pytorch_run_imports_into_keras_and_exports_a_working_tflite_model(tmp_path):
    data_dir = tmp_path / "data"
    write_fer_csv(data_dir, n_train=160, n_public=48)
    pack = tmp_path / "pack.xz"
    assert run_module("models.torch_port", "pack", "--data", str(data_dir), "--out", str(pack)).returncode == 0
    trained = subprocess.run([sys.executable, "-m", "models.train_torch", "--pack", str(pack), "--labels", "ferplus",
                              "--width", "tiny", "--device", "cpu", "--epochs", "6", "--batch", "32", "--lr", "0.05",
                              "--out", str(tmp_path / "w.npz")], cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    imported = run_module("models.torch_port", "import", "--weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "run"))
    assert imported.returncode == 0, imported.stderr[-2000:]
    target = tmp_path / "tiny.tflite"
    export = run_module("models.export", "--run", str(tmp_path / "run"), "--name", str(target), "--data", str(data_dir))
    assert export.returncode == 0, export.stderr[-2000:]
    card = json.loads(target.with_suffix(".json").read_text())
    assert card["epochs"] == 6 and card["publictest_accuracy"]["keras"] > 0.3


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
