"""One bot process: the shared inference thread, the repository, and the rooms it is in.

Frames of every room go into one FrameMailbox so the worker thread batches across the whole
process; results come back to the event loop and are routed to each room's ClassRoom.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import secrets
import time
from typing import Any, Callable

import aiohttp
import numpy as np

from bot import decoding
from bot.analyzer import Analyzer, FrameKey, FrameResult, PendingFrame
from bot.janus_room import JanusRoomFeeds
from bot.mailbox import FrameMailbox
from bot.metrics import round_histogram
from bot.recorder import LeaseStore, Recorder
from bot.peer import BotPeer
from bot.room import ClassRoom
from core.errors import describe
from core.faces import Faces
from core.protocol import websocket_url
from core.settings import Settings

log = logging.getLogger("classmood.bot")


class BotService:
    def __init__(self, settings: Settings, repository: Recorder,
                 analyse: Callable[[list[np.ndarray], list[FrameKey]], Faces] | None = None) -> None:
        self.settings = settings
        self.repository = repository
        self.mailbox: FrameMailbox[FrameKey, PendingFrame] = FrameMailbox(settings.bot.queue_frames)
        if analyse is None and settings.bot.inference_process:
            from bot.inference_process import InferencePool, inference_process_count
            analyse = InferencePool(settings, inference_process_count(settings.bot.inference_processes))
        elif analyse is None:
            # Imported here, not at the top: `python -m bot serve` imports this module and must not load
            # OpenCV or the TFLite models it never uses.
            from models.runtime.analyse import build_analyse
            analyse = build_analyse(settings.model, threads=settings.bot.inference_threads,
                                    min_score=settings.bot.min_face_score,
                                    redetect_every=settings.bot.redetect_every,
                                    alternate_mirror=settings.bot.alternate_mirror)
        self.analyzer = Analyzer(analyse, self.mailbox, self._from_worker, max_batch=settings.bot.max_batch)
        self.round_seconds = round_histogram()
        self.analyzer.observe_round = self.round_seconds.observe
        self.rooms: dict[str, ClassRoom] = {}
        self.peers: dict[str, BotPeer] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.connections_lost_before = 0     # students' media connections lost in rooms no longer served
        self._loop: asyncio.AbstractEventLoop | None = None
        # This process's id in the database's room leases (sent in the worker hello; the server invites
        # under it). Rooms it was invited to are `leased`: it renews them while it serves them.
        self.worker_id = secrets.token_urlsafe(9)
        self.leases: LeaseStore | None = repository if isinstance(repository, LeaseStore) else None
        self.leased: set[str] = set()
        self.handover = False             # stopping so that other workers continue the classes
        self.leases_lost = 0
        self.served: set[str] = set()     # every room this process was in (bot.simulate's per-worker table)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        decoding.install()
        self.analyzer.start()

    async def stop(self, handover: bool = False) -> None:
        """Leave every room. handover=True (a bot worker shutting down, not the class ending): the sessions
        stay open and the leases end now, so other workers continue the classes within a second or two
        instead of after a whole lease; otherwise the sessions end and the rooms are released."""
        self.handover = handover
        for room_id, peer in list(self.peers.items()):
            if handover and room_id in self.leased:
                peer.handover = True
            await peer.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=10)
        if handover and self.leases is not None:
            try:
                await asyncio.to_thread(self.leases.expire_leases, self.worker_id)
            except Exception as exc:     # the leases then run out by themselves
                log.warning("could not hand the rooms over (%s); they move when their leases run out", describe(exc))
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
        self.served.add(room_id)
        task = asyncio.ensure_future(self._serve_room(peer))
        self.tasks[room_id] = task
        task.add_done_callback(functools.partial(self._joined_done, room_id))
        return peer

    async def _serve_room(self, peer: BotPeer) -> None:
        await peer.run()
        room_id = peer.room_id
        if room_id in self.leased and self.peers.get(room_id) in (peer, None):
            self.leased.discard(room_id)
            if not peer.replaced and not peer.handover and self.leases is not None:
                # The class is over (ended, idle, refused): nobody is to be sent back to the room.
                try:
                    await asyncio.to_thread(self.leases.release_room, room_id, self.worker_id)
                except Exception as exc:
                    log.warning("room %s: could not release its lease (%s)", room_id, describe(exc))

    async def keep_leases(self) -> None:
        """Renew the lease of every room this worker was invited to, every fifth of the lease, with each
        room's session and analysed students (the server balances rooms by them). A room whose lease
        another worker holds now (this one was too slow, or cut off from the database) is left at once."""
        lease = self.settings.server.worker_lease_seconds
        while self.leases is not None:
            await asyncio.sleep(lease / 5)
            rooms = {room_id: (peer.room.session_id if peer.room else None,
                               sum(1 for s in peer.room.students.values() if s.analysis) if peer.room else 0)
                     for room_id, peer in list(self.peers.items()) if room_id in self.leased}
            if not rooms:
                continue
            try:
                lost = await asyncio.to_thread(self.leases.renew_leases, self.worker_id, rooms, time.time() + lease)
            except Exception as exc:      # the database is away: the leases may run out and the rooms move
                log.warning("could not renew the leases of %d room(s) (%s)", len(rooms), describe(exc))
                continue
            for room_id in lost:
                self.leased.discard(room_id)
                self.leases_lost += 1
                peer = self.peers.get(room_id)
                if peer is not None:
                    log.warning("room %s: another worker holds it now; leaving", room_id)
                    peer.replaced = True       # the session goes on there: not ours to end
                    await peer.stop()

    def _joined_done(self, room_id: str, task: asyncio.Task) -> None:
        if self.tasks.get(room_id) is task:
            self.tasks.pop(room_id, None)
            peer = self.peers.pop(room_id, None)
            self.connections_lost_before += peer.connections_lost if peer is not None else 0
        if not task.cancelled() and task.exception() is not None:
            log.error("room %s: bot stopped with an error", room_id, exc_info=task.exception())

    async def serve_worker(self, server: str, key: str, ready: asyncio.Event | None = None) -> None:
        """Stay connected to the server's /ws/worker and join rooms when a teacher invites the bot."""
        url = websocket_url(server, "/ws/worker")
        leases = asyncio.ensure_future(self.keep_leases())
        try:
            await self._serve_worker(server, url, key, ready)
        finally:
            leases.cancel()

    async def _serve_worker(self, server: str, url: str, key: str, ready: asyncio.Event | None) -> None:
        backoff = 0.5
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.ws_connect(url, heartbeat=20) as ws:
                        await ws.send_json({"v": 1, "type": "hello", "role": "worker", "key": key,
                                            "worker": self.worker_id})
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                break
                            data = json.loads(msg.data)
                            if data.get("type") == "welcome":
                                backoff = 0.5
                                log.info("bot worker %s connected to %s", self.worker_id, server)
                                if ready is not None:
                                    ready.set()
                            elif data.get("type") == "invite" and data.get("room") and data.get("token"):
                                log.info("invited to room %s", data["room"])
                                self.join(server, str(data["room"]), str(data["token"]))
                                self.leased.add(str(data["room"]))
                            elif data.get("type") == "error":
                                log.error("worker refused by server: %s", data.get("message"))
                except (aiohttp.ClientError, OSError, ValueError) as exc:
                    log.warning("bot worker: connection to %s failed (%s); retrying", server, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def stats(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "rooms": len(self.rooms), "rooms_served": sorted(self.served),
                "leases_lost": self.leases_lost, "frames_analysed": self.analyzer.frames,
                "inference_rounds": self.analyzer.rounds, "inference_busy_s": round(self.analyzer.busy_seconds, 3),
                "inference_convert_s": round(self.analyzer.convert_seconds, 3),
                "inference_child_cpu_s": round(float(getattr(self.analyzer.analyse, "child_cpu_seconds", 0.0)), 3),
                "inference_child_wall_s": round(float(getattr(self.analyzer.analyse, "child_wall_seconds", 0.0)), 3),
                "inference_processes": len(getattr(self.analyzer.analyse, "children", ())),
                "frames_dropped": self.mailbox.dropped, "frames_accepted": self.mailbox.accepted,
                "frame_errors": self.analyzer.errors,
                **{f"decoder_{name}": value for name, value in decoding.SHARED.stats().items()},
                "connections_lost": self.connections_lost_before + sum(p.connections_lost for p in self.peers.values())}
