"""Repository: the only way code reads or writes the database (implements signaling.store.Store).

The bot's writes (participants, samples, alerts, acks, session end) are non-blocking: they join one
ordered queue that storage.writer commits in batches and keeps through outages. Rooms, session
start/resume and all reads are synchronous and quick (callers in async code use asyncio.to_thread).
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Iterable, Iterator

from sqlalchemy import delete, func, or_, select, update

from core.records import AlertRecord, SampleRecord
from core.settings import StorageSettings
from storage import assignments, csvrows, schema
from storage.review import build_review, finish_session, session_alerts
from storage.writer import BatchWriter
from storage.writes import apply_batch


# The writer gives up on a lock sooner than readers do: it retries anyway (with the rows kept), and a
# short wait means an outage shows up in stats()/logs within a second instead of silently stalling.
WRITER_BUSY_TIMEOUT_S = 1.0
# After an erase, how long to keep retrying a WAL checkpoint that readers or the writer hold up.
ERASE_CHECKPOINT_S = 10.0
log = logging.getLogger("classmood.storage")


class Repository:
    def __init__(self, url: str, flush_seconds: float = StorageSettings.flush_seconds,
                 max_pending_rows: int = StorageSettings.max_pending_rows) -> None:
        self.url = url
        self.engine = schema.create_engine_for(url)
        self.write_engine = schema.create_engine_for(url, busy_timeout_s=WRITER_BUSY_TIMEOUT_S, migrate_schema=False)
        self._writer = BatchWriter(self.write_engine, apply_batch, flush_seconds, max_pending_rows)

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> "Repository":
        return cls(storage.url, storage.flush_seconds, storage.max_pending_rows)

    # ---- rooms and reads (signaling.store.Store) -----------------------------------------------------
    def create_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.rooms.insert().values(room_id=room_id, title=title, join_key=join_key,
                                                      teacher_token_hash=teacher_token_hash, created_at=time.time()))

    def get_room(self, room_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.rooms).where(schema.rooms.c.room_id == room_id)).mappings().first()
        return dict(row) if row else None

    def list_sessions(self, room_id: str | None = None) -> list[dict[str, Any]]:
        """Sessions of a room (all rooms when None), newest first, with participant/sample/alert counts."""
        s, p, sm, a = schema.sessions, schema.participants, schema.samples, schema.alerts

        def count(table: Any) -> Any:
            return select(func.count()).select_from(table).where(table.c.session_id == s.c.session_id).scalar_subquery()
        query = select(s, count(p).label("participants"), count(sm).label("samples"), count(a).label("alerts"))
        if room_id is not None:
            query = query.where(s.c.room_id == room_id)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query.order_by(s.c.started_at.desc())).mappings()]

    def session_room(self, session_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(select(schema.sessions.c.room_id).where(schema.sessions.c.session_id == session_id))

    def session_review(self, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return build_review(conn, session_id, bucket_seconds)

    def iter_samples_csv(self, session_id: str) -> Iterator[str]:
        return csvrows.iter_samples_csv(self.engine, session_id)

    def iter_alerts_csv(self, session_id: str) -> Iterator[str]:
        return csvrows.iter_alerts_csv(self.engine, session_id)

    def replace_teacher_token_hash(self, room_id: str, teacher_token_hash: str) -> bool:
        """Store a new teacher token hash for the room (the old token stops working); False for no such room.
        (python -m signaling.admin teacher-link: a teacher who lost the link.)"""
        with self.engine.begin() as conn:
            done = conn.execute(update(schema.rooms).where(schema.rooms.c.room_id == room_id)
                                .values(teacher_token_hash=teacher_token_hash))
        return bool(done.rowcount)

    # ---- erasing (the teacher's delete button, the retention policy) --------------------------------
    def delete_session(self, session_id: str) -> bool:
        """Erase a session's samples, alerts, participants and the session itself in one transaction.
        False when there is no such session."""
        return bool(self._erase(schema.sessions.c.session_id == session_id))

    def delete_sessions_before(self, cutoff: float) -> list[str]:
        """Erase every session that ended before `cutoff` (epoch seconds), or that never ended (a crashed
        bot) and has had no sample since before it: a class still being recorded is never erased, however
        long ago it started. Returns their ids."""
        s, samples = schema.sessions, schema.samples
        recent_sample = select(samples.c.session_id).where(samples.c.session_id == s.c.session_id,
                                                           samples.c.t >= cutoff).exists()
        return self._erase(or_(s.c.ended_at < cutoff,
                               s.c.ended_at.is_(None) & (s.c.started_at < cutoff) & ~recent_sample))

    def _erase(self, which: Any) -> list[str]:
        """Erase the sessions matching `which` and all their rows in one transaction; their ids."""
        self.flush()   # rows of these sessions still queued would otherwise arrive after the delete
        s = schema.sessions
        with self.engine.begin() as conn:
            ids = list(conn.execute(select(s.c.session_id).where(which)).scalars())
            chosen = select(s.c.session_id).where(which)      # a subquery: no bound on how many sessions
            for table in (schema.samples, schema.alerts, schema.participants):
                conn.execute(delete(table).where(table.c.session_id.in_(chosen)))
            conn.execute(delete(s).where(which))
        if ids:
            self._checkpoint_after_erase()
        return ids

    def _checkpoint_after_erase(self) -> None:
        """Make the erase final on disk. secure_delete zeroes the freed cells in the database file, but in
        WAL mode the old page images (names, samples) stay in the -wal file until a checkpoint copies the
        new pages back and the log restarts; with a busy class that took minutes (issue 23). TRUNCATE
        checkpoints every frame and empties the -wal file; the writer keeps running (its next commit starts
        a fresh log, made from pages that no longer hold the erased rows). Retried while other connections
        hold it up (busy=1)."""
        if self.engine.dialect.name != "sqlite":
            return
        deadline = time.monotonic() + ERASE_CHECKPOINT_S
        while True:
            with self.engine.connect() as conn:
                busy, _frames, _done = conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
            if not busy:
                return
            if time.monotonic() >= deadline:
                log.error("storage: could not checkpoint the WAL after an erase (busy for %.0f s); erased rows "
                          "may remain in the -wal file until the next checkpoint", ERASE_CHECKPOINT_S)
                return
            time.sleep(0.05)

    # ---- sessions (synchronous: the bot needs the id before anything else is written) ----------------
    def start_session(self, room_id: str) -> str:
        session_id = uuid.uuid4().hex[:16]
        with self.engine.begin() as conn:
            if conn.scalar(select(schema.rooms.c.room_id).where(schema.rooms.c.room_id == room_id)) is None:
                # A bot in a room this database does not know (the server runs with another store): record it.
                conn.execute(schema.rooms.insert().values(room_id=room_id, title="", join_key="",
                                                          teacher_token_hash="", created_at=time.time()))
            conn.execute(schema.sessions.insert().values(session_id=session_id, room_id=room_id,
                                                         started_at=time.time()))
        return session_id

    def resume_or_start_session(self, room_id: str, session_id: str | None, grace_seconds: float = 600.0) -> str:
        """Continue `session_id` if it is this room's and still open, or was ended less than `grace_seconds`
        ago (a bot restart: the old bot ended it on shutdown); otherwise start a new session."""
        if session_id:
            self.flush()  # a queued end_session of the previous bot must land before we look
            s = schema.sessions
            with self.engine.begin() as conn:
                row = conn.execute(select(s).where(s.c.session_id == session_id)).mappings().first()
                if row and row["room_id"] == room_id and (
                        row["ended_at"] is None or time.time() - row["ended_at"] < grace_seconds):
                    if row["ended_at"] is not None:
                        conn.execute(update(s).where(s.c.session_id == session_id).values(ended_at=None))
                    return session_id
        return self.start_session(room_id)

    def end_session(self, session_id: str, at: float | None = None) -> None:
        """Queue the session's end, at `at` (epoch seconds) when the caller knows the true end (the
        teacher pressed End class, or the room emptied before the bot was dismissed), else now."""
        self._writer.put("end_session", (session_id, time.time() if at is None else float(at)))

    def finish_session(self, session_id: str, ended_at: float) -> bool:
        """Mark the session ended at `ended_at` now, synchronously (the server's End class: the review
        must show it ended at once, whichever process runs the bot). Queued writes land first; a session
        already ended keeps its end. True when this call ended it."""
        self.flush()
        return finish_session(self.engine, session_id, ended_at)

    def session_alerts(self, session_id: str) -> list[dict[str, Any]]:
        """The session's alerts, oldest first, with their acknowledgement (the teacher page's alert feed)."""
        self.flush(timeout=1.0)   # an alert or ack queued a moment ago belongs in the feed
        with self.engine.connect() as conn:
            return session_alerts(conn, session_id)

    # ---- room assignments: bot workers' leases (storage/assignments.py) ---------------------------------
    def assign_room(self, room_id: str, worker_id: str, lease_until: float, session_id: str | None = None) -> None:
        assignments.assign(self.engine, room_id, worker_id, lease_until, session_id)

    def claim_expired_room(self, worker_id: str, now: float, lease_until: float) -> dict[str, Any] | None:
        return assignments.claim_expired(self.engine, worker_id, now, lease_until)

    def renew_leases(self, worker_id: str, rooms: dict[str, tuple[str | None, int]], lease_until: float) -> list[str]:
        return assignments.renew(self.engine, worker_id, rooms, lease_until)

    def release_room(self, room_id: str, worker_id: str | None = None) -> bool:
        return assignments.release(self.engine, room_id, worker_id)

    def expire_leases(self, worker_id: str) -> int:
        return assignments.expire(self.engine, worker_id)

    def room_assignments(self, room_id: str | None = None) -> list[dict[str, Any]]:
        return assignments.get(self.engine, room_id)

    # ---- the bot's writes (non-blocking, never raise on database trouble) ----------------------------
    def add_participant(self, session_id: str, participant_id: str, name: str) -> None:
        self._writer.put("participant", (session_id, participant_id, str(name)[:120], time.time()))

    def participant_left(self, session_id: str, participant_id: str) -> None:
        self._writer.put("left", (session_id, participant_id, time.time()))

    def set_opt_out(self, session_id: str, participant_id: str, opted_out: bool) -> None:
        self._writer.put("opt_out", (session_id, participant_id, bool(opted_out)))

    def add_samples(self, rows: Iterable[SampleRecord]) -> int:
        """Queue sample rows; returns how many were accepted."""
        return sum(1 for row in rows if self._writer.put("sample", row))

    def add_alert(self, alert: AlertRecord) -> None:
        self._writer.put("alert", alert)

    def acknowledge_alert(self, alert_id: str, room_id: str | None = None) -> None:
        """Mark an alert acknowledged; with `room_id`, only if it belongs to a session of that room (the bot
        passes its own room: an acknowledgement is scoped to the room of the teacher who sent it)."""
        self._writer.put("ack", (alert_id, time.time(), room_id))

    # ---- lifecycle --------------------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Block until everything accepted so far is committed (True) or `timeout` passes (False)."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush, stop the writer thread and release connections. Idempotent."""
        self._writer.close(timeout)
        self.write_engine.dispose()
        self.engine.dispose()

    def stats(self) -> dict[str, Any]:
        """accepted, written, pending, lost, write_errors, last_error (+ accepted_samples, written_samples)."""
        return self._writer.stats()

    def __enter__(self) -> "Repository":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
