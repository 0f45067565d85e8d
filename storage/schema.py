"""SQLAlchemy schema (rooms, sessions, participants, samples, alerts), the engine factory and migration.

Two databases are supported and tested: SQLite (the default; WAL, synchronous=NORMAL, a busy timeout, foreign keys
and secure_delete, so that the bot's writer thread and the server's readers do not block each other) and
PostgreSQL (`postgresql+psycopg://...`, the compose deployment). Migrations are versioned steps applied at start
(`migrate`): an empty database is created at the current version, an older one runs the steps after its version,
each recorded in schema_version.
"""
from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any, Callable

from sqlalchemy import (BigInteger, Boolean, Column, Float, ForeignKey, ForeignKeyConstraint, Index, Integer, MetaData,
                        String, Table, Text, create_engine, event, inspect, select, text)
from sqlalchemy.engine import Connection, Engine

from core.emotions import EMOTIONS

log = logging.getLogger("classmood.storage")

# 1: first release; 2: samples.stored_at; 3: schema_version.applied_at, foreign keys on new files,
# ix_samples_session_participant dropped; 4: on PostgreSQL samples.id is a BIGINT (see MIGRATIONS);
# 5: room_assignments (which bot worker holds which room, under a lease: docs/scaling.md).
SCHEMA_VERSION = 5
PROB_COLUMNS: list[str] = [f"p_{name}" for name in EMOTIONS]

metadata = MetaData()

rooms = Table(
    "rooms", metadata,
    Column("room_id", String(64), primary_key=True),
    Column("title", String(200), nullable=False, default=""),
    Column("join_key", String(128), nullable=False),
    Column("teacher_token_hash", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

sessions = Table(
    "sessions", metadata,
    Column("session_id", String(64), primary_key=True),
    Column("room_id", String(64), ForeignKey("rooms.room_id"), nullable=False, index=True),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=True),
)

# The bot's participant_id is the WebRTC peer id: unique within a session, not across sessions,
# hence the composite key.
participants = Table(
    "participants", metadata,
    Column("session_id", String(64), ForeignKey("sessions.session_id"), primary_key=True),
    Column("participant_id", String(64), primary_key=True),
    Column("name", String(120), nullable=False),
    Column("joined_at", Float, nullable=False),
    Column("left_at", Float, nullable=True),
    Column("analysis_opt_out", Boolean, nullable=False, default=False),
)

samples = Table(
    "samples", metadata,
    # 64-bit on PostgreSQL: a school's 100 classes a day reach 2^31 ids in weeks, and erasing rows does not
    # rewind the sequence. SQLite keeps INTEGER: only `INTEGER PRIMARY KEY` is its rowid (already 64-bit).
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("session_id", String(64), nullable=False),
    Column("participant_id", String(64), nullable=False),
    Column("t", Float, nullable=False),
    Column("face_found", Boolean, nullable=False),
    *[Column(name, Float, nullable=True) for name in PROB_COLUMNS],
    Column("top_label", String(16), nullable=True),
    Column("confusion", Float, nullable=True),
    Column("boredom", Float, nullable=True),
    Column("attention", Float, nullable=True),
    Column("latency_s", Float, nullable=True),
    Column("stored_at", Float, nullable=True),     # when the writer committed the row (frame-to-row latency)
    ForeignKeyConstraint(["session_id", "participant_id"],
                         ["participants.session_id", "participants.participant_id"]),
    # The only samples index: the review reads a session in time order, which walks the table pages once
    # (rows arrive in time order). A (session_id, participant_id) index tempted SQLite into revisiting
    # every page once per student (2-3x slower review) and cost every insert; version 3 drops it.
    Index("ix_samples_session_t", "session_id", "t"),
)

alerts = Table(
    "alerts", metadata,
    Column("alert_id", String(64), primary_key=True),
    Column("session_id", String(64), ForeignKey("sessions.session_id"), nullable=False),
    Column("t", Float, nullable=False),
    Column("level", String(16), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("message", Text, nullable=False),
    Column("value", Float, nullable=False),
    Column("participant_id", String(64), nullable=True),
    Column("name", String(120), nullable=True),
    Column("acknowledged", Boolean, nullable=False, default=False),
    Column("acknowledged_at", Float, nullable=True),
    Index("ix_alerts_session_t", "session_id", "t"),
)

# Which bot worker holds which room. The worker renews its lease (lease_until, epoch seconds) while it serves
# the room; a lease that runs out (the worker died) is claimed by a server for another worker, which continues
# session_id. In the database, not in a server's memory, so a restarted or second server sees the same ones.
room_assignments = Table(
    "room_assignments", metadata,
    Column("room_id", String(64), primary_key=True),
    Column("worker_id", String(64), nullable=False),
    Column("session_id", String(64), nullable=True),
    Column("students", Integer, nullable=False, default=0),     # analysed students: the worker's load
    Column("lease_until", Float, nullable=False),
    Column("assigned_at", Float, nullable=False),
)

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=True),
)


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # Turning a file's rollback journal into WAL needs an exclusive lock, and SQLite does not wait for that
        # one: a connection opened while another (the server, a bot starting beside it) holds a lock on a new
        # database failed at once with "database is locked". Retry within the busy timeout; once one connection
        # has switched, the others find WAL on already.
        deadline = time.monotonic() + busy_timeout_ms / 1000
        while True:
            try:
                cursor.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.02)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")     # erased sessions are overwritten, not left in free pages
        cursor.close()
    return on_connect


