"""Issue 23, the adversarial probe's findings, each as the behaviour that must hold now: erased data is gone
from every database file, no public shared secret seats a bot, every door has a limit, control stays in its
room, TURN credentials are per connection, and the headers give nothing away.

Real components throughout: the real server on a loopback port, real sockets, a real SQLite file.
"""
from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.simulate import free_port
from core.records import AlertRecord, SampleRecord
from core.settings import Settings
from signaling.guard import GUARD_KEY, ConnectionGuard
from signaling.server import ServerRunner, create_app
from storage import Repository


class Served:
    """The real server with the real database on a loopback port."""

    def __init__(self, settings: Settings, repository: Repository, runner: ServerRunner, http: aiohttp.ClientSession):
        self.settings, self.repository, self.runner, self.http = settings, repository, runner, http
        self.url = f"http://127.0.0.1:{settings.server.port}"

    async def room(self, title: str = "class") -> dict[str, Any]:
        async with self.http.post(self.url + "/api/rooms", json={"title": title}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    def auth(self, room: dict[str, Any]) -> dict[str, str]:
        return {"Authorization": f"Bearer {room['teacher_token']}"}

    async def hello(self, payload: dict[str, Any], path: str = "/ws") -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        ws = await self.http.ws_connect(self.url.replace("http", "ws", 1) + path)
        await ws.send_json({"v": 1, "type": "hello", **payload})
        return ws, await receive(ws)

    async def student(self, room: dict[str, Any], name: str) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        return await self.hello({"role": "student", "room": room["room"], "key": room["student_url"].split("k=")[1],
                                 "name": name})

    async def teacher(self, room: dict[str, Any]) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        return await self.hello({"role": "teacher", "room": room["room"], "token": room["teacher_token"]})


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5.0) -> dict:
    msg = await ws.receive(timeout)
    if msg.type == aiohttp.WSMsgType.TEXT:
        return msg.json()
    return {"type": "closed", "code": ws.close_code}


async def serve(tmp_path: Path, **server: Any) -> Served:
    port = free_port()
    settings = Settings().replace(server={"port": port, **server},
                                  storage={"url": f"sqlite:///{tmp_path / 'classmood.sqlite'}", "flush_seconds": 0.05})
    repository = Repository.from_settings(settings.storage)
    runner = ServerRunner(create_app(settings, store=repository))
    await runner.setup()
    from aiohttp import web
    await web.TCPSite(runner, "127.0.0.1", port).start()
    # limit=0: a flood holds more sockets than the default pool of 100 (it would wait for itself)
    return Served(settings, repository, runner, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))


@pytest.fixture
async def served(tmp_path):
    started: list[Served] = []

    async def make(**server: Any) -> Served:
        started.append(await serve(tmp_path, **server))
        return started[-1]
    yield make
    for s in started:
        await s.http.close()
        await s.runner.cleanup()
        s.repository.close()


def database_bytes(db: Path) -> dict[str, bytes]:
    """The main file, the -wal and the -shm, as they are on disk right now."""
    return {path.name: path.read_bytes() for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if path.exists()}


# ---- 1. erased means erased -----------------------------------------------------------------------------
async def test_a_deleted_students_name_is_in_no_database_file_while_the_server_keeps_writing(served, tmp_path):
    server = await served()
    repo = server.repository
    room = await server.room()
    erased, kept = repo.start_session(room["room"]), repo.start_session(room["room"])
    name = "Xanthippe Erasedottir"
    repo.add_participant(erased, "p-erased", name)
    repo.add_participant(kept, "p-kept", "Kept Student")
    t0 = time.time()
    repo.add_samples(SampleRecord(erased, "p-erased", t0 + i, True, (0.0,) * 6 + (1.0,), 0.1, 0.2, 0.9, 0.01)
                     for i in range(200))
    repo.add_alert(AlertRecord(uuid.uuid4().hex[:12], erased, t0, "student", "confusion",
                               f"{name} seems confused", 0.8, "p-erased", name, False))
    assert repo.flush()
    db = tmp_path / "classmood.sqlite"
    assert any(name.encode() in data for data in database_bytes(db).values())   # it was written somewhere

    # Another class keeps being recorded throughout: the erase must not wait for a quiet moment.
    stop = threading.Event()

    def record_the_other_class() -> None:
        while not stop.is_set():
            repo.add_samples([SampleRecord(kept, "p-kept", time.time(), True, (0.0,) * 6 + (1.0,),
                                           0.1, 0.1, 0.9, 0.01)])
            time.sleep(0.01)
    writer = threading.Thread(target=record_the_other_class)
    writer.start()
    try:
        await asyncio.sleep(0.3)
        async with server.http.delete(f"{server.url}/api/sessions/{erased}", headers=server.auth(room)) as r:
            assert r.status == 200, await r.text()
        leftovers = {file: data.count(name.encode()) for file, data in database_bytes(db).items()}
        assert not any(leftovers.values()), leftovers
        await asyncio.sleep(0.3)   # the other class's rows kept landing after the erase
    finally:
        stop.set()
        writer.join()
    assert repo.flush()
    assert not any(name.encode() in data for data in database_bytes(db).values())
    assert [s["samples"] > 0 for s in repo.list_sessions(room["room"])] == [True]


