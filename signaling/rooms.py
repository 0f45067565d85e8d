"""The live room registry, in memory: who is connected where, the room's bot, its cached state.

No aiohttp here: a `Peer` wraps any socket with `send_str`, `close(code=...)` and `closed`, and
sends through its own bounded queue and writer task, so one slow or stalled client never holds up
the sender (the bot's state fan-out, a relay) and is dropped once its queue is full.
Rooms come and go: the server creates them (and persists them through the Store); a room with
nobody connected is dropped from memory after `room_idle_seconds` and reloaded from the Store on
the next hello (with a fresh bot token).
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

log = logging.getLogger("classmood.signaling")

QUEUE_MESSAGES = 256        # outgoing messages buffered per peer before it counts as stalled
QUEUE_FRAME_BYTES = 16 << 20   # binary frames (signaling/ingest.py) queued for the bot before new ones are dropped
SEND_TIMEOUT_S = 10.0       # one frame that takes longer than this to write: the peer is stalled
INVITE_PENDING_S = 20.0     # an invited bot that has not arrived yet: do not invite a second one


class Socket(Protocol):
    @property
    def closed(self) -> bool: ...

    async def send_str(self, data: str) -> None: ...

    async def send_bytes(self, data: bytes) -> None: ...

    async def close(self, *, code: int = 1000, message: bytes = b"") -> bool: ...


class TooManyRooms(Exception):
    pass


class RoomFull(Exception):
    pass


def new_id() -> str:
    """Peer, room and worker ids: 12 url-safe characters (72 random bits)."""
    return secrets.token_urlsafe(9)


class Peer:
    """One connected socket: a student, teacher, bot or bot worker."""

    def __init__(self, peer_id: str, role: str, ws: Socket, name: str = "", analysis: bool = True,
                 abort: Callable[[], None] | None = None, queue_size: int = QUEUE_MESSAGES,
                 send_timeout: float = SEND_TIMEOUT_S) -> None:
        self.peer_id, self.role, self.ws, self.name, self.analysis = peer_id, role, ws, name, analysis
        self._abort = abort
        self._queue: asyncio.Queue[str | bytes | int] = asyncio.Queue(queue_size)
        self._queued_frame_bytes = 0
        self._send_timeout = send_timeout
        self._writer: asyncio.Task | None = None
        self.closing = False
        self.dropped = False       # closed by the server for being too slow

    def __repr__(self) -> str:
        return f"Peer({self.role} {self.peer_id})"

    def start(self) -> None:
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write(), name=f"send-{self.peer_id}")

    def send(self, message: dict[str, Any]) -> bool:
        """Queue one message (never blocks). False when the peer is closing or was dropped as stalled."""
        if self.closing or self.ws.closed:
            return False
        try:
            self._queue.put_nowait(json.dumps(message, separators=(",", ":")))
            return True
        except asyncio.QueueFull:
            log.warning("%s %s is not reading its messages; dropping it", self.role, self.peer_id)
            self.drop()
            return False

    def send_frame(self, data: bytes) -> bool:
        """Queue one binary video frame (never blocks). A frame is worth less than a message: when frames
        pile up (the bot reads slowly) the new one is dropped (False) instead of dropping the peer, and
        half the queue stays free for JSON messages."""
        if self.closing or self.ws.closed or self._queued_frame_bytes + len(data) > QUEUE_FRAME_BYTES \
                or self._queue.qsize() >= self._queue.maxsize // 2:
            return False
        self._queue.put_nowait(data)
        self._queued_frame_bytes += len(data)
        return True

    def close(self, code: int = 1000) -> None:
        """Send what is queued, then close the socket with `code`."""
        if self.closing:
            return
        self.closing = True
        try:
            self._queue.put_nowait(code)
        except asyncio.QueueFull:
            self.drop()

    def drop(self) -> None:
        """Cut the connection now, without a closing handshake (a stalled client)."""
        self.closing = self.dropped = True
        if self._writer is not None:
            self._writer.cancel()
        if self._abort is not None:
            try:
                self._abort()
            except Exception:  # the transport may be gone already
                pass

    async def stop(self, grace: float = 2.0) -> None:
        """Let the writer flush what is queued (at most `grace` seconds), then end it."""
        writer = self._writer
        if writer is None or writer.done():
            return
        self.closing = True
        try:
            self._queue.put_nowait(0)   # 0: end the writer without closing (the handler closes the socket)
        except asyncio.QueueFull:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(writer), grace)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            writer.cancel()
        except Exception:
            pass

    async def _write(self) -> None:
        while True:
            item = await self._queue.get()
            if isinstance(item, int):
                if item and not self.ws.closed:
                    try:
                        await asyncio.wait_for(self.ws.close(code=item), self._send_timeout)
                    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                        self.drop()
                return
            try:
                if isinstance(item, bytes):
                    self._queued_frame_bytes -= len(item)
                    await asyncio.wait_for(self.ws.send_bytes(item), self._send_timeout)
                else:
                    await asyncio.wait_for(self.ws.send_str(item), self._send_timeout)
            except asyncio.TimeoutError:
                log.warning("%s %s: sending timed out; dropping it", self.role, self.peer_id)
                self.drop()
                return
            except (ConnectionError, RuntimeError) as exc:   # the socket went away under us
                log.debug("send to %s failed: %s", self.peer_id, exc)
                return


@dataclass(eq=False)
class Room:
    room_id: str
    title: str
    join_key: str
    teacher_token_hash: str
    bot_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    session_id: str | None = None
    ended_session: str | None = None       # the session the teacher ended last: a bot that comes back with it is sent away
    bot: Peer | None = None
    teachers: dict[str, Peer] = field(default_factory=dict)
    students: dict[str, Peer] = field(default_factory=dict)
    last_state: dict[str, Any] | None = None
    worker_id: str | None = None           # the worker last invited here (its load)
    invited_at: float | None = None        # monotonic time of that invite
    idle_since: float = field(default_factory=time.monotonic)
    alone_since: float | None = None       # when the bot was last left without students or teachers
    meeting: Any = None                    # the server's signaling.meeting.Meeting (None: video goes to the bot)

    def participants(self) -> list[dict[str, Any]]:
        """Students as the bot and teachers see them (never sent to students)."""
        return [{"peer_id": p.peer_id, "name": p.name, "analysis": p.analysis} for p in self.students.values()]

    def size(self) -> int:
        return len(self.students) + len(self.teachers) + (1 if self.bot else 0)

    def peers(self) -> list[Peer]:
        return [*self.students.values(), *self.teachers.values(), *([self.bot] if self.bot else [])]

    def watchers(self) -> list[Peer]:
        """The bot and the teachers: the only ones who learn about other participants."""
        return [*self.teachers.values(), *([self.bot] if self.bot else [])]

    def invite_pending(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.bot is None and self.invited_at is not None and now - self.invited_at < INVITE_PENDING_S


class Registry:
    """Live rooms by id and connected bot workers, with the server's limits."""

    def __init__(self, max_rooms: int, max_participants_per_room: int, room_idle_seconds: float = 600.0,
                 max_teachers_per_room: int = 10) -> None:
        self.max_rooms = max_rooms
        self.max_participants = max_participants_per_room
        self.max_teachers = max_teachers_per_room
        self.room_idle_seconds = room_idle_seconds
        self.rooms: dict[str, Room] = {}
        self.workers: dict[str, Peer] = {}
        self._turn = itertools.count()

    # ---- rooms -----------------------------------------------------------------------------------
    def get(self, room_id: str) -> Room | None:
        return self.rooms.get(room_id)

    def prune(self, now: float | None = None) -> int:
        """Forget rooms nobody has been connected to for room_idle_seconds (they stay in the Store)."""
        now = time.monotonic() if now is None else now
        idle = [r for r in self.rooms.values() if r.size() == 0 and not r.invite_pending(now)
                and now - r.idle_since >= self.room_idle_seconds]
        for room in idle:
            del self.rooms[room.room_id]
        if idle:
            log.info("%d idle room(s) unloaded", len(idle))
        return len(idle)

    def has_capacity(self) -> bool:
        """Room for one more live room, unloading rooms nobody is connected to if needed: they are in the
        Store, so a room created and never joined (or a flood of them) cannot lock its teacher, or
        any other teacher whose room was unloaded, out of the server."""
        if len(self.rooms) >= self.max_rooms:
            self.prune()
        if len(self.rooms) >= self.max_rooms:
            now = time.monotonic()
            idle = sorted((r for r in self.rooms.values() if r.size() == 0 and not r.invite_pending(now)),
                          key=lambda r: r.idle_since)
            for room in idle[:len(self.rooms) - self.max_rooms + 1]:
                del self.rooms[room.room_id]
        return len(self.rooms) < self.max_rooms

    def add(self, room: Room) -> Room:
        """Register a room (the one already there wins a race). Raises TooManyRooms."""
        existing = self.rooms.get(room.room_id)
        if existing is not None:
            return existing
        if not self.has_capacity():
            raise TooManyRooms(f"{self.max_rooms} rooms are live on this server")
        self.rooms[room.room_id] = room
        return room

    # ---- participants ----------------------------------------------------------------------------
    def join(self, room: Room, peer: Peer) -> Peer | None:
        """Seat a peer; returns the bot it replaces, if any. Raises RoomFull (the bot always gets in).
        Students and teachers have separate seats, so students (anyone with the shared student link)
        can never fill the room against its teacher."""
        if peer.role == "student" and len(room.students) >= self.max_participants:
            raise RoomFull(f"room {room.room_id} has {self.max_participants} students")
        if peer.role == "teacher" and len(room.teachers) >= self.max_teachers:
            raise RoomFull(f"room {room.room_id} has {self.max_teachers} teacher connections")
        if room.room_id not in self.rooms:           # unloaded while this hello was being checked
            self.rooms[room.room_id] = room
        replaced = None
        if peer.role == "student":
            room.students[peer.peer_id] = peer
            room.alone_since = None
        elif peer.role == "teacher":
            room.teachers[peer.peer_id] = peer
            room.alone_since = None
        elif peer.role == "bot":
            replaced, room.bot = room.bot, peer
            room.invited_at = None
            room.alone_since = None if room.students or room.teachers else time.monotonic()
        else:
            raise ValueError(f"role {peer.role!r} does not sit in rooms")
        return replaced

    def leave(self, room: Room, peer: Peer) -> bool:
        """Unseat a peer. True when it was seated (a replaced bot was not, any more)."""
        seated = False
        if peer.role == "student":
            seated = room.students.pop(peer.peer_id, None) is not None
        elif peer.role == "teacher":
            seated = room.teachers.pop(peer.peer_id, None) is not None
        elif peer.role == "bot" and room.bot is peer:
            room.bot, room.last_state, room.worker_id, seated = None, None, None, True
        if room.size() == 0:
            room.idle_since = time.monotonic()
        if seated and peer.role != "bot" and not room.students and not room.teachers:
            room.alone_since = time.monotonic()
        return seated

    def lonely_bots(self, after_seconds: float, now: float | None = None) -> list[Room]:
        """Rooms whose bot has had no student or teacher with it for `after_seconds`."""
        now = time.monotonic() if now is None else now
        return [r for r in self.rooms.values() if r.bot is not None and not r.students and not r.teachers
                and r.alone_since is not None and now - r.alone_since >= after_seconds]

    # ---- bot workers -----------------------------------------------------------------------------
    def add_worker(self, worker: Peer) -> None:
        self.workers[worker.peer_id] = worker

    def remove_worker(self, worker: Peer) -> None:
        if self.workers.get(worker.peer_id) is worker:
            del self.workers[worker.peer_id]

    def worker_load(self, worker_id: str) -> int:
        """What a worker carries: the analysed students of its rooms (what costs it CPU: decode and
        inference per student), plus one per room so that empty rooms spread too."""
        return sum(1 + sum(1 for p in r.students.values() if p.analysis) for r in self.rooms.values()
                   if r.worker_id == worker_id and (r.bot or r.invite_pending()))

    def pick_workers(self) -> list[Peer]:
        """Connected workers, least busy first (worker_load); ties taken in turn (round robin)."""
        live = [w for w in self.workers.values() if not w.closing and not w.ws.closed]
        if not live:
            return []
        turn = next(self._turn) % len(live)
        rotated = live[turn:] + live[:turn]
        return sorted(rotated, key=lambda w: self.worker_load(w.peer_id))


class RateLimit:
    """Token bucket: `burst` messages at once, `per_second` sustained."""

    def __init__(self, per_second: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.burst, self.clock = per_second, burst, clock
        self.tokens, self.t = float(burst), clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.per_second)
        self.t = now

    def refund(self) -> None:
        """Give back the token of a message that another budget pays for."""
        self.tokens = min(self.burst, self.tokens + 1)

    def allow(self) -> bool:
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst
