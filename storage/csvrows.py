"""CSV exports of a session's samples and alerts, streamed as text lines (header first).

Rows are read in pages by (t, id): each page is its own short read, so a slow download never holds
a database snapshot open (under WAL a long-lived reader stops checkpoints and the WAL file grows).
"""
from __future__ import annotations

import csv
import io
import time
from typing import Any, Iterator

from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Engine

from core.emotions import EMOTIONS
from storage import schema

PAGE_ROWS = 5000
SAMPLES_HEADER = ["time_iso", "t", "participant_id", "name", "face_found", *EMOTIONS, "top_label",
                  "confusion", "boredom", "attention"]
ALERTS_HEADER = ["time_iso", "t", "level", "kind", "participant_id", "name", "value", "message", "acknowledged"]


def iter_samples_csv(engine: Engine, session_id: str) -> Iterator[str]:
    s, p = schema.samples, schema.participants
    yield csv_line(SAMPLES_HEADER)
    with engine.connect() as conn:
        names = {pid: name for pid, name in
                 conn.execute(select(p.c.participant_id, p.c.name).where(p.c.session_id == session_id))}
    columns = [s.c.id, s.c.t, s.c.participant_id, s.c.face_found, *[s.c[c] for c in schema.PROB_COLUMNS],
               s.c.top_label, s.c.confusion, s.c.boredom, s.c.attention]
    for row in _pages(engine, select(*columns).where(s.c.session_id == session_id), s):
        yield csv_line([iso_time(row["t"]), f"{row['t']:.3f}", row["participant_id"],
                        text(names.get(row["participant_id"], "")), int(bool(row["face_found"])),
                        *[num(row[c]) for c in schema.PROB_COLUMNS], row["top_label"] or "",
                        num(row["confusion"]), num(row["boredom"]), num(row["attention"])])


def iter_alerts_csv(engine: Engine, session_id: str) -> Iterator[str]:
    a = schema.alerts
    yield csv_line(ALERTS_HEADER)
    with engine.connect() as conn:
        rows = conn.execute(select(a).where(a.c.session_id == session_id).order_by(a.c.t, a.c.alert_id)).mappings().all()
    for row in rows:   # a class produces tens of alerts an hour: one read is fine
        yield csv_line([iso_time(row["t"]), f"{row['t']:.3f}", row["level"], row["kind"], row["participant_id"] or "",
                        text(row["name"] or ""), num(row["value"]), text(row["message"]),
                        int(bool(row["acknowledged"]))])


def _pages(engine: Engine, query: Any, table: Any) -> Iterator[Any]:
    last: tuple[float, int] | None = None
    while True:
        page_query = query
        if last is not None:
            # `t >= last` first: a plain range the (session_id, t) index can seek to; the OR only breaks ties.
            page_query = query.where(and_(table.c.t >= last[0], or_(table.c.t > last[0], table.c.id > last[1])))
        with engine.connect() as conn:
            page = conn.execute(page_query.order_by(table.c.t, table.c.id).limit(PAGE_ROWS)).mappings().all()
        yield from page
        if len(page) < PAGE_ROWS:
            return
        last = (page[-1]["t"], page[-1]["id"])


def csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def text(value: str) -> str:
    """Free text (a student's name, an alert message) as a cell no spreadsheet runs as a formula.

    Names come from students' browsers: `=HYPERLINK(...)` in a name would otherwise become a live formula
    in the teacher's spreadsheet (CSV injection); a leading apostrophe keeps it plain text.
    """
    return "'" + value if value.startswith(FORMULA_STARTS) else value


def iso_time(t: float) -> str:
    """UTC ISO 8601 with milliseconds, e.g. 2024-05-01T09:30:00.250Z."""
    whole, ms = divmod(int(round(t * 1000)), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def num(value: Any) -> str:
    return "" if value is None else f"{float(value):.4f}"
