"""The bot's queued write operations and how a batch of them is applied in one transaction.

An operation is `Op(seq, kind, payload)`; the writer applies them strictly in queue order, so a
participant row is always inserted before the samples that reference it.
"""
from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from core.records import AlertRecord, SampleRecord
from storage import schema

# Kinds that carry a student's data (what max_pending_rows drops first and counts as `lost`);
# the others are small bookkeeping rows the data depends on.
ROW_KINDS = frozenset({"sample", "alert"})


class Op(NamedTuple):
    seq: int
    kind: str
    payload: Any


def apply_batch(conn: Connection, batch: list[Op]) -> int:
    """Apply `batch` in order inside the caller's transaction; returns the number of sample rows."""
    now = time.time()
    pending: list[dict[str, Any]] = []
    n_samples = 0
    for op in batch:
        if op.kind == "sample":
            pending.append(sample_row(op.payload, now))
            n_samples += 1
            continue
        if pending:  # consecutive samples go in one executemany; order with other kinds is kept
            conn.execute(schema.samples.insert(), pending)
            pending = []
        _APPLY[op.kind](conn, op.payload)
    if pending:
        conn.execute(schema.samples.insert(), pending)
    return n_samples


def sample_row(r: SampleRecord, stored_at: float) -> dict[str, Any]:
    row: dict[str, Any] = {"session_id": r.session_id, "participant_id": r.participant_id, "t": float(r.t),
                           "face_found": bool(r.face_found), "top_label": r.top_label, "confusion": r.confusion,
                           "boredom": r.boredom, "attention": r.attention, "latency_s": r.latency_s,
                           "stored_at": stored_at}
    if r.probs is not None and len(r.probs) != len(schema.PROB_COLUMNS):
        raise ValueError(f"sample has {len(r.probs)} probabilities, expected {len(schema.PROB_COLUMNS)}")
    for i, column in enumerate(schema.PROB_COLUMNS):
        row[column] = float(r.probs[i]) if r.probs is not None else None
    return row


def _participant(conn: Connection, payload: tuple[str, str, str, float]) -> None:
    session_id, participant_id, name, joined_at = payload
    p = schema.participants
    key = (p.c.session_id == session_id) & (p.c.participant_id == participant_id)
    if conn.scalar(select(p.c.participant_id).where(key)) is None:
        conn.execute(p.insert().values(session_id=session_id, participant_id=participant_id, name=name,
                                       joined_at=joined_at, analysis_opt_out=False))
    else:
        # A restarted bot re-announces everyone still in the room: keep the first join, undo a stale leave.
        conn.execute(update(p).where(key).values(left_at=None))


def _left(conn: Connection, payload: tuple[str, str, float]) -> None:
    session_id, participant_id, t = payload
    p = schema.participants
    conn.execute(update(p).where((p.c.session_id == session_id) & (p.c.participant_id == participant_id))
                 .values(left_at=t))


def _opt_out(conn: Connection, payload: tuple[str, str, bool]) -> None:
    session_id, participant_id, opted_out = payload
    p = schema.participants
    conn.execute(update(p).where((p.c.session_id == session_id) & (p.c.participant_id == participant_id))
                 .values(analysis_opt_out=opted_out))


def _alert(conn: Connection, a: AlertRecord) -> None:
    conn.execute(schema.alerts.insert().values(
        alert_id=a.alert_id, session_id=a.session_id, t=float(a.t), level=a.level, kind=a.kind,
        message=a.message, value=float(a.value), participant_id=a.participant_id, name=a.name,
        acknowledged=bool(a.acknowledged)))


def _ack(conn: Connection, payload: tuple) -> None:
    """(alert_id, t) or (alert_id, t, room_id): with a room, only an alert of that room's sessions is marked,
    so a teacher who learns another room's alert id cannot acknowledge it (issue 23)."""
    alert_id, t, *scope = payload
    a = schema.alerts
    which = a.c.alert_id == alert_id
    if scope and scope[0] is not None:
        s = schema.sessions
        which = which & a.c.session_id.in_(select(s.c.session_id).where(s.c.room_id == scope[0]))
    conn.execute(update(a).where(which).values(acknowledged=True, acknowledged_at=t))


def _end_session(conn: Connection, payload: tuple[str, float]) -> None:
    session_id, t = payload
    s = schema.sessions
    # A session keeps its first end (e.g. the teacher's End class, stored by the server, wins over a bot that
    # was away and learns of it later); a bot that resumes a session clears the end first.
    conn.execute(update(s).where((s.c.session_id == session_id) & s.c.ended_at.is_(None)).values(ended_at=t))


_APPLY: dict[str, Callable[[Connection, Any], None]] = {
    "participant": _participant, "left": _left, "opt_out": _opt_out,
    "alert": _alert, "ack": _ack, "end_session": _end_session,
}