async def test_the_retention_sweep_also_leaves_no_copy_in_the_wal(tmp_path):
    db = tmp_path / "classmood.sqlite"
    with Repository(f"sqlite:///{db}", flush_seconds=0.05) as repo:
        old = repo.start_session("room-a")
        name = "Oldname Retentionsweep"
        repo.add_participant(old, "p-old", name)
        repo.end_session(old)
        assert repo.flush()
        assert repo.delete_sessions_before(time.time() + 1) == [old]
        assert not any(name.encode() in data for data in database_bytes(db).values())


# ---- 2. no public shared secret ---------------------------------------------------------------------------
PROJECT = Path(__file__).resolve().parent.parent
DEV_KEY = Settings().server.worker_key


def test_the_development_worker_key_is_refused_off_loopback_in_one_line():
    with pytest.raises(ValueError, match="server.worker_key: is the public development key"):
        Settings().replace(server={"host": "0.0.0.0"}).validate()
    Settings().replace(server={"host": "0.0.0.0", "worker_key": "a-real-secret-key"}).validate()
    Settings().replace(server={"host": "::1"}).validate()          # loopback keeps the easy default
    done = subprocess.run([sys.executable, "-m", "bot", "serve", "--server-host", "0.0.0.0"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if not k.startswith("CLASSMOOD_")})
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "server.worker_key" in done.stderr


def test_bot_run_without_a_key_makes_one_up_per_process():
    from bot.__main__ import _parser, ensure_worker_key
    keys = set()
    for _ in range(2):
        args = _parser().parse_args(["run"])
        ensure_worker_key(args, {})
        keys.add(args.cm__server__worker_key)
    assert len(keys) == 2 and DEV_KEY not in keys and all(len(k) >= 32 for k in keys)
    given = _parser().parse_args(["run", "--server-worker-key", "operator-key-123"])
    ensure_worker_key(given, {})
    assert given.cm__server__worker_key == "operator-key-123"
    from_env = _parser().parse_args(["run"])
    ensure_worker_key(from_env, {"CLASSMOOD_SERVER_WORKER_KEY": "env-key-123456"})
    assert from_env.cm__server__worker_key is None          # settings read it from the environment


