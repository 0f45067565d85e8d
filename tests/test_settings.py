"""Settings.validate(): every entry point refuses a bad setting at start-up, in one line, before it creates
anything (no database file, no session, no socket), instead of failing later inside a running bot."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.alerts import AlertEngine
from core import settings as settings_module
from core.settings import Settings

PROJECT = Path(__file__).resolve().parent.parent


def refused(settings: Settings) -> str:
    with pytest.raises(ValueError) as caught:
        settings.validate()
    return str(caught.value)


def test_the_defaults_are_valid():
    assert Settings().validate() == Settings()
    assert settings_module.load(env={}) == Settings()


@pytest.mark.parametrize("section, values, named", [
    ("server", {"port": 70000}, "server.port"),
    ("janus", {"mode": "janus"}, "janus.mode"),
    ("janus", {"mode": "external", "url": "http://janus:8088/janus"}, "janus.url"),
    ("janus", {"rtp_ports": "20000"}, "janus.rtp_ports"),
    ("janus", {"rtp_ports": "40000-20000"}, "janus.rtp_ports"),
    ("server", {"port": -1}, "server.port"),
    ("server", {"public_url": "classmood.example.org"}, "server.public_url"),
    ("server", {"ice_servers": "[1"}, "server.ice_servers"),
    ("server", {"ice_servers": '[{"username": "u"}]'}, "server.ice_servers"),
    ("server", {"trusted_proxies": "10.0.0.1, proxy.local"}, "server.trusted_proxies"),
    ("server", {"worker_key": ""}, "server.worker_key"),
    ("server", {"worker_key": "k" * 257}, "server.worker_key"),   # the server refuses it in hello
    ("server", {"hello_timeout_seconds": 0.0}, "server.hello_timeout_seconds"),
    ("server", {"messages_per_second": -1.0}, "server.messages_per_second"),
    ("server", {"max_rooms": 0}, "server.max_rooms"),
    ("server", {"room_idle_seconds": float("nan")}, "server.room_idle_seconds"),
    ("bot", {"sample_hz": 0.0}, "bot.sample_hz"),
    ("bot", {"sample_hz": 4.0}, "server.video_fps"),   # the pages would send 3 frames/s: too few to sample 4 Hz
    ("bot", {"max_batch": 0}, "bot.max_batch"),
    ("bot", {"min_face_score": 1.5}, "bot.min_face_score"),
    ("model", {"detector": "large"}, "model.detector"),
    ("model", {"model": "scripted:"}, "model.model"),
    ("model", {"model": "/no/such/model.tflite"}, "model.model"),
    ("storage", {"url": "classmood.sqlite"}, "storage.url"),
    ("storage", {"retention_days": -1.0}, "storage.retention_days"),
    ("storage", {"flush_seconds": 0.0}, "storage.flush_seconds"),
    ("signals", {"window_seconds": 0.0}, "signals.window_seconds"),
    ("signals", {"confusion_threshold": 0.05}, "signals.confusion_threshold"),
    ("signals", {"boredom_threshold": 1.2}, "signals.boredom_threshold"),
    ("signals", {"hysteresis": 0.6}, "signals.confusion_threshold"),   # now above the 0.5 thresholds
    ("signals", {"hysteresis": -0.1}, "signals.hysteresis"),
    ("signals", {"boredom_w_away": 1.5}, "signals.boredom_w_away"),
    ("signals", {"yaw_away": 0.2}, "signals.yaw_away"),                # below yaw_attentive 0.25
    ("signals", {"min_samples": 0}, "signals.min_samples"),
])
def test_validate_names_the_setting_that_is_out_of_range(section, values, named):
    message = refused(Settings().replace(**{section: values}))
    assert message.startswith(f"setting {named}: ") and "\n" not in message


@pytest.mark.parametrize("section, values", [
    ("server", {"port": 0}),                          # any free port
    ("server", {"heartbeat_seconds": 0.0}),           # no WebSocket pings
    ("server", {"rooms_per_minute_per_address": 0.0}),  # no limit
    ("server", {"public_url": "https://classmood.example.org/"}),
    ("storage", {"retention_days": 0.0}),             # keep until deleted
    ("storage", {"url": "postgresql+psycopg://user:secret@db:5432/classmood"}),
    ("model", {"model": "scripted:confused", "detector": "full"}),
    ("signals", {"confusion_threshold": 1.0, "student_min_seconds": 0.0}),
])
def test_validate_accepts_the_edges_of_each_range(section, values):
    Settings().replace(**{section: values}).validate()


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.10001, 0.5, 1.0, 1.01])
def test_validate_accepts_exactly_the_thresholds_the_alert_engine_accepts(threshold):
    settings = Settings().replace(signals={"confusion_threshold": threshold})
    try:
        AlertEngine(settings.signals, "s1")
        engine_accepts = True
    except ValueError:
        engine_accepts = False
    try:
        settings.validate()
        valid = True
    except ValueError:
        valid = False
    assert valid == engine_accepts


def test_load_validates_environment_and_flags():
    with pytest.raises(ValueError, match=r"^setting signals.confusion_threshold: must be in \(0.1, 1\]"):
        settings_module.load(env={"CLASSMOOD_SIGNALS_CONFUSION_THRESHOLD": "0.05"})


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """The command as an operator runs it, from an empty folder: the default storage.url (a relative
    sqlite:///classmood.sqlite) would create its database file right there."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMOOD_")}
    env["PYTHONPATH"] = str(PROJECT)
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("command, named", [
    # the case that used to pass start-up and then fail in the bot's welcome, for ever, a session per try
    (["bot", "run", "--signals-confusion-threshold", "0.05"], "signals.confusion_threshold"),
    (["bot", "serve", "--server-port", "70000"], "server.port"),
    (["bot", "worker", "--bot-sample-hz", "0"], "bot.sample_hz"),
    (["bot", "join", "--room", "r1", "--token", "t" * 16, "--storage-url", "classmood.db"], "storage.url"),
    (["signaling", "--server-ice-servers", "stun:stun.example.org"], "server.ice_servers"),
    (["storage.export", "--list", "--storage-flush-seconds", "-1"], "storage.flush_seconds"),
])
def test_every_entry_point_refuses_a_bad_setting_in_one_line_before_creating_anything(tmp_path, command, named):
    result = run_cli(tmp_path, *command)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"error: setting {named}: ")
    assert list(tmp_path.iterdir()) == []      # no database file (nor its -wal/-shm)


def test_the_bot_refuses_a_missing_model_before_creating_its_database(tmp_path):
    result = run_cli(tmp_path, "bot", "run", "--model-model", "no-such-model")
    assert result.returncode == 2 and result.stderr.startswith("error: expression model 'no-such-model' not found")
    assert len(result.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_the_load_harness_checks_the_bot_settings_before_starting_anything(tmp_path):
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"")        # only its existence is checked before the settings
    result = run_cli(tmp_path, "bot.simulate", "--video", str(video), "--bot-arg=--signals-confusion-threshold=0.05")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: setting signals.confusion_threshold: ")
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
