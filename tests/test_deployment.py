"""The deployment as written in docker-compose.yml, checked without a Docker engine: the file is
valid and complete, and the very commands its services run work as plain processes on loopback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bot.simulate import free_port

PROJECT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((PROJECT / "docker-compose.yml").read_text())


def test_compose_file_has_server_bot_and_turn_with_a_named_volume():
    spec = compose()
    assert set(spec["services"]) == {"server", "bot", "turn"}
    assert "classmood-data" in spec["volumes"]
    for name in ("server", "bot"):
        service = spec["services"][name]
        assert any(v.startswith("classmood-data:") for v in service["volumes"])
        assert (PROJECT / service["build"]["dockerfile"]).exists()
        assert service["environment"]["CLASSMOOD_STORAGE_URL"].startswith("sqlite:////data/")
    ice = spec["services"]["server"]["environment"]["CLASSMOOD_SERVER_ICE_SERVERS"]
    assert "turn:" in ice and "stun:" in ice
    assert any(arg.startswith("--user=classmood:") for arg in spec["services"]["turn"]["command"])


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                    capture_output=True).returncode != 0, reason="docker compose is not available here")
def test_docker_compose_accepts_the_file():
    env = dict(os.environ, WORKER_KEY="k" * 32, TURN_PASSWORD="p" * 16)
    result = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_compose_commands_run_as_plain_processes(tmp_path):
    spec = compose()
    port = free_port()
    env = dict(os.environ, CLASSMOOD_SERVER_PORT=str(port), CLASSMOOD_SERVER_HOST="127.0.0.1",
               CLASSMOOD_SERVER_WORKER_KEY="compose-test-key", CLASSMOOD_STORAGE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}")
    server_cmd = [sys.executable if c == "python" else c for c in spec["services"]["server"]["command"]]
    bot_cmd = [sys.executable if c == "python" else c for c in spec["services"]["bot"]["command"]]
    bot_cmd[bot_cmd.index("http://server:8765")] = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(server_cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bot = None
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        bot = subprocess.Popen(bot_cmd, cwd=PROJECT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(150):
            health = json.load(urllib.request.urlopen(base + "/healthz", timeout=1))
            if health["workers"] == 1:
                break
            time.sleep(0.2)
        assert health["workers"] == 1, "the bot worker did not connect to the server"
        room = json.load(urllib.request.urlopen(urllib.request.Request(base + "/api/rooms", data=b"{}", method="POST",
                                                                       headers={"Content-Type": "application/json"})))
        invite = urllib.request.Request(f"{base}/api/rooms/{room['room']}/invite", data=b"", method="POST",
                                        headers={"Authorization": f"Bearer {room['teacher_token']}"})
        assert json.load(urllib.request.urlopen(invite))["ok"] is True
        info = urllib.request.Request(f"{base}/api/rooms/{room['room']}", headers={"Authorization": f"Bearer {room['teacher_token']}"})
        for _ in range(100):
            if json.load(urllib.request.urlopen(info))["bot"]:
                break
            time.sleep(0.2)
        assert json.load(urllib.request.urlopen(info))["bot"], "the invited bot did not join the room"
    finally:
        for process in (bot, server):
            if process is not None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    assert server.returncode == 0 and bot.returncode == 0