def test_run_sh_keeps_a_random_worker_key_in_a_private_file_beside_the_database(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASSMOOD_")}
    env["CLASSMOOD_STORAGE_URL"] = f"sqlite:///{tmp_path / 'data' / 'classmood.sqlite'}"
    first = subprocess.run([str(PROJECT / "scripts" / "worker-key.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    again = subprocess.run([str(PROJECT / "scripts" / "worker-key.sh")], cwd=tmp_path, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    key_file = tmp_path / "data" / ".classmood-worker-key"
    assert first == again == key_file.read_text() and len(first) >= 40 and first != DEV_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    given = subprocess.run([str(PROJECT / "scripts" / "worker-key.sh")], cwd=tmp_path,
                           env={**env, "CLASSMOOD_SERVER_WORKER_KEY": "operator-chosen-key"},
                           capture_output=True, text=True, check=True).stdout.strip()
    assert given == "operator-chosen-key"
    run_sh = (PROJECT / "scripts" / "run.sh").read_text()
    assert "scripts/worker-key.sh" in run_sh and "exec .venv/bin/python -m bot run" in run_sh


async def test_the_dev_key_and_a_teacher_token_alone_never_seat_a_bot_or_a_worker(served):
    server = await served(worker_key="the-operators-own-secret-key")
    room = await server.room()
    for hello in ({"role": "bot", "room": room["room"], "token": room["teacher_token"]},
                  {"role": "bot", "room": room["room"], "token": room["teacher_token"], "key": DEV_KEY}):
        ws, answer = await server.hello(hello)
        assert answer["type"] == "error" and answer["code"] == "unauthorized"
        assert (await receive(ws))["code"] == 4401
        await ws.close()
    ws, answer = await server.hello({"role": "worker", "key": DEV_KEY}, path="/ws/worker")
    assert answer["code"] == "unauthorized"
    await ws.close()


# ---- 3. every connection has a deadline and every address a cap -----------------------------------------
async def open_raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def cut_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it is still open after `seconds`."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_a_partial_request_head_is_cut_at_the_header_timeout_however_slowly_it_trickles(served):
    server = await served(header_timeout_seconds=1.0)
    reader, writer = await open_raw(server.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        for _ in range(40):
            await asyncio.sleep(0.2)
            writer.write(b"X")
            await writer.drain()
    dripping = asyncio.ensure_future(trickle())
    try:
        assert await cut_within(reader, 10.0) == b""          # cut, no answer: the head never completed
    finally:
        dripping.cancel()
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed_and_a_slow_body_gets_408(served):
    server = await served(idle_timeout_seconds=1.0, body_timeout_seconds=1.0)
    reader, writer = await open_raw(server.url)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await cut_within(reader, 10.0)        # answered, then closed once idle
    assert answer.startswith(b"HTTP/1.1 200")
    writer.close()
    reader, writer = await open_raw(server.url)
    writer.write(b"POST /api/rooms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{")
    assert (await cut_within(reader, 10.0)).startswith(b"HTTP/1.1 408")
    writer.close()


async def test_one_address_may_hold_only_so_many_connections_and_gets_in_again_once_they_go(served):
    server = await served(max_connections_per_address=20, header_timeout_seconds=2.0)
    held = [await open_raw(server.url) for _ in range(20)]
    for _, writer in held:
        writer.write(b"GET / HTTP/1.1\r\n")               # never finished
    extra_reader, extra_writer = await open_raw(server.url)
    assert await cut_within(extra_reader, 5.0) == b""    # the 21st is cut at once
    extra_writer.close()
    for reader, writer in held:                            # the held ones at their header deadline
        assert await cut_within(reader, 10.0) == b""
        writer.close()
    for _ in range(50):                                    # the count goes back down as they close
        if not server.runner.app[GUARD_KEY].open:
            break
        await asyncio.sleep(0.1)
    async with server.http.get(server.url + "/healthz") as r:
        assert r.status == 200


def test_the_connection_cap_counts_a_proxied_connection_under_its_forwarded_client():
    import ipaddress
    guard = ConnectionGuard(10.0, 2, [ipaddress.ip_network("10.0.0.0/8")])
    assert guard._is_proxy("10.1.2.3") and not guard._is_proxy("192.0.2.1")
    from signaling.forwarded import address_block
    assert address_block("2001:db8:1:2::5") == address_block("2001:db8:1:2:ffff::9")   # one /64, one count


# ---- 4. joins have a rate, per address and per room -------------------------------------------------------
async def join_many(server: Served, room: dict[str, Any], n: int, forwarded_for: str | None = None,
                    prefix: str = "s") -> list[tuple[aiohttp.ClientWebSocketResponse, dict]]:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}

    async def one(i: int) -> tuple[aiohttp.ClientWebSocketResponse, dict]:
        ws = await server.http.ws_connect(server.url.replace("http", "ws", 1) + "/ws", headers=headers)
        await ws.send_json({"v": 1, "type": "hello", "role": "student", "room": room["room"],
                            "key": room["student_url"].split("k=")[1], "name": f"{prefix}{i}"})
        return ws, await receive(ws)
    return await asyncio.gather(*(one(i) for i in range(n)))


async def test_a_class_of_50_behind_one_address_all_get_in_at_once(served):
    server = await served()
    room = await server.room()
    started = time.monotonic()
    joined = await join_many(server, room, 50)
    took = time.monotonic() - started
    assert [answer["type"] for _, answer in joined] == ["welcome"] * 50
    assert took < 10.0, took          # generous; measured well under 2 s on loopback
    for ws, _ in joined:
        await ws.close()


async def test_a_join_flood_from_one_address_is_cut_off_and_leaves_seats_for_the_real_class(served):
    server = await served(trusted_proxies="127.0.0.1")
    room = await server.room()
    teacher, _ = await server.teacher(room)
    # 120 at once: below server.max_pending_hellos_per_address (128), which would refuse more with `busy`
    flood = await join_many(server, room, 120, forwarded_for="203.0.113.66", prefix="flood")
    admitted = [ws for ws, answer in flood if answer["type"] == "welcome"]
    refused = [(ws, answer) for ws, answer in flood if answer["type"] != "welcome"]
    cfg = server.settings.server
    assert cfg.join_burst_per_address <= len(admitted) <= cfg.join_burst_per_address + 5
    assert all(answer["code"] == "rate_limited" for _, answer in refused)
    assert {(await receive(ws))["code"] for ws, _ in refused} == {4429}
    # Only the admitted ones are announced to the teacher (a refused join is never seated).
    roster = []
    while True:
        try:
            message = await receive(teacher, timeout=1.0)
        except asyncio.TimeoutError:
            break
        roster.append(message)
    assert len([m for m in roster if m.get("event") == "joined"]) == len(admitted)
    # A real student from the school's own address still gets a seat.
    real = await join_many(server, room, 1, forwarded_for="198.51.100.7", prefix="real")
    assert real[0][1]["type"] == "welcome"
    for ws in [*admitted, real[0][0], teacher]:
        await ws.close()


async def test_many_addresses_together_are_held_to_the_rooms_join_rate(served):
    server = await served(trusted_proxies="127.0.0.1", join_burst_per_room=30, joins_per_second_per_room=1.0)
    room, other = await server.room(), await server.room()
    answers = []
    for i in range(45):
        answers += await join_many(server, room, 1, forwarded_for=f"192.0.2.{i + 1}", prefix=f"a{i}-")
    assert 30 <= sum(a["type"] == "welcome" for _, a in answers) <= 33
    elsewhere = await join_many(server, other, 5, forwarded_for="192.0.2.200")   # another room is unaffected
    assert all(a["type"] == "welcome" for _, a in elsewhere)
    for ws, _ in [*answers, *elsewhere]:
        await ws.close()


# ---- 5. a credential acts on its own room only ------------------------------------------------------------
async def test_every_control_and_api_call_stays_in_the_room_of_the_credential_that_sent_it(served):
    server = await served(worker_key="operator-secret-key-1")
    room_c, room_d = await server.room("C"), await server.room("D")
    repo = server.repository
    session_d = repo.start_session(room_d["room"])
    repo.add_alert(AlertRecord("alert-of-d", session_d, time.time(), "student", "confusion", "x", 0.8, "p1", "Di"))
    repo.end_session(session_d)
    assert repo.flush()
    # The store: C's acknowledgement of D's alert changes nothing; D's own does.
    repo.acknowledge_alert("alert-of-d", room_c["room"])
    assert repo.flush()
    assert repo.session_review(session_d)["alerts"][0]["acknowledged"] is False
    # The relay: controls from C's teacher reach C's bot only, whatever ids they name.
    bots = {}
    for room in (room_c, room_d):
        bots[room["room"]], welcome = await server.hello(
            {"role": "bot", "room": room["room"], "token": room["teacher_token"], "key": "operator-secret-key-1"})
        assert welcome["type"] == "welcome"
    student_d, _ = await server.student(room_d, "Dora")
    teacher_c, _ = await server.teacher(room_c)
    controls = [{"action": "ack", "alert_id": "alert-of-d"}, {"action": "mute", "peer_id": "somepeer1"},
                {"action": "threshold", "kind": "confusion", "value": 0.9}]
    for control in controls:
        await teacher_c.send_json({"v": 1, "type": "control", **control})
    got_c = [m for m in [await receive(bots[room_c["room"]]) for _ in controls]]
    assert [m["action"] for m in got_c] == ["ack", "mute", "threshold"]
    seen_by_d = []
    try:
        while True:
            seen_by_d.append(await receive(bots[room_d["room"]], timeout=0.5))
    except asyncio.TimeoutError:
        pass
    assert not [m for m in seen_by_d if m["type"] == "control"]
    # The HTTP API: C's token neither reads nor deletes D's session, and cannot tell it exists.
    for method, path in (("GET", f"/api/sessions/{session_d}/review"), ("GET", f"/api/sessions/{session_d}/alerts.csv"),
                         ("GET", f"/api/sessions/{session_d}/samples.csv"), ("DELETE", f"/api/sessions/{session_d}")):
        async with server.http.request(method, server.url + path, headers=server.auth(room_c)) as r:
            assert r.status == 404, (method, path)
        async with server.http.request(method, server.url + path.replace(session_d, "nosuchsession"),
                                       headers=server.auth(room_c)) as r:
            assert r.status == 404
    assert repo.session_room(session_d) == room_d["room"]
    repo.acknowledge_alert("alert-of-d", room_d["room"])
    assert repo.flush()
    assert repo.session_review(session_d)["alerts"][0]["acknowledged"] is True
    for ws in [*bots.values(), student_d, teacher_c]:
        await ws.close()


# ---- 6. TURN credentials are minted per connection --------------------------------------------------------
async def test_each_connection_gets_its_own_expiring_turn_credential(served):
    import base64
    import hashlib
    import hmac
    secret = "coturn-static-auth-secret"
    server = await served(turn_urls="turn:turn.example.org:3478?transport=udp, turns:turn.example.org:5349",
                          turn_secret=secret, turn_ttl_seconds=600, worker_key="operator-secret-key-2",
                          ice_servers='[{"urls": "stun:stun.example.org:3478"}]')
    room = await server.room()
    before = time.time()
    (s1, w1), (s2, w2) = await server.student(room, "A"), await server.student(room, "B")
    teacher, wt = await server.teacher(room)
    bot, wb = await server.hello({"role": "bot", "room": room["room"], "token": room["teacher_token"],
                                  "key": "operator-secret-key-2"})
    turns = []
    for welcome in (w1, w2, wt, wb):
        assert welcome["ice_servers"][0] == {"urls": "stun:stun.example.org:3478"}
        turn = welcome["ice_servers"][1]
        assert turn["urls"] == ["turn:turn.example.org:3478?transport=udp", "turns:turn.example.org:5349"]
        expiry, who = turn["username"].split(":", 1)
        assert who == welcome["peer_id"]
        assert before + 600 - 5 <= int(expiry) <= time.time() + 600
        digest = hmac.new(secret.encode(), turn["username"].encode(), hashlib.sha1).digest()
        assert turn["credential"] == base64.b64encode(digest).decode()
        turns.append(turn["username"])
    assert len(set(turns)) == 4
    for ws in (s1, s2, teacher, bot):
        await ws.close()


def test_turn_settings_are_checked():
    with pytest.raises(ValueError, match="server.turn_secret"):
        Settings().replace(server={"turn_urls": "turn:x:3478"}).validate()
    with pytest.raises(ValueError, match="server.turn_urls"):
        Settings().replace(server={"turn_urls": "http://x", "turn_secret": "s"}).validate()


# ---- 7. headers give nothing away --------------------------------------------------------------------------
async def test_sockets_only_to_our_own_origin_and_no_server_version(served):
    server = await served()
    async with server.http.get(server.url + "/join/abc?k=x") as r:
        csp = r.headers["Content-Security-Policy"]
        port = server.settings.server.port
        assert f"connect-src 'self' ws://127.0.0.1:{port};" in csp
        assert " ws:;" not in csp and "wss:" not in csp
        assert r.headers["Server"] == "classmood"
    async with server.http.get(server.url + "/healthz") as r:
        assert "aiohttp" not in r.headers.get("Server", "") and "Python" not in r.headers.get("Server", "")
    from signaling.middleware import own_origin_csp
    assert "connect-src 'self' wss://class.example.org;" in own_origin_csp("https://class.example.org/", "http", "x")
    assert "connect-src 'self';" in own_origin_csp("", "http", "evil;script-src *")
