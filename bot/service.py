"""One bot process: the shared inference thread, the repository, and the rooms it is in.

Frames of every room go into one FrameMailbox so the worker thread batches across the whole
process; results come back to the event loop and are routed to each room's ClassRoom.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
from typing import Any, Callable

import aiohttp
import numpy as np

from bot.analyzer import Analyzer, FrameKey, FrameResult, PendingFrame
from bot.janus_room import JanusRoomFeeds
from bot.mailbox import FrameMailbox
from bot.metrics import round_histogram
from bot.recorder import Recorder
from bot.peer import BotPeer
from bot.room import ClassRoom
from core.faces import Faces
from core.settings import Settings

log = logging.getLogger("classmood.bot")


class BotService:
    def __init__(self, settings: Settings, repository: Recorder,
                 analyse: Callable[[list[np.ndarray]], Faces] | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.mailbox: FrameMailbox[FrameKey, PendingFrame] = FrameMailbox(settings.bot.queue_frames)
        if analyse is None:
            # Imported here, not at the top: `python -m bot serve` imports this module and must not load
            # OpenCV or the TFLite models it never uses.
            from models.runtime.analyse import build_analyse
            analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                                    min_score=settings.bot.min_face_score)
        self.analyzer = Analyzer(analyse, self.mailbox, self._from_worker, max_batch=settings.bot.max_batch)
        self.round_seconds = round_histogram()
        self.analyzer.observe_round = self.round_seconds.observe
        self.rooms: dict[str, ClassRoom] = {}
        self.peers: dict[str, BotPeer] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.analyzer.start()

    async def stop(self) -> None:
        for peer in list(self.peers.values()):
            await peer.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)
        self.analyzer.stop()

    def _from_worker(self, results: list[FrameResult]) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, results)

    def _deliver(self, results: list[FrameResult]) -> None:
        for result in results:
            room_id, _ = result.key
            room = self.rooms.get(room_id)
            if room is not None:
                try:
                    room.on_result(result)
                except Exception:
                    log.exception("room %s: handling a result failed", room_id)

    def _register(self, room_id: str, room: ClassRoom | None, leaving: ClassRoom | None = None) -> None:
        """Route results of room_id to `room`; with room None, stop routing them to `leaving` (only if it
        is still the one registered: a bot replaced in this process must not unregister its successor)."""
        if room is not None:
            self.rooms[room_id] = room
        elif leaving is None or self.rooms.get(room_id) is leaving:
            self.rooms.pop(room_id, None)

    def join(self, server: str, room_id: str, token: str, external: JanusRoomFeeds | None = None) -> BotPeer:
        """Join (or re-join) a room; an existing bot for the room is replaced. `external`: the students
        come from another app's Janus room instead of the classmood room's own."""
        old = self.peers.get(room_id)
        if old is not None and not self.tasks[room_id].done():
            return old
        peer = BotPeer(self.settings, server, room_id, token, self.repository, self.mailbox, self._register,
                       external=external)
        self.peers[room_id] = peer
        task = asyncio.ensure_future(peer.run())
        self.tasks[room_id] = task
        task.add_done_callback(functools.partial(self._joined_done, room_id))
        return peer

    def _joined_done(self, room_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(room_id) is task:
            self.tasks.pop(room_id, None)
            self.peers.pop(room_id, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("room %s: bot stopped with an error", room_id, exc_info=task.exception())

    async def serve_worker(self, server: str, key: str, ready: asyncio.Event | None = None) -> None:
        """Stay connected to the server's /ws/worker and join rooms when a teacher invites the bot."""
        url = server.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws/worker"
        backoff = 0.5
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(url, heartbeat=20) as ws:
                        await ws.send_json({"v": 1, "type": "hello", "role": "worker", "key": key})
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            data = json.loads(msg.data)
                            if data.get("type") == "welcome":
                                backoff = 0.5
                                log.info("bot worker connected to %s", server)
                                if ready is not None:
                                    ready.set()
                            elif data.get("type") == "invite" and data.get("room") and data.get("token"):
                                log.info("invited to room %s", data["room"])
                                self.join(server, str(data["room"]), str(data["token"]))
                            elif data.get("type") == "error":
                                log.error("worker refused by server: %s", data.get("message"))
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    log.warning("bot worker: connection to %s failed (%s); retrying", server, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def stats(self) -> dict[str, Any]:
        return {"rooms": len(self.rooms), "frames_analysed": self.analyzer.frames,
                "inference_rounds": self.analyzer.rounds, "inference_busy_s": round(self.analyzer.busy_seconds, 3),
                "frames_dropped": self.mailbox.dropped, "frames_accepted": self.mailbox.accepted,
                "frame_errors": self.analyzer.errors}
