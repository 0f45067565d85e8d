"""Room assignments: which bot worker holds which room, under a lease (table room_assignments, schema 5).

The worker that serves a room renews its lease in the database every few seconds (it writes samples to
the same database anyway); a server claims rooms whose lease ran out and invites another worker, which
continues the room's session. Claims are atomic on both databases, so two servers (or two housekeeping
rounds) never hand one room to two workers:
- PostgreSQL: `SELECT ... FOR UPDATE SKIP LOCKED` picks an expired row nobody else is claiming right now;
- SQLite (one writer at a time): a conditional `UPDATE ... WHERE lease_until < now`, whose row count says
  whether this caller won.
"""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from storage import schema

a = schema.room_assignments


def assign(engine: Engine, room_id: str, worker_id: str, lease_until: float, session_id: str | None = None) -> None:
    """Give the room to `worker_id` until `lease_until` (an invite), whoever held it before."""
    values: dict[str, Any] = {"worker_id": worker_id, "lease_until": lease_until, "assigned_at": time.time()}
    if session_id is not None:
        values["session_id"] = session_id
    for _ in range(2):      # a concurrent first insert by another server: then it is an update
        try:
            with engine.begin() as conn:
                if conn.execute(update(a).where(a.c.room_id == room_id).values(**values)).rowcount == 0:
                    conn.execute(insert(a).values(room_id=room_id, students=0, **values))
            return
        except IntegrityError:
            continue


def claim_expired(engine: Engine, worker_id: str, now: float, lease_until: float) -> dict[str, Any] | None:
    """Atomically take one room whose lease ended before `now` for `worker_id` (lease until `lease_until`);
    the row as it was before (its previous worker and session), or None when no lease has expired."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            row = conn.execute(select(a).where(a.c.lease_until < now).order_by(a.c.lease_until).limit(1)
                               .with_for_update(skip_locked=True)).mappings().first()
            if row is None:
                return None
            conn.execute(update(a).where(a.c.room_id == row["room_id"])
                         .values(worker_id=worker_id, lease_until=lease_until, assigned_at=time.time()))
            return dict(row)
        candidates = conn.execute(select(a).where(a.c.lease_until < now).order_by(a.c.lease_until)
                                  .limit(8)).mappings().all()
        for row in candidates:
            won = conn.execute(update(a).where((a.c.room_id == row["room_id"]) & (a.c.lease_until < now))
                               .values(worker_id=worker_id, lease_until=lease_until, assigned_at=time.time()))
            if won.rowcount == 1:
                return dict(row)
    return None


def renew(engine: Engine, worker_id: str, rooms: dict[str, tuple[str | None, int]], lease_until: float) -> list[str]:
    """Extend `worker_id`'s leases of `rooms` ({room_id: (session_id, analysed students)}); returns the rooms
    another worker holds now (this one must leave them). A room with no assignment (released, never invited)
    is not claimed here."""
    lost: list[str] = []
    with engine.begin() as conn:
        for room_id, (session_id, students) in rooms.items():
            values: dict[str, Any] = {"lease_until": lease_until, "students": int(students)}
            if session_id is not None:
                values["session_id"] = session_id
            done = conn.execute(update(a).where((a.c.room_id == room_id) & (a.c.worker_id == worker_id))
                                .values(**values))
            if done.rowcount == 0 and conn.scalar(select(a.c.worker_id).where(a.c.room_id == room_id)) is not None:
                lost.append(room_id)
    return lost


def release(engine: Engine, room_id: str, worker_id: str | None = None) -> bool:
    """The class is over: nobody is to be invited to the room again (only `worker_id`'s hold, when given)."""
    which = a.c.room_id == room_id
    if worker_id is not None:
        which = which & (a.c.worker_id == worker_id)
    with engine.begin() as conn:
        return bool(conn.execute(delete(a).where(which)).rowcount)


def expire(engine: Engine, worker_id: str) -> int:
    """End every lease of `worker_id` now (a worker shutting down on purpose): its rooms go to other
    workers at the next housekeeping round instead of after a whole lease."""
    with engine.begin() as conn:
        return int(conn.execute(update(a).where(a.c.worker_id == worker_id).values(lease_until=0.0)).rowcount)


def get(engine: Engine, room_id: str | None = None) -> list[dict[str, Any]]:
    query = select(a).order_by(a.c.room_id)
    if room_id is not None:
        query = query.where(a.c.room_id == room_id)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
