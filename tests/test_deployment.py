"""The deployment as written in docker-compose.yml, checked without a Docker engine: the file is
valid and complete, and the very commands its services run work as plain processes on loopback."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from bot.simulate import free_port
from tests.spine import require_janus

PROJECT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((PROJECT / "docker-compose.yml").read_text())


def test_compose_file_has_server_bot_janus_turn_and_postgresql_on_a_named_volume():
    spec = compose()
    assert set(spec["services"]) == {"server", "bot", "turn", "janus", "postgres"}
    postgres = spec["services"]["postgres"]
    assert postgres["image"].startswith("postgres:") and "ports" not in postgres   # never published
    assert any(v.startswith("classmood-db:") for v in postgres["volumes"]) and "classmood-db" in spec["volumes"]
    assert "${POSTGRES_PASSWORD:?" in postgres["environment"]["POSTGRES_PASSWORD"]
    for name in ("server", "bot"):
        service = spec["services"][name]
        assert (PROJECT / service["build"]["dockerfile"]).exists()
        # Both on the one PostgreSQL, through the driver their images install (tests/test_images.py).
        assert service["environment"]["CLASSMOOD_STORAGE_URL"].startswith("postgresql+psycopg://classmood:")
        assert "@postgres:5432/" in service["environment"]["CLASSMOOD_STORAGE_URL"]
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
    server_env = spec["services"]["server"]["environment"]
    assert "stun:" in server_env["CLASSMOOD_SERVER_ICE_SERVERS"]
    # TURN: no static password handed to everyone; the server mints expiring credentials (coturn REST API)
    assert "credential" not in server_env["CLASSMOOD_SERVER_ICE_SERVERS"]
    assert server_env["CLASSMOOD_SERVER_TURN_URLS"].startswith("turn:") and "TURN_SECRET" in server_env[
        "CLASSMOOD_SERVER_TURN_SECRET"]
    turn = spec["services"]["turn"]["command"]
    assert "--use-auth-secret" in turn and any(a.startswith("--static-auth-secret=${TURN_SECRET") for a in turn)
    assert not any(a.startswith("--user=") or a == "--lt-cred-mech" for a in turn)
    # The server uses the compose file's Janus, whose API is reachable only on the compose network.
    server_env, janus = spec["services"]["server"]["environment"], spec["services"]["janus"]
    assert server_env["CLASSMOOD_JANUS_MODE"] == "external" and server_env["CLASSMOOD_JANUS_URL"] == "ws://janus:8188/"
    assert "8188" not in " ".join(janus.get("ports", [])) and (PROJECT / janus["build"]["dockerfile"]).exists()


@pytest.mark.skipif(shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                    capture_output=True).returncode != 0, reason="docker compose is not available here")
def test_docker_compose_accepts_the_file():
    env = dict(os.environ, WORKER_KEY="k" * 32, TURN_SECRET="p" * 16, JANUS_API_SECRET="j" * 16,
               JANUS_ADMIN_KEY="a" * 16, PUBLIC_IP="203.0.113.1", POSTGRES_PASSWORD="d" * 16)
    result = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def janus_command(spec: dict, janus_port: int) -> list[str]:
    """The janus service's command with this checkout's script, loopback addresses and a free port."""
    cmd = list(spec["services"]["janus"]["command"])
    cmd[0] = sys.executable
    cmd[cmd.index("/opt/classmood/janus_process.py")] = str(PROJECT / "signaling" / "janus_process.py")
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    cmd[cmd.index("--port") + 1] = str(janus_port)
    cmd[cmd.index("--nat-1-1") + 1] = ""
    return cmd


def test_the_compose_commands_run_as_plain_processes(tmp_path):
    require_janus()
    spec = compose()
    port, janus_port = free_port(), free_port()
    secrets = {"JANUS_API_SECRET": "compose-test-janus-secret", "JANUS_ADMIN_KEY": "compose-test-janus-admin"}
    janus = subprocess.Popen(janus_command(spec, janus_port), cwd=tmp_path, env=dict(os.environ, **secrets),
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    server_env = spec["services"]["server"]["environment"]
    env = dict(os.environ, CLASSMOOD_SERVER_PORT=str(port), CLASSMOOD_SERVER_HOST="127.0.0.1",
               CLASSMOOD_SERVER_WORKER_KEY="compose-test-key", CLASSMOOD_STORAGE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}",
               CLASSMOOD_JANUS_MODE=server_env["CLASSMOOD_JANUS_MODE"],
               CLASSMOOD_JANUS_URL=f"ws://127.0.0.1:{janus_port}/", CLASSMOOD_JANUS_API_SECRET=secrets["JANUS_API_SECRET"],
               CLASSMOOD_JANUS_ADMIN_KEY=secrets["JANUS_ADMIN_KEY"])
    for _ in range(100):    # the janus service is up before the server starts (depends_on)
        try:
            socket.create_connection(("127.0.0.1", janus_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
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
        assert json.load(urllib.request.urlopen(base + "/healthz"))["media"] == {"mode": "sfu", "sfu_connected": True}
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
        for process in (bot, server, janus):
            if process is not None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
    assert server.returncode == 0 and bot.returncode == 0
