"""The post-class review of one session, aggregated in SQL (a 50-student hour is ~360k samples).

Shape: {"session", "emotions", "timeline": [{t, n, probs[7], confusion, boredom, students}],
"alerts": [...], "students": [{participant_id, name, seconds_analysed, samples, face_share,
share{label: share of top label}, mean_confusion, mean_boredom, alerts}]}
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.engine import Connection

from core.emotions import EMOTIONS
from storage import schema


def build_review(conn: Connection, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
    s, r, p, sm, a = schema.sessions, schema.rooms, schema.participants, schema.samples, schema.alerts
    session = conn.execute(select(s, r.c.title).select_from(s.outerjoin(r, r.c.room_id == s.c.room_id))
                           .where(s.c.session_id == session_id)).mappings().first()
    if session is None:
        return None
    bucket_seconds = max(1.0, float(bucket_seconds))
    bucket = func.cast(sm.c.t / bucket_seconds, schema.Integer)
    face = sm.c.face_found.is_(True)
    timeline_rows = conn.execute(
        select(bucket.label("b"), func.count().label("all"), func.sum(case((face, 1), else_=0)).label("n"),
               *[func.avg(sm.c[c]).label(c) for c in schema.PROB_COLUMNS],
               func.avg(sm.c.confusion).label("confusion"), func.avg(sm.c.boredom).label("boredom"),
               func.count(func.distinct(sm.c.participant_id)).label("students"))
        .where(sm.c.session_id == session_id).group_by("b").order_by("b")).mappings().all()
    timeline = [{"t": row["b"] * bucket_seconds, "n": int(row["n"] or 0),
                 "probs": [_round(row[c]) for c in schema.PROB_COLUMNS],
                 "confusion": _round(row["confusion"]), "boredom": _round(row["boredom"]),
                 "students": int(row["students"])} for row in timeline_rows]

    alerts = [dict(row) for row in conn.execute(select(a).where(a.c.session_id == session_id).order_by(a.c.t)).mappings()]
    alert_counts: dict[str, int] = {}
    for alert in alerts:
        if alert["participant_id"]:
            alert_counts[alert["participant_id"]] = alert_counts.get(alert["participant_id"], 0) + 1

    per_student = {row["participant_id"]: row for row in conn.execute(
        select(sm.c.participant_id, func.count().label("samples"),
               func.sum(case((face, 1), else_=0)).label("faces"),
               func.min(sm.c.t).label("first"), func.max(sm.c.t).label("last"),
               func.avg(sm.c.confusion).label("confusion"), func.avg(sm.c.boredom).label("boredom"))
        .where(sm.c.session_id == session_id).group_by(sm.c.participant_id)).mappings()}
    labels: dict[str, dict[str, int]] = {}
    for row in conn.execute(select(sm.c.participant_id, sm.c.top_label, func.count().label("n"))
                            .where((sm.c.session_id == session_id) & face).group_by(sm.c.participant_id, sm.c.top_label)):
        labels.setdefault(row.participant_id, {})[row.top_label] = int(row.n)

    students = []
    for person in conn.execute(select(p).where(p.c.session_id == session_id).order_by(p.c.joined_at)).mappings():
        pid = person["participant_id"]
        stats = per_student.get(pid)
        counts = labels.get(pid, {})
        faces = sum(counts.values())
        n = int(stats["samples"]) if stats else 0
        students.append({
            "participant_id": pid, "name": person["name"], "opted_out": bool(person["analysis_opt_out"]),
            "joined_at": person["joined_at"], "left_at": person["left_at"],
            "seconds_analysed": round(float(stats["last"] - stats["first"]), 1) if stats else 0.0,
            "samples": n, "face_share": round(int(stats["faces"] or 0) / n, 4) if n else None,
            "share": {label: round(counts.get(label, 0) / faces, 4) if faces else 0.0 for label in EMOTIONS},
            "mean_confusion": _round(stats["confusion"]) if stats else None,
            "mean_boredom": _round(stats["boredom"]) if stats else None,
            "alerts": alert_counts.get(pid, 0),
        })
    return {"session": {"session_id": session["session_id"], "room_id": session["room_id"],
                        "title": session["title"] or "", "started_at": session["started_at"],
                        "ended_at": session["ended_at"]},
            "emotions": list(EMOTIONS), "bucket_seconds": bucket_seconds, "timeline": timeline,
            "alerts": alerts, "students": students}


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)
