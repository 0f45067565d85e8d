"""The bot as a room participant: signaling client + one aiortc peer connection per student.

It joins exactly like a browser does (hello on /ws), answers each student's offer, samples the
incoming video at `bot.sample_hz` into the shared FrameMailbox, and relays live state and alerts
from its ClassRoom to the teacher through the server. A dropped socket is re-joined with backoff and
the same session continues.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Coroutine
from urllib.parse import urlsplit

import aiohttp
from aiortc import MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from bot.analyzer import FrameKey, PendingFrame
from bot.ice_filter import decline_extensions, filter_candidates, is_loopback_host
from bot.ingest import IngestFrames
from bot.janus_room import JanusRoomFeeds
from bot.mailbox import FrameMailbox
from bot.room import ClassRoom
from core.errors import describe
from core.protocol import VERSION, CloseCode, ErrorCode, retry_is_pointless, websocket_url
from core.settings import Settings

log = logging.getLogger("classmood.bot.peer")


def ws_url(server: str) -> str:
    """The signaling socket of the server at `server` (http(s)://... -> ws(s)://.../ws)."""
    return websocket_url(server, "/ws")


def rtc_configuration(ice_servers: list[dict[str, Any]]) -> RTCConfiguration:
    servers = [RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
               for s in ice_servers]
    return RTCConfiguration(iceServers=servers)


def _past_epoch(value: Any) -> float | None:
    """An end time sent by the server, if it is a plausible one (a finite epoch not in the future)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if 0 < value <= time.time() + 1.0 else None


class BotPeer:
    """One bot in one room. `run()` returns when stopped or when the room refuses the bot."""

    def __init__(self, settings: Settings, server: str, room_id: str, token: str, repository: Any,
                 mailbox: FrameMailbox[FrameKey, PendingFrame], register: Callable[..., None],
                 external: JanusRoomFeeds | None = None) -> None:
        self.settings = settings
        self.server = server
        self.room_id = room_id
        self.token = token
        self.repository = repository
        self.mailbox = mailbox
        self.register = register          # tells the process which ClassRoom owns results of this room
        self.peer_id: str | None = None
        self.room: ClassRoom | None = None
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.consumers: dict[str, asyncio.Task] = {}
        # Media connections that failed or were closed by the other side (ICE consent lost, the SFU hung up)
        # while the student was still wanted: that student is not analysed until they reconnect.
        self.connections_lost = 0
        self._loss_checks: set[str] = set()
        self._losses: dict[str, int] = {}   # per student: lost connections (how long to wait before asking again)
        self.meeting = False                # the room's video comes through the SFU (welcome.media.mode == "sfu")
        self._ws: aiohttp.ClientWebSocketResponse[bool] | None = None
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.ice_servers: list[dict[str, Any]] = []
        self.joined = asyncio.Event()
        self.replaced = False             # another bot took over the room: its session is not ours to end
        self.handover = False             # this worker shuts down and another continues the class: same
        self.ended_at: float | None = None  # the class's true end, when the server told us (End class, idle)
        # Students from another app's Janus room (python -m bot join --janus): the classmood room's own
        # roster and offers are then not the bot's students.
        self.external = external
        self.ingest = IngestFrames(self)  # students of a Zoom/Meet/Teams class, via a meeting-bot service
        # Students' loopback candidates are only reachable (and only legitimate) on a development machine.
        host = urlsplit(server if "://" in server else f"http://{server}").hostname or ""
        self._server_is_loopback = is_loopback_host(host)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        backoff = 0.5
        async with aiohttp.ClientSession() as http:
            while not self._stopping.is_set():
                try:
                    fatal = await self._session(http)
                    if fatal:
                        break      # not return: _finish() below ends the session and frees the room
                    backoff = 0.5
                except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                    log.warning("room %s: signaling connection failed (%s); retrying in %.1f s",
                                self.room_id, exc, backoff)
                except Exception as exc:
                    # E.g. the database could not start the session (disk full, locked): the bot must not
                    # leave the class for good; it rejoins with backoff and the session resumes.
                    log.error("room %s: joining failed (%s); retrying in %.1f s", self.room_id, describe(exc), backoff)
                finally:
                    await self._close_peers()
                if self._stopping.is_set():
                    break
                try:
                    await asyncio.wait_for(self._stopping.wait(), backoff)
                except asyncio.TimeoutError:
                    pass
                backoff = min(backoff * 2, 10.0)
        await self._finish()
        if self.external is not None:
            await self.external.close()

    async def stop(self) -> None:
        self._stopping.set()
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()

    async def _finish(self) -> None:
        if self.room is not None:
            self.room.close()
            self.register(self.room_id, None, self.room)
            if not (self.replaced or self.handover):      # a replacing bot carries the session on
                await asyncio.to_thread(self.repository.end_session, self.room.session_id, self.ended_at)
            self.room = None

    async def _session(self, http: aiohttp.ClientSession) -> bool:
        """One signaling connection; returns True when the server refused us for good."""
        # Binary frames from a meeting-bot service (bot/ingest.py) may be up to the server's ingest.max_message_bytes.
        max_size = max(1 << 20, self.settings.ingest.max_message_bytes + 1024)
        async with http.ws_connect(ws_url(self.server), heartbeat=20, max_msg_size=max_size) as ws:
            self._ws = ws
            await ws.send_json({"v": VERSION, "type": "hello", "role": "bot", "room": self.room_id, "token": self.token,
                                "key": self.settings.server.worker_key})
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.ingest.on_binary(msg.data)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                try:
                    data = json.loads(msg.data)
                except ValueError:
                    log.warning("room %s: non-JSON message from server ignored", self.room_id)
                    continue
                if not isinstance(data, dict):
                    continue
                kind = data.get("type")
                if kind == "class_ended":
                    # The teacher pressed End class: end the session at the server's time and leave for good.
                    self.ended_at = _past_epoch(data.get("ended_at"))
                    log.info("room %s: the teacher ended the class", self.room_id)
                    return True
                if kind == "error":
                    level = logging.INFO if data.get("code") == ErrorCode.IDLE else logging.ERROR   # idle: class over
                    log.log(level, "room %s: server says %s: %s", self.room_id, data.get("code"), data.get("message"))
                    if data.get("code") == ErrorCode.IDLE:
                        self.ended_at = _past_epoch(data.get("ended_at"))   # when the last person left
                    if data.get("code") == ErrorCode.REPLACED:
                        self.replaced = True
                        return True
                    if data.get("code") in (ErrorCode.UNAUTHORIZED, ErrorCode.UNKNOWN_ROOM):
                        return True
                    continue
                await self._handle(kind, data)
            self._ws = None
        if ws.close_code == CloseCode.REPLACED:
            self.replaced = True
            return True
        if ws.close_code in (CloseCode.IDLE, CloseCode.ENDED):
            # The normal end of a class (everyone left, or the teacher ended it): nothing went wrong.
            log.info("room %s: the class is over; the bot leaves (%s)", self.room_id, ws.close_code)
            return True
        if retry_is_pointless(ws.close_code):
            log.error("room %s: server closed the bot's socket (%s)", self.room_id, ws.close_code)
            return True
        return False

    async def send(self, message: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            return
        try:
            await ws.send_json({"v": VERSION, **message})
        except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
            log.debug("send failed: %s", exc)

    def send_soon(self, message: dict[str, Any]) -> None:
        self._spawn(self.send(message))

    # The media side used by other sources of student video (bot/janus_room.py).
    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self._spawn(coro)

    async def consume(self, peer: str, track: MediaStreamTrack) -> None:
        await self._consume(peer, track)

    async def drop_peer(self, peer: str) -> None:
        await self._drop_peer(peer)

    def drop_when_failed(self, peer: str, pc: RTCPeerConnection) -> None:
        """A media connection that fails or is closed while it is still this student's is dropped, which has the bot
        check whether it lost them (and, where it subscribes, ask again); also one that fails before any video."""
        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and self.pcs.get(peer) is pc:
                log.info("room %s: connection to %s %s", self.room_id, peer, pc.connectionState)
                await self._drop_peer(peer)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ---- messages --------------------------------------------------------------------------------
    async def _handle(self, kind: str | None, data: dict[str, Any]) -> None:
        if kind == "welcome":
            await self._welcome(data)
        elif self.external is not None and kind in ("participant", "signal"):
            return      # this bot's students are the external room's publishers
        elif kind == "participant" and self.room is not None:
            peer, event = str(data.get("peer_id")), data.get("event")
            if event == "joined":
                # On the loop, like every roster change: tick() reads the roster here (the writes it
                # queues never block).
                self.room.add_student(peer, str(data.get("name") or "?"), bool(data.get("analysis", True)))
            elif event == "left":
                await self._drop_peer(peer)
                self.room.remove_student(peer)
            elif event == "consent":
                analysis = bool(data.get("analysis"))
                # Consent first: results of frames already in flight must find analysis off while the
                # peer connection is still closing.
                self.room.set_consent(peer, analysis)
                if not analysis:
                    await self._drop_peer(peer)
                student = self.room.students.get(peer)
                if student is not None and isinstance(data.get("name"), str) and data["name"]:
                    student.name = data["name"]     # a meeting participant renamed (signaling/ingest.py)
        elif kind == "signal":
            payload = data.get("data") or {}
            if isinstance(payload, dict) and payload.get("type") == "offer" and isinstance(payload.get("sdp"), str):
                self._spawn(self._answer(str(data.get("from")), payload["sdp"]))
        elif kind == "control" and self.room is not None:
            self.room.control(data)

    async def _welcome(self, data: dict[str, Any]) -> None:
        self.peer_id = data.get("peer_id")
        self.ice_servers = list(data.get("ice_servers") or [])
        self.meeting = (data.get("media") or {}).get("mode") == "sfu"
        if self.room is None:
            session_id = await asyncio.to_thread(self.repository.resume_or_start_session, self.room_id,
                                                 data.get("session_id"))
            self.room = ClassRoom(self.settings, self.room_id, session_id, self.repository, self.send_soon)
            if session_id == data.get("session_id") and hasattr(self.repository, "session_alerts"):
                # Taking over a running class (its worker died): the alerts already raised and acknowledged.
                try:
                    stored = await asyncio.to_thread(self.repository.session_alerts, session_id)
                    restored = self.room.engine.restore(stored)
                    if restored:
                        log.info("room %s: %d alert(s) of session %s restored", self.room_id, restored, session_id)
                except Exception as exc:     # the class goes on without them
                    log.warning("room %s: could not restore the session's alerts (%s)", self.room_id, describe(exc))
            self.register(self.room_id, self.room)
            self._spawn(self._tick_loop(self.room))
        await self.send({"type": "session", "session_id": self.room.session_id})
        if self.external is not None:
            await self.external.attach(self)
            self.joined.set()
            log.info("room %s: bot joined as %s, session %s, students from Janus room %s", self.room_id,
                     self.peer_id, self.room.session_id, self.external.room)
            return
        roster = {str(p["peer_id"]): (str(p.get("name") or "?"), bool(p.get("analysis", True)))
                  for p in data.get("participants") or [] if isinstance(p, dict) and p.get("peer_id")}
        # After a reconnect the welcome is the truth: students who left or opted out meanwhile are updated.
        for peer in self.room.sync_roster(roster):
            await self._drop_peer(peer)
        self.joined.set()
        log.info("room %s: bot joined as %s, session %s", self.room_id, self.peer_id, self.room.session_id)

    async def _tick_loop(self, room: ClassRoom) -> None:
        period = 1.0 / max(0.2, self.settings.bot.state_push_hz)
        while self.room is room:
            await asyncio.sleep(period)
            try:
                room.tick()
            except Exception:
                log.exception("room %s: state update failed", self.room_id)

    # ---- media -----------------------------------------------------------------------------------
    async def _answer(self, peer: str, sdp: str) -> None:
        room = self.room
        if room is None or not room.wants_video(peer):
            log.info("room %s: offer from %s ignored (unknown or opted out)", self.room_id, peer)
            return
        await self._drop_peer(peer)
        pc = RTCPeerConnection(rtc_configuration(self.ice_servers))
        self.pcs[peer] = pc

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video":
                old = self.consumers.pop(peer, None)
                if old:
                    old.cancel()
                self.consumers[peer] = self._spawn(self._consume(peer, track))

        self.drop_when_failed(peer, pc)
        try:
            await asyncio.wait_for(self._negotiate(pc, peer, sdp), timeout=15)
        except Exception as exc:  # bad SDP, ICE trouble, peer vanished mid-handshake
            log.warning("room %s: negotiation with %s failed: %s", self.room_id, peer, exc or type(exc).__name__)
            if self.pcs.get(peer) is pc:
                await self._drop_peer(peer)
            else:
                await pc.close()

    async def _negotiate(self, pc: RTCPeerConnection, peer: str, sdp: str) -> None:
        sdp, dropped = filter_candidates(sdp, allow_loopback=self._server_is_loopback)
        if dropped:
            log.warning("room %s: ignored %d ICE candidate(s) of %s pointing at addresses the bot must not "
                        "contact (loopback, link-local, multicast, unresolvable names)", self.room_id, dropped, peer)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=decline_extensions(sdp), type="offer"))
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "video":
                transceiver.direction = "recvonly"
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)   # aiortc gathers all candidates here: vanilla ICE
        await self.send({"type": "signal", "to": peer, "data": {"type": "answer", "sdp": pc.localDescription.sdp}})

    async def _consume(self, peer: str, track: MediaStreamTrack) -> None:
        """Pull decoded frames; hand one to the mailbox every 1/sample_hz s. Every frame must be
        received (the decoder needs them) but only sampled ones are converted, in the worker thread."""
        room = self.room
        # sample_hz is a floor: frames arrive on their own clock (e.g. every 333 ms at 3 fps), so the
        # schedule runs 5 % fast to make the delivered rate never fall under the configured one.
        period = 1.0 / (self.settings.bot.sample_hz * 1.05)
        stall = self.settings.bot.stall_seconds
        next_due = 0.0
        key = (self.room_id, peer)
        stalled = False
        if room:
            room.mark_connected(peer, True)
        try:
            while True:
                # A stall (camera frozen, network hiccup) only marks the student not connected: the
                # track is kept and analysis resumes with its next frame. A peer that is really gone
                # ends through MediaStreamError, its connection failing (ICE consent) or leaving.
                try:
                    frame = await asyncio.wait_for(track.recv(), timeout=stall)   # recv is cancel-safe
                except asyncio.TimeoutError:
                    if not stalled:
                        stalled = True
                        log.warning("room %s: no video from %s for %.0f s; waiting for it to resume",
                                    self.room_id, peer, stall)
                        self.mailbox.discard(key)
                        if room:
                            room.mark_connected(peer, False)
                    continue
                except MediaStreamError:
                    log.info("room %s: video from %s ended", self.room_id, peer)
                    break
                if stalled:
                    stalled = False
                    log.info("room %s: video from %s resumed", self.room_id, peer)
                    if room:
                        room.mark_connected(peer, True)
                now = time.monotonic()
                if now < next_due or room is None or not room.wants_video(peer):
                    continue
                next_due = now + period if now - next_due > period else next_due + period
                self.mailbox.put(key, PendingFrame(frame, time.time(), now))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("room %s: video from %s failed", self.room_id, peer)
        finally:
            self.mailbox.discard(key)
            if room:
                room.mark_connected(peer, False)
            if self.consumers.get(peer) is asyncio.current_task():
                self.consumers.pop(peer, None)
                pc = self.pcs.pop(peer, None)
                if pc is not None:
                    self._spawn(pc.close())
                self._check_lost_later(peer)

    LOSS_GRACE = 3.0    # s: a leaving student's media often ends before the server says they left

    def _still_lost(self, peer: str) -> bool:
        """The student is in class with analysis on, and the bot has no media connection to them."""
        return self.room is not None and self.room.wants_video(peer) and peer not in self.pcs

    def _check_lost_later(self, peer: str) -> None:
        """A student's media connection ended: if, LOSS_GRACE s later, they are still in class with analysis on
        and have not connected again, the bot has lost them: counted (stats) and said (log). Where the bot
        subscribes (a meeting, or another app's Janus room) it asks for their video again."""
        if peer in self._loss_checks:
            return
        self._loss_checks.add(peer)

        async def check() -> None:
            try:
                await asyncio.sleep(self.LOSS_GRACE)
            finally:
                self._loss_checks.discard(peer)
            if not self._still_lost(peer):
                return
            self.connections_lost += 1
            self._losses[peer] = losses = self._losses.get(peer, 0) + 1
            if not self.meeting and self.external is None:
                log.warning("room %s: the media connection to %s ended while they are still in class; they are "
                            "not analysed until they reconnect", self.room_id, peer)
                return
            # Soon after the first loss; a student lost again and again (a bot short of CPU) waits longer each
            # time, up to a minute.
            delay = min(60.0, self.LOSS_GRACE * (2 ** (losses - 1) - 1))
            log.warning("room %s: the media connection to %s ended while they are still in class; asking "
                        "for their video again in %.0f s", self.room_id, peer, delay)
            await asyncio.sleep(delay)
            if not self._still_lost(peer):
                return
            if self.external is not None:
                await self.external.resubscribe(peer)
            else:
                await self.send({"type": "subscribe", "feed": peer})
        self._spawn(check())

    async def _drop_peer(self, peer: str) -> None:
        self._check_lost_later(peer)
        consumer = self.consumers.pop(peer, None)
        if consumer is not None:
            consumer.cancel()
        self.mailbox.discard((self.room_id, peer))
        pc = self.pcs.pop(peer, None)
        if pc is not None:
            try:
                await pc.close()
            except Exception as exc:
                log.debug("closing pc of %s: %s", peer, exc)

    async def _close_peers(self) -> None:
        for peer in list(self.pcs):
            await self._drop_peer(peer)
