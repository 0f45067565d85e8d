"""A bounded abuse run on loopback only (issue 23): 300 slow connections and a join flood from one address
while a teacher in another room keeps receiving live state, and a class of 50 from one address gets in.
Every connection goes to 127.0.0.1, the counts are fixed and every task stops by itself within seconds."""
from __future__ import annotations

import asyncio
import time

import aiohttp

from signaling.guard import GUARD_KEY
from tests.spine import VIDEOS, start_class, stop_class

SLOW_CONNECTIONS = 300
FLOOD_JOINS = 100          # below server.max_pending_hellos_per_address (128): the join limit is what acts
WATCH_SECONDS = 8.0


async def test_slow_connections_and_a_join_flood_do_not_starve_another_rooms_live_state(tmp_path):
    live = await start_class(tmp_path, server={"header_timeout_seconds": 3.0}, bot={"state_push_hz": 4.0})
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    slow: list[asyncio.StreamWriter] = []
    flood: list[aiohttp.ClientWebSocketResponse] = []
    try:
        await live.create_room()
        await live.invite_bot()
        await live.add_student("Asha", VIDEOS / "woman2.mp4")
        ws_url = live.server.replace("http", "ws", 1) + "/ws"
        teacher = await http.ws_connect(ws_url)
        await teacher.send_json({"v": 1, "type": "hello", "role": "teacher", "room": live.room["room"],
                                 "token": live.token})
        assert (await teacher.receive_json(timeout=5))["type"] == "welcome"
        async with http.post(live.server + "/api/rooms", json={"title": "target"}) as r:
            target = await r.json()
        target_key = target["student_url"].split("k=")[1]

        async def slowloris() -> None:
            host, port = live.server.removeprefix("http://").split(":")
            for _ in range(SLOW_CONNECTIONS):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
                slow.append(writer)
            for _ in range(int(WATCH_SECONDS)):      # one more header byte a second on each, while open
                await asyncio.sleep(1.0)
                for writer in slow:
                    if not writer.is_closing():
                        writer.write(b"X")

        async def join_flood() -> list[str]:
            async def one(i: int) -> str:
                ws = await http.ws_connect(ws_url)
                flood.append(ws)
                await ws.send_json({"v": 1, "type": "hello", "role": "student", "room": target["room"],
                                    "key": target_key, "name": f"flood{i}"})
                return (await ws.receive_json(timeout=10))["type"]
            return await asyncio.gather(*(one(i) for i in range(FLOOD_JOINS)))

        async def watch() -> list[float]:
            times = []
            deadline = time.monotonic() + WATCH_SECONDS
            while time.monotonic() < deadline:
                message = await teacher.receive_json(timeout=WATCH_SECONDS)
                if message["type"] == "state":
                    times.append(time.monotonic())
            return times

        watching = asyncio.ensure_future(watch())
        attacks = asyncio.gather(slowloris(), join_flood())
        times = await watching
        _, flood_answers = await attacks
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert len(times) >= WATCH_SECONDS * 2 and max(gaps) <= 1.0, gaps
        admitted = flood_answers.count("welcome")
        assert admitted <= live.settings.server.join_burst_per_address + 10, admitted
        # The slow connections were cut at their header deadline, not left open (what is left: the
        # teacher, the student, the bot and the worker, and the flood's admitted sockets).
        guard = live.runner.app[GUARD_KEY]
        for _ in range(100):
            if guard.open.get("127.0.0.1", 0) < admitted + 20:
                break
            await asyncio.sleep(0.1)
        assert guard.open.get("127.0.0.1", 0) < admitted + 20
        # The 50-student class from one school address: tests/test_hardening.py (a fresh address; this one
        # has just spent its budget on the flood, as it should).
    finally:
        for writer in slow:
            writer.close()
        for ws in flood:
            await ws.close()
        await http.close()
        await stop_class(live)