def create_engine_for(url: str, busy_timeout_s: float = 5.0, migrate_schema: bool = True) -> Engine:
    """Engine with SQLite tuned for one writer + many readers; schema created/migrated unless told not to."""
    is_sqlite = url.startswith("sqlite")
    connect_args: dict[str, Any] = {}
    if is_sqlite:
        connect_args = {"check_same_thread": False, "timeout": busy_timeout_s}
    elif url.startswith("postgresql"):
        # PostgreSQL's counterpart of SQLite's busy timeout: a statement waits this long for a lock, then fails
        # (the writer keeps its rows and retries) instead of stalling without a word; an unreachable server
        # is an error after 10 s rather than a hang.
        connect_args = {"options": f"-c lock_timeout={int(busy_timeout_s * 1000)}", "connect_timeout": 10}
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas(int(busy_timeout_s * 1000)))
    if migrate_schema:
        migrate(engine)
    return engine


# ---- migrations ---------------------------------------------------------------------------------------
# Step N brings a database from version N-1 to N, on SQLite and PostgreSQL alike; steps are never edited
# once shipped (a database in the field is at one of them). Step 1 builds the first release's tables.

def _v1_tables() -> MetaData:
    """The tables of version 1, frozen (the live definitions above move on)."""
    m = MetaData()
    Table("rooms", m, *_columns(rooms))
    Table("sessions", m, *_columns(sessions))
    Table("participants", m, *_columns(participants))
    Table("samples", m, Column("id", Integer, primary_key=True, autoincrement=True),
          *[c for c in _columns(samples) if c.name not in ("id", "stored_at")],
          Index("ix_samples_session_t", "session_id", "t"),
          Index("ix_samples_session_participant", "session_id", "participant_id"))
    Table("alerts", m, *[Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                         for c in alerts.columns], Index("ix_alerts_session_t", "session_id", "t"))
    Table("schema_version", m, Column("version", Integer, primary_key=True))
    return m


def _columns(table: Table) -> list[Column[Any]]:
    return [c._copy() for c in table.columns]


def _step_1(conn: Connection) -> None:
    _v1_tables().create_all(conn)


def _step_2(conn: Connection) -> None:
    _add_column(conn, samples.c.stored_at)


def _step_3(conn: Connection) -> None:
    _add_column(conn, schema_version.c.applied_at)
    # Foreign keys cannot be added to an existing SQLite table; files created from version 3 on have them.
    conn.execute(text("DROP INDEX IF EXISTS ix_samples_session_participant"))


def _step_4(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # The column and the SERIAL's sequence (created AS integer, whose MAXVALUE follows the new type).
        conn.execute(text("ALTER TABLE samples ALTER COLUMN id TYPE BIGINT"))
        conn.execute(text("ALTER SEQUENCE IF EXISTS samples_id_seq AS BIGINT"))


def _step_5(conn: Connection) -> None:
    # The columns spelled out: a later version may change the live definition, never what step 5 created.
    m = MetaData()
    Table("room_assignments", m, Column("room_id", String(64), primary_key=True),
          Column("worker_id", String(64), nullable=False), Column("session_id", String(64), nullable=True),
          Column("students", Integer, nullable=False, default=0), Column("lease_until", Float, nullable=False),
          Column("assigned_at", Float, nullable=False)).create(conn, checkfirst=True)


MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _step_1, 2: _step_2, 3: _step_3, 4: _step_4,
                                                       5: _step_5}
assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1)), "one migration step per version"


def _add_column(conn: Connection, column: Column[Any]) -> None:
    """ALTER TABLE ... ADD COLUMN, nullable (ALTER cannot add NOT NULL without a default: older rows get NULL)."""
    table = column.table.name
    if column.name in {c["name"] for c in inspect(conn).get_columns(table)}:
        return
    kind = column.type.compile(conn.dialect)
    conn.execute(text(f'ALTER TABLE {table} ADD COLUMN "{column.name}" {kind}'))
    log.info("storage: added column %s.%s", table, column.name)


# Any constant: the key of PostgreSQL's advisory lock that serialises migrations (the server and the bot
# worker of the compose file start at the same time against one database; SQLite: BEGIN IMMEDIATE).
_MIGRATION_LOCK = 0x636C6D64


def migrate(engine: Engine, target: int = SCHEMA_VERSION) -> int:
    """Bring the database to `target` (the current version by default) in one transaction; returns the
    version found before (0: an empty database, created at `target` directly when that is current)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        elif conn.dialect.name == "sqlite":
            # The write lock before looking: Python's sqlite3 starts no transaction for DDL by itself, and two
            # processes opening one new file would both create the tables.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        tables = set(inspect(conn).get_table_names())
        if "schema_version" in tables:
            before = max(conn.execute(select(schema_version.c.version)).scalars().all(), default=1)
        else:
            before = 1 if "rooms" in tables else 0   # tables without a version: the first release's
        if before > SCHEMA_VERSION:
            # Forward-only: a newer database still has every column we use, so carry on, but say so.
            log.warning("storage: database schema version %d is newer than this code's %d", before, SCHEMA_VERSION)
            return before
        if before == 0 and target == SCHEMA_VERSION:
            metadata.create_all(conn)
            steps = [SCHEMA_VERSION]
        else:
            steps = list(range(before + 1, target + 1))
            for version in steps:
                MIGRATIONS[version](conn)
                if version > 1:
                    log.info("storage: migrated the database to schema version %d", version)
        has_applied_at = "applied_at" in {c["name"] for c in inspect(conn).get_columns("schema_version")}
        for version in steps:
            values: dict[str, Any] = {"version": version}
            if has_applied_at:
                values["applied_at"] = time.time()
            conn.execute(schema_version.insert().values(**values))
    return before


def current_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return max(conn.execute(select(schema_version.c.version)).scalars().all(), default=0)
