"""The post-class review of one session, aggregated in SQL (a 50-student hour is ~360k samples).

Shape: {"session": {session_id, room_id, title, started_at, ended_at}, "emotions": [7 labels],
"bucket_seconds", "timeline": [{t, n, probs[7], confusion, boredom, students}], "alerts": [...],
"students": [{participant_id, name, opted_out, joined_at, left_at, seconds_analysed, samples,
face_share, share{label: share of top label among face samples}, mean_confusion, mean_boredom, alerts}],
"student_series": {participant_id: [{t, confusion, boredom}]}}

Three scans of the session's samples through the (session_id, t) index: one GROUP BY time bucket, one
GROUP BY participant (all label shares in that same pass), one GROUP BY participant and bucket.
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, case, func, select, update
from sqlalchemy.engine import Connection, Engine

from core.emotions import EMOTIONS
from storage import schema

def build_review(conn: Connection, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
    s, r, p, a = schema.sessions, schema.rooms, schema.participants, schema.alerts
    session = conn.execute(select(s, r.c.title).select_from(s.outerjoin(r, r.c.room_id == s.c.room_id))
                           .where(s.c.session_id == session_id)).mappings().first()
    if session is None:
        return None
    bucket_seconds = max(1.0, float(bucket_seconds))
    alerts = [dict(row) for row in
              conn.execute(select(a).where(a.c.session_id == session_id).order_by(a.c.t, a.c.alert_id)).mappings()]
    alert_counts: dict[str, int] = {}
    for alert in alerts:
        if alert["participant_id"]:
            alert_counts[alert["participant_id"]] = alert_counts.get(alert["participant_id"], 0) + 1
    per_student = _per_student(conn, session_id)
    students = []
    for person in conn.execute(select(p).where(p.c.session_id == session_id)
                               .order_by(p.c.joined_at, p.c.participant_id)).mappings():
        pid = person["participant_id"]
        students.append({"participant_id": pid, "name": person["name"],
                         "opted_out": bool(person["analysis_opt_out"]),
                         "joined_at": person["joined_at"], "left_at": person["left_at"],
                         **per_student.get(pid, _no_samples()), "alerts": alert_counts.get(pid, 0)})
    return {"session": {"session_id": session["session_id"], "room_id": session["room_id"],
                        "title": session["title"] or "", "started_at": session["started_at"],
                        "ended_at": session["ended_at"]},
            "emotions": list(EMOTIONS), "bucket_seconds": bucket_seconds,
            "timeline": _timeline(conn, session_id, bucket_seconds), "alerts": alerts, "students": students,
            "student_series": _student_series(conn, session_id, bucket_seconds)}


def _student_series(conn: Connection, session_id: str, bucket_seconds: float) -> dict[str, list[dict[str, Any]]]:
    """Each student's confusion and boredom over time (bucket means of the stored, absolute scores), for
    the review's per-student timeline: {participant_id: [{t, confusion, boredom}, ...]}, oldest first."""
    sm = schema.samples
    bucket = _bucket_index(conn, sm.c.t, bucket_seconds).label("b")
    query = (select(sm.c.participant_id, bucket, func.avg(sm.c.confusion).label("confusion"),
                    func.avg(sm.c.boredom).label("boredom"))
             .where(sm.c.session_id == session_id).group_by(sm.c.participant_id, bucket)
             .order_by(sm.c.participant_id, bucket))
    out: dict[str, list[dict[str, Any]]] = {}
    for row in conn.execute(query).mappings():
        out.setdefault(row["participant_id"], []).append(
            {"t": float(row["b"]) * bucket_seconds, "confusion": _round(row["confusion"]),
             "boredom": _round(row["boredom"])})
    return out


