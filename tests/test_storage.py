"""Storage keeps every accepted row: batched writes, a locked database, a full disk, a restart."""
from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.records import AlertRecord, SampleRecord
from storage import Repository

PROJECT = Path(__file__).resolve().parent.parent
HAPPY = (0.0, 0.0, 0.0, 0.7, 0.1, 0.1, 0.1)
SAD = (0.1, 0.0, 0.1, 0.0, 0.7, 0.0, 0.1)


def count(db: Path, table: str) -> int:
    con = sqlite3.connect(db)
    try:
        return con.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        con.close()


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "classmood.sqlite"


def new_session(repo: Repository, room: str = "room1", people=("p1",)) -> str:
    repo.create_room(room, "Maths", "key", "0" * 64)
    sid = repo.start_session(room)
    for p in people:
        repo.add_participant(sid, p, p.upper())
    return sid


def samples(sid: str, pid: str, n: int, t0: float, probs=HAPPY, face: bool = True) -> list[SampleRecord]:
    return [SampleRecord(sid, pid, t0 + i * 0.5, face, probs if face else None, 0.2, 0.1, 0.9, 0.01) for i in range(n)]


def test_rows_accepted_before_close_are_all_in_the_file(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.05)
    sid = new_session(repo, people=("p1", "p2"))
    repo.add_samples(samples(sid, "p1", 300, 1000.0))
    repo.add_samples(samples(sid, "p2", 200, 1000.0, SAD))
    repo.add_alert(AlertRecord("a1", sid, 1010.0, "student", "confusion", "P2 seems confused for 20 s", 0.6, "p2", "P2"))
    repo.close()
    assert count(db, "samples") == 500 and count(db, "alerts") == 1 and count(db, "participants") == 2
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT top_label FROM samples WHERE participant_id='p2' LIMIT 1").fetchone()[0] == "sad"
    con.close()


def test_writer_survives_a_locked_database_and_loses_nothing(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.05)
    sid = new_session(repo)
    repo.flush()
    blocker = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    repo.add_samples(samples(sid, "p1", 50, 2000.0))
    time.sleep(7.0)  # longer than the 5 s busy timeout: the writer must fail and keep the rows
    assert repo.stats()["pending"] == 50 and repo.stats()["write_errors"] >= 1
    blocker.execute("COMMIT")
    blocker.close()
    assert repo.flush(timeout=15)
    repo.close()
    assert count(db, "samples") == 50
    assert repo.stats()["lost"] == 0


def test_a_full_disk_keeps_rows_pending_and_recovers_when_space_returns(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.05)
    sid = new_session(repo)
    repo.add_samples(samples(sid, "p1", 10, 3000.0))
    repo.flush()
    con = sqlite3.connect(db)
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    # SQLite's max_page_count is per connection: cap the repository's own connections to simulate ENOSPC.
    from sqlalchemy import event
    cap = {"pages": pages}

    @event.listens_for(repo.engine, "connect")
    def _cap(dbapi_connection, _record):
        dbapi_connection.execute(f"PRAGMA max_page_count={cap['pages']}")
    repo.engine.dispose()
    repo.add_samples(samples(sid, "p1", 2000, 4000.0))
    deadline = time.time() + 10
    while repo.stats()["write_errors"] == 0 and time.time() < deadline:
        time.sleep(0.1)
    assert repo.stats()["write_errors"] >= 1
    assert "full" in (repo.stats()["last_error"] or "").lower()
    assert repo.stats()["pending"] == 2000
    cap["pages"] = 1_000_000          # space returns
    repo.engine.dispose()
    assert repo.flush(timeout=20)
    repo.close()
    assert count(db, "samples") == 2010 and repo.stats()["lost"] == 0


