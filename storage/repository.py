"""Repository: the only way code reads or writes the database.

Writes from the bot (participants, samples, alerts) are non-blocking: they go into one ordered queue
that a single writer thread commits in batches. When the database is locked or the disk is full the
writer logs once per outage, keeps the rows and retries with backoff; rows are dropped (and counted as
`lost`) only past `max_pending_rows`. Reads (rooms, review, CSV) are direct and quick.
"""
from __future__ import annotations

import csv
import io
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from core.emotions import EMOTIONS
from core.records import AlertRecord, SampleRecord
from storage import schema
from storage.review import build_review

log = logging.getLogger("classmood.storage")

Operation = tuple[str, Any]   # (kind, payload): applied in order by the writer thread


class Repository:
    def __init__(self, url: str, flush_seconds: float = 0.5, max_pending_rows: int = 100_000) -> None:
        self.url = url
        self.engine = schema.create_engine_for(url)
        self.flush_seconds = flush_seconds
        self.max_pending_rows = max_pending_rows
        self._ops: deque[Operation] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._closed = False
        self._stats = {"accepted": 0, "accepted_samples": 0, "written": 0, "written_samples": 0,
                       "lost": 0, "write_errors": 0, "last_error": None}
        self._thread = threading.Thread(target=self._writer, name="classmood-db-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(cls, storage: Any) -> "Repository":
        return cls(storage.url, storage.flush_seconds, storage.max_pending_rows)

    # ---- rooms (synchronous, used by the signaling server) -----------------------------------------
    def create_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(schema.rooms.insert().values(room_id=room_id, title=title, join_key=join_key,
                                                      teacher_token_hash=teacher_token_hash, created_at=time.time()))

    def get_room(self, room_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(schema.rooms).where(schema.rooms.c.room_id == room_id)).mappings().first()
        return dict(row) if row else None

    def list_sessions(self, room_id: str) -> list[dict[str, Any]]:
        s, p, sm, a = schema.sessions, schema.participants, schema.samples, schema.alerts
        with self.engine.connect() as conn:
            rows = conn.execute(select(s).where(s.c.room_id == room_id).order_by(s.c.started_at.desc())).mappings().all()
            out = []
            for row in rows:
                sid = row["session_id"]
                out.append({**dict(row),
                            "participants": conn.scalar(select(func.count()).select_from(p).where(p.c.session_id == sid)),
                            "samples": conn.scalar(select(func.count()).select_from(sm).where(sm.c.session_id == sid)),
                            "alerts": conn.scalar(select(func.count()).select_from(a).where(a.c.session_id == sid))})
        return out

    def session_room(self, session_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(select(schema.sessions.c.room_id).where(schema.sessions.c.session_id == session_id))

    def session_review(self, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            return build_review(conn, session_id, bucket_seconds)

    def iter_samples_csv(self, session_id: str) -> Iterator[str]:
        s, p = schema.samples, schema.participants
        header = ["time_iso", "t", "participant_id", "name", "face_found", *EMOTIONS, "top_label",
                  "confusion", "boredom", "attention"]
        query = (select(s, p.c.name).select_from(s.outerjoin(p, (p.c.session_id == s.c.session_id)
                                                           & (p.c.participant_id == s.c.participant_id)))
                 .where(s.c.session_id == session_id).order_by(s.c.t))
        yield _csv_line(header)
        with self.engine.connect() as conn:
            for row in conn.execution_options(stream_results=True).execute(query).mappings():
                yield _csv_line([_iso(row["t"]), f"{row['t']:.3f}", row["participant_id"], row["name"] or "",
                                 int(bool(row["face_found"])),
                                 *[_num(row[c]) for c in schema.PROB_COLUMNS], row["top_label"] or "",
                                 _num(row["confusion"]), _num(row["boredom"]), _num(row["attention"])])

    def iter_alerts_csv(self, session_id: str) -> Iterator[str]:
        a = schema.alerts
        yield _csv_line(["time_iso", "t", "level", "kind", "participant_id", "name", "value", "message", "acknowledged"])
        with self.engine.connect() as conn:
            for row in conn.execute(select(a).where(a.c.session_id == session_id).order_by(a.c.t)).mappings():
                yield _csv_line([_iso(row["t"]), f"{row['t']:.3f}", row["level"], row["kind"],
                                 row["participant_id"] or "", row["name"] or "", _num(row["value"]), row["message"],
                                 int(bool(row["acknowledged"]))])

    # ---- sessions (synchronous: the bot calls them via asyncio.to_thread) ---------------------------
    def start_session(self, room_id: str) -> str:
        session_id = uuid.uuid4().hex[:16]
        with self.engine.begin() as conn:
            if conn.scalar(select(schema.rooms.c.room_id).where(schema.rooms.c.room_id == room_id)) is None:
                # A bot joined a room this database does not know (server with another store): record it.
                conn.execute(schema.rooms.insert().values(room_id=room_id, title="", join_key="",
                                                          teacher_token_hash="", created_at=time.time()))
            conn.execute(schema.sessions.insert().values(session_id=session_id, room_id=room_id, started_at=time.time()))
        return session_id

    def resume_or_start_session(self, room_id: str, session_id: str | None, grace_seconds: float = 600.0) -> str:
        """A restarted bot continues the room's session (also one its predecessor ended less than
        `grace_seconds` ago on shutdown); otherwise a new session starts."""
        if session_id:
            self.flush()  # a queued end_session of the previous bot must land before we look
            with self.engine.begin() as conn:
                row = conn.execute(select(schema.sessions).where(schema.sessions.c.session_id == session_id)).mappings().first()
                if row and row["room_id"] == room_id and (row["ended_at"] is None or time.time() - row["ended_at"] < grace_seconds):
                    if row["ended_at"] is not None:
                        conn.execute(update(schema.sessions).where(schema.sessions.c.session_id == session_id)
                                     .values(ended_at=None))
                    return session_id
        return self.start_session(room_id)

    def end_session(self, session_id: str) -> None:
        self._enqueue(("end_session", (session_id, time.time())))

    # ---- bot writes (non-blocking) ---------------------------------------------------------------
    def add_participant(self, session_id: str, participant_id: str, name: str) -> None:
        self._enqueue(("participant", (session_id, participant_id, name[:120], time.time())))

    def participant_left(self, session_id: str, participant_id: str) -> None:
        self._enqueue(("left", (session_id, participant_id, time.time())))

    def set_opt_out(self, session_id: str, participant_id: str, opted_out: bool) -> None:
        self._enqueue(("opt_out", (session_id, participant_id, bool(opted_out))))

    def add_samples(self, rows: Iterable[SampleRecord]) -> int:
        n = 0
        for row in rows:
            self._enqueue(("sample", row), sample=True)
            n += 1
        return n

    def add_alert(self, alert: AlertRecord) -> None:
        self._enqueue(("alert", alert))

    def acknowledge_alert(self, alert_id: str) -> None:
        self._enqueue(("ack", (alert_id, time.time())))

    def _enqueue(self, op: Operation, sample: bool = False) -> None:
        with self._lock:
            if self._closed:
                log.error("repository closed: a %s write was refused", op[0])
                self._stats["lost"] += 1
                return
            if len(self._ops) >= self.max_pending_rows:
                dropped = self._ops.popleft()
                self._stats["lost"] += 1
                if self._stats["lost"] == 1 or self._stats["lost"] % 1000 == 0:
                    log.error("database unavailable and %d rows pending: dropping the oldest (%s); %d lost so far",
                              len(self._ops), dropped[0], self._stats["lost"])
            self._ops.append(op)
            self._stats["accepted"] += 1
            if sample:
                self._stats["accepted_samples"] += 1
            if len(self._ops) >= 500:
                self._wake.notify()

    # ---- writer thread ---------------------------------------------------------------------------
    def _writer(self) -> None:
        backoff = 0.1
        failing = False
        while True:
            with self._lock:
                if not self._ops and not self._closed:
                    self._wake.wait(self.flush_seconds)
                if not self._ops:
                    self._idle.notify_all()
                    if self._closed:
                        return
                    continue
                batch = list(self._ops)
                self._in_flight = len(batch)
            try:
                try:
                    written_samples = self._commit(batch)
                except OperationalError:
                    raise
                except Exception:
                    # A row the database rejects for good (e.g. an integrity error) must not block the
                    # rows behind it: commit one by one and drop only the rejected ones, loudly.
                    written_samples = self._commit_one_by_one(batch)
            except Exception as exc:  # locked, disk full, connection lost: keep the rows, retry
                with self._lock:
                    self._in_flight = 0
                    self._stats["write_errors"] += 1
                    self._stats["last_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if not failing:
                    log.error("database write failed (%s); %d rows kept in memory, retrying",
                              self._stats["last_error"], len(batch))
                    failing = True
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if failing:
                log.warning("database writable again; %d pending rows written", len(batch))
                failing = False
            backoff = 0.1
            with self._lock:
                for _ in range(len(batch)):
                    self._ops.popleft()
                self._in_flight = 0
                self._stats["written"] += len(batch)
                self._stats["written_samples"] += written_samples
                if not self._ops:
                    self._idle.notify_all()
            # Pace commits: batching is what keeps SQLite fast under 100 rows/s.
            if not self._closed:
                time.sleep(min(self.flush_seconds, 0.05))

    def _commit(self, batch: list[Operation]) -> int:
        now = time.time()
        sample_rows, n_samples = [], 0
        with self.engine.begin() as conn:
            def flush_samples() -> None:
                if sample_rows:
                    conn.execute(schema.samples.insert(), sample_rows)
                    sample_rows.clear()
            for kind, payload in batch:
                if kind == "sample":
                    sample_rows.append(_sample_row(payload, now))
                    n_samples += 1
                    continue
                flush_samples()
                _APPLY[kind](conn, payload, now)
            flush_samples()
        return n_samples

    def _commit_one_by_one(self, batch: list[Operation]) -> int:
        n = 0
        for op in batch:
            try:
                n += self._commit([op])
            except OperationalError:
                raise
            except Exception as exc:
                with self._lock:
                    self._stats["lost"] += 1
                    self._stats["last_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                log.error("database rejected a %s row for good (%s); dropped", op[0], self._stats["last_error"])
        return n

    def flush(self, timeout: float = 5.0) -> bool:
        """Block until everything accepted so far is committed (True) or timeout (False)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._wake.notify()
            while self._ops:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(min(remaining, 0.1))
                self._wake.notify()
        return True

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            if self._closed:
                return
        self.flush(timeout)
        with self._lock:
            self._closed = True
            self._wake.notify_all()
        self._thread.join(timeout)
        with self._lock:
            if self._ops:
                log.error("closing with %d rows that could not be written", len(self._ops))
                self._stats["lost"] += len(self._ops)
        self.engine.dispose()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self._stats, "pending": len(self._ops)}


def _sample_row(r: SampleRecord, now: float) -> dict[str, Any]:
    row: dict[str, Any] = {"session_id": r.session_id, "participant_id": r.participant_id, "t": r.t,
                           "face_found": bool(r.face_found), "top_label": r.top_label, "confusion": r.confusion,
                           "boredom": r.boredom, "attention": r.attention, "latency_s": r.latency_s, "stored_at": now}
    for i, column in enumerate(schema.PROB_COLUMNS):
        row[column] = float(r.probs[i]) if r.probs is not None else None
    return row


def _apply_participant(conn, payload, _now) -> None:
    session_id, participant_id, name, joined_at = payload
    p = schema.participants
    exists = conn.scalar(select(p.c.participant_id).where((p.c.session_id == session_id) & (p.c.participant_id == participant_id)))
    if exists is None:
        try:
            conn.execute(p.insert().values(session_id=session_id, participant_id=participant_id, name=name,
                                           joined_at=joined_at, analysis_opt_out=False))
        except IntegrityError:
            log.warning("participant %s of unknown session %s not stored", participant_id, session_id)
            raise


def _apply_left(conn, payload, _now) -> None:
    session_id, participant_id, t = payload
    p = schema.participants
    conn.execute(update(p).where((p.c.session_id == session_id) & (p.c.participant_id == participant_id)).values(left_at=t))


def _apply_opt_out(conn, payload, _now) -> None:
    session_id, participant_id, opted_out = payload
    p = schema.participants
    conn.execute(update(p).where((p.c.session_id == session_id) & (p.c.participant_id == participant_id))
                 .values(analysis_opt_out=opted_out))


def _apply_alert(conn, a: AlertRecord, _now) -> None:
    conn.execute(schema.alerts.insert().values(
        alert_id=a.alert_id, session_id=a.session_id, t=a.t, level=a.level, kind=a.kind, message=a.message,
        value=float(a.value), participant_id=a.participant_id, name=a.name, acknowledged=bool(a.acknowledged)))


def _apply_ack(conn, payload, _now) -> None:
    alert_id, t = payload
    conn.execute(update(schema.alerts).where(schema.alerts.c.alert_id == alert_id)
                 .values(acknowledged=True, acknowledged_at=t))


def _apply_end(conn, payload, _now) -> None:
    session_id, t = payload
    conn.execute(update(schema.sessions).where(schema.sessions.c.session_id == session_id).values(ended_at=t))


_APPLY: dict[str, Callable[[Any, Any, float], None]] = {
    "participant": _apply_participant, "left": _apply_left, "opt_out": _apply_opt_out,
    "alert": _apply_alert, "ack": _apply_ack, "end_session": _apply_end,
}


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def _num(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"