def _timeline(conn: Connection, session_id: str, bucket_seconds: float) -> list[dict[str, Any]]:
    sm = schema.samples
    bucket = _bucket_index(conn, sm.c.t, bucket_seconds).label("b")
    query = (select(bucket, func.sum(case((sm.c.face_found.is_(True), 1), else_=0)).label("n"),
                    *[func.avg(sm.c[c]).label(c) for c in schema.PROB_COLUMNS],   # AVG skips no-face NULLs
                    func.avg(sm.c.confusion).label("confusion"), func.avg(sm.c.boredom).label("boredom"),
                    func.count(func.distinct(sm.c.participant_id)).label("students"))
             .where(sm.c.session_id == session_id).group_by(bucket).order_by(bucket))
    return [{"t": float(row["b"]) * bucket_seconds, "n": int(row["n"] or 0),
             "probs": [_round(row[c]) for c in schema.PROB_COLUMNS],
             "confusion": _round(row["confusion"]), "boredom": _round(row["boredom"]),
             "students": int(row["students"])} for row in conn.execute(query).mappings()]


def _per_student(conn: Connection, session_id: str) -> dict[str, dict[str, Any]]:
    sm = schema.samples
    face = sm.c.face_found.is_(True)
    label_counts = [func.sum(case((face & (sm.c.top_label == label), 1), else_=0)).label(f"n_{label}")
                    for label in EMOTIONS]
    query = (select(sm.c.participant_id, func.count().label("samples"),
                    func.sum(case((face, 1), else_=0)).label("faces"),
                    func.min(sm.c.t).label("first"), func.max(sm.c.t).label("last"),
                    func.avg(sm.c.confusion).label("confusion"), func.avg(sm.c.boredom).label("boredom"),
                    *label_counts)
             .where(sm.c.session_id == session_id).group_by(sm.c.participant_id))
    out: dict[str, dict[str, Any]] = {}
    for row in conn.execute(query).mappings():
        n, faces = int(row["samples"]), int(row["faces"] or 0)
        labelled = sum(int(row[f"n_{label}"] or 0) for label in EMOTIONS)
        out[row["participant_id"]] = {
            "seconds_analysed": round(float(row["last"] - row["first"]), 1),   # approx: first to last sample
            "samples": n, "face_share": round(faces / n, 4),
            "share": {label: round(int(row[f"n_{label}"] or 0) / labelled, 4) if labelled else 0.0
                      for label in EMOTIONS},
            "mean_confusion": _round(row["confusion"]), "mean_boredom": _round(row["boredom"])}
    return out


def _no_samples() -> dict[str, Any]:
    return {"seconds_analysed": 0.0, "samples": 0, "face_share": None,
            "share": {label: 0.0 for label in EMOTIONS}, "mean_confusion": None, "mean_boredom": None}


def _bucket_index(conn: Connection, t: Any, bucket_seconds: float) -> Any:
    # floor(t / b) in SQL: SQLite's CAST truncates (the same for positive epochs) and floor() is an
    # optional SQLite build feature; other databases' CAST rounds, so they get floor().
    if conn.dialect.name == "sqlite":
        return func.cast(t / bucket_seconds, Integer)
    return func.floor(t / bucket_seconds)


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


# ---- the teacher page's alert feed and the End class button ------------------------------------------
ALERT_FIELDS = ("alert_id", "t", "level", "kind", "message", "value", "participant_id", "name",
                "acknowledged", "acknowledged_at")


def session_alerts(conn: Connection, session_id: str) -> list[dict[str, Any]]:
    """The session's alerts, oldest first, in the live alert message's shape plus acknowledged_at."""
    a = schema.alerts
    rows = conn.execute(select(*[a.c[f] for f in ALERT_FIELDS]).where(a.c.session_id == session_id)
                        .order_by(a.c.t, a.c.alert_id)).mappings()
    return [{**dict(row), "session_id": session_id, "acknowledged": bool(row["acknowledged"])} for row in rows]


def finish_session(engine: Engine, session_id: str, ended_at: float) -> bool:
    """End a session that has no end yet at `ended_at`; True when it did."""
    s = schema.sessions
    with engine.begin() as conn:
        done = conn.execute(update(s).where((s.c.session_id == session_id) & s.c.ended_at.is_(None))
                            .values(ended_at=float(ended_at)))
    return bool(done.rowcount)