def test_past_the_memory_cap_the_oldest_rows_are_dropped_and_counted(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.05, max_pending_rows=100)
    sid = new_session(repo)
    repo.flush()
    blocker = sqlite3.connect(db, timeout=0.1, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    repo.add_samples(samples(sid, "p1", 150, 5000.0))
    assert repo.stats()["lost"] == 50
    blocker.execute("COMMIT")
    blocker.close()
    repo.close()
    assert count(db, "samples") == 100


def test_review_aggregates_buckets_and_students(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.05)
    sid = new_session(repo, people=("p1", "p2"))
    repo.add_samples(samples(sid, "p1", 20, 10_000.0, HAPPY))          # 10 s of happy faces
    repo.add_samples(samples(sid, "p2", 10, 10_000.0, SAD))            # 5 s sad ...
    repo.add_samples(samples(sid, "p2", 10, 10_005.0, face=False))     # ... then 5 s no face
    repo.add_alert(AlertRecord("a1", sid, 10_004.0, "student", "confusion", "P2 seems confused", 0.7, "p2", "P2"))
    repo.flush()
    review = repo.session_review(sid, bucket_seconds=10)
    repo.close()
    assert review["emotions"][3] == "happy"
    first = review["timeline"][0]
    assert first["t"] == 10_000.0 and first["students"] == 2 and first["n"] == 30
    assert first["probs"][3] == pytest.approx(0.7 * 20 / 30, abs=1e-3)      # happy mean over face samples
    by_name = {s["name"]: s for s in review["students"]}
    assert by_name["P1"]["share"]["happy"] == 1.0 and by_name["P1"]["face_share"] == 1.0
    assert by_name["P2"]["share"]["sad"] == 1.0 and by_name["P2"]["face_share"] == 0.5
    assert by_name["P2"]["alerts"] == 1 and by_name["P1"]["alerts"] == 0
    assert by_name["P1"]["seconds_analysed"] == pytest.approx(9.5)


def test_a_restarted_bot_continues_the_open_session(db):
    repo = Repository(f"sqlite:///{db}")
    sid = new_session(repo)
    assert repo.resume_or_start_session("room1", sid) == sid
    assert repo.resume_or_start_session("room1", "unknown") != sid
    repo.end_session(sid)
    assert repo.resume_or_start_session("room1", sid) == sid      # a bot restart right after shutdown
    repo.end_session(sid)
    repo.flush()
    assert repo.resume_or_start_session("room1", sid, grace_seconds=0) != sid   # a long-ended class is not reopened
    assert repo.resume_or_start_session("other", sid) != sid      # never another room's session
    repo.close()


def test_export_cli_writes_csv_and_rejects_unknown_sessions(db, tmp_path):
    repo = Repository(f"sqlite:///{db}")
    sid = new_session(repo)
    repo.add_samples(samples(sid, "p1", 4, 20_000.0))
    repo.close()
    out = tmp_path / "export"
    ok = subprocess.run([sys.executable, "-m", "storage.export", "--db", str(db), "--session", sid, "--out", str(out)],
                        cwd=PROJECT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    lines = (out / "samples.csv").read_text().splitlines()
    assert lines[0].startswith("time_iso,t,participant_id,name,face_found,angry") and len(lines) == 5
    assert (out / "alerts.csv").read_text().startswith("time_iso,t,level")
    bad = subprocess.run([sys.executable, "-m", "storage.export", "--db", str(db), "--session", "nope", "--out", str(out)],
                         cwd=PROJECT, capture_output=True, text=True)
    assert bad.returncode == 2 and "no session" in bad.stderr and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "storage.export", "--db", str(tmp_path / "none.sqlite"), "--list"],
                             cwd=PROJECT, capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_writes_from_many_threads_keep_their_order_per_participant(db):
    repo = Repository(f"sqlite:///{db}", flush_seconds=0.02)
    sid = new_session(repo, people=tuple(f"p{i}" for i in range(8)))

    def writer(i: int) -> None:
        for k in range(50):
            repo.add_samples(samples(sid, f"p{i}", 1, 30_000.0 + k))
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    repo.close()
    assert count(db, "samples") == 400
