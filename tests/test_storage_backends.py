"""Schema migrations on SQLite and on a real PostgreSQL (started by tests/postgres.py): a database at every
shipped schema version, built from the migration steps themselves, is brought to the current version at
start with its rows intact, and ends up with the same tables as a database created new."""
from __future__ import annotations

import sqlite3
import threading
import time
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Engine

from storage import Repository, schema
from tests.postgres import BACKENDS, postgres_server, url_for  # noqa: F401  (postgres_server: a fixture)
from tests.test_storage import HAPPY, samples

OLD_VERSIONS = list(range(1, schema.SCHEMA_VERSION))


@pytest.fixture(params=BACKENDS)
def url(request, tmp_path) -> str:
    return url_for(request.param, request, tmp_path)


def plain_engine(url: str) -> Engine:
    """An engine that migrates nothing by itself (Repository and create_engine_for migrate on open)."""
    return create_engine(url)


def shape(engine: Engine) -> dict[str, Any]:
    """Tables, their columns and indexes, as the database reports them."""
    inspector = inspect(engine)
    return {table: {"columns": sorted(c["name"] for c in inspector.get_columns(table)),
                    "indexes": sorted(i["name"] for i in inspector.get_indexes(table))}
            for table in sorted(inspector.get_table_names())}


def build_at(url: str, version: int) -> None:
    """A database as version `version` of the code left it, with one class recorded in it."""
    engine = plain_engine(url)
    assert schema.migrate(engine, target=version) == 0
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO rooms VALUES ('old', 'Old class', 'joinkey123', :h, 1.0)"), {"h": "0" * 64})
        conn.execute(text("INSERT INTO sessions (session_id, room_id, started_at, ended_at) "
                          "VALUES ('s-old', 'old', 100.0, NULL)"))
        conn.execute(text("INSERT INTO participants VALUES ('s-old', 'p1', 'Asha', 100.0, NULL, false)"))
        conn.execute(text("INSERT INTO samples (session_id, participant_id, t, face_found, p_happy, top_label) "
                          "VALUES ('s-old', 'p1', 101.0, true, 0.9, 'happy')"))
    assert schema.current_version(engine) == version
    engine.dispose()


@pytest.mark.parametrize("version", OLD_VERSIONS)
def test_a_database_at_each_shipped_version_is_migrated_at_start_with_its_rows(url, version):
    build_at(url, version)
    repo = Repository(url, flush_seconds=0.05)                    # migrates on open
    try:
        assert repo.get_room("old")["title"] == "Old class"
        review = repo.session_review("s-old")
        assert [s["name"] for s in review["students"]] == ["Asha"] and review["students"][0]["samples"] == 1
        # the class goes on after the upgrade: new rows land beside the old ones
        assert repo.resume_or_start_session("old", "s-old") == "s-old"
        repo.add_samples(samples("s-old", "p1", 3, 102.0, HAPPY))
        assert repo.flush() and repo.stats()["lost"] == 0
        assert repo.session_review("s-old")["students"][0]["samples"] == 4
        with repo.engine.connect() as conn:
            versions = list(conn.execute(text("SELECT version FROM schema_version ORDER BY version")).scalars())
            assert conn.execute(text("SELECT COUNT(*) FROM samples WHERE stored_at IS NOT NULL")).scalar() == 3
        assert versions == list(range(1, schema.SCHEMA_VERSION + 1))
    finally:
        repo.close()


def test_migrated_and_new_databases_have_the_same_tables_columns_and_indexes(request, tmp_path, url):
    build_at(url, 1)
    migrated = plain_engine(url)
    assert schema.migrate(migrated) == 1
    (tmp_path / "new").mkdir()
    new_url = url_for("sqlite" if url.startswith("sqlite") else "postgresql", request, tmp_path / "new")
    new = plain_engine(new_url)
    assert schema.migrate(new) == 0
    assert shape(migrated) == shape(new)
    assert shape(new)["samples"]["indexes"] == ["ix_samples_session_t"]   # the obsolete index is gone
    migrated.dispose()
    new.dispose()


def test_migrating_a_current_database_again_changes_nothing(url):
    engine = plain_engine(url)
    assert schema.migrate(engine) == 0
    before = shape(engine)
    assert schema.migrate(engine) == schema.SCHEMA_VERSION
    assert shape(engine) == before and schema.current_version(engine) == schema.SCHEMA_VERSION
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM schema_version")).scalar() == 1
    engine.dispose()


def test_sample_ids_are_64_bit_on_postgresql_after_the_migration(request, tmp_path):
    url = url_for("postgresql", request, tmp_path)
    build_at(url, 3)
    engine = plain_engine(url)
    schema.migrate(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT data_type FROM information_schema.columns "
                                 "WHERE table_name = 'samples' AND column_name = 'id'")).scalar() == "bigint"
        assert conn.execute(text("SELECT data_type FROM information_schema.sequences "
                                 "WHERE sequence_name = 'samples_id_seq'")).scalar() == "bigint"
    engine.dispose()


def test_the_server_and_a_bot_starting_together_migrate_one_database_once(url):
    # The compose file starts both against one PostgreSQL: the migration runs under a lock, not twice.
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            Repository(url).close()
        except BaseException as exc:   # reported below, with the others
            errors.append(exc)
    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    engine = plain_engine(url)
    with engine.connect() as conn:
        assert list(conn.execute(text("SELECT version FROM schema_version")).scalars()) == [schema.SCHEMA_VERSION]
    engine.dispose()


def test_a_connection_opened_while_another_holds_a_new_sqlite_file_waits_instead_of_failing(tmp_path):
    """Switching a new file to WAL needs an exclusive lock that SQLite does not wait for by itself: the server and a
    bot opening one new database together failed with "database is locked" (1 CI run in ~8)."""
    path = tmp_path / "new.sqlite"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("CREATE TABLE first_writer (x INTEGER)")
    modes: list[Any] = []

    def open_it() -> None:
        try:
            engine = schema.create_engine_for(f"sqlite:///{path}", migrate_schema=False)
            with engine.connect() as conn:
                modes.append(conn.exec_driver_sql("PRAGMA journal_mode").scalar())
            engine.dispose()
        except Exception as exc:    # reported by the assertion below
            modes.append(exc)
    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(0.3)
    holder.execute("COMMIT")
    opener.join()
    holder.close()
    assert modes == ["wal"]
