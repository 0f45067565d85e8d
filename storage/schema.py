"""SQLAlchemy schema (rooms, sessions, participants, samples, alerts), the engine factory and migration.

SQLite gets WAL, synchronous=NORMAL, a busy timeout, foreign keys and secure_delete, so that the bot's writer thread
and the server's readers do not block each other; any other SQLAlchemy URL works too. Tables are
created on start and columns an older file lacks are added (forward-only), recorded in schema_version.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from sqlalchemy import (Boolean, Column, Float, ForeignKey, ForeignKeyConstraint, Index, Integer, MetaData,
                        String, Table, Text, create_engine, event, inspect, select, text)
from sqlalchemy.engine import Engine

from core.emotions import EMOTIONS

log = logging.getLogger("classmood.storage")

# 1: first release; 2: samples.stored_at; 3: schema_version.applied_at, foreign keys on new files,
# ix_samples_session_participant dropped.
SCHEMA_VERSION = 3
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
    Column("id", Integer, primary_key=True, autoincrement=True),
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

schema_version = Table(
    "schema_version", metadata,
    Column("version", Integer, primary_key=True),
    Column("applied_at", Float, nullable=True),
)


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA secure_delete=ON")     # erased sessions are overwritten, not left in free pages
        cursor.close()
    return on_connect


def create_engine_for(url: str, busy_timeout_s: float = 5.0, migrate_schema: bool = True) -> Engine:
    """Engine with SQLite tuned for one writer + many readers; schema created/migrated unless told not to."""
    is_sqlite = url.startswith("sqlite")
    connect_args: dict[str, Any] = {"check_same_thread": False, "timeout": busy_timeout_s} if is_sqlite else {}
    engine = create_engine(url, connect_args=connect_args, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas(int(busy_timeout_s * 1000)))
    if migrate_schema:
        migrate(engine)
    return engine


def migrate(engine: Engine) -> int:
    """Create missing tables, add missing columns, record SCHEMA_VERSION; returns the version found before."""
    metadata.create_all(engine)
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            existing = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in existing:
                    continue
                # ALTER TABLE cannot add a NOT NULL column without a default: older rows get NULL.
                kind = column.type.compile(engine.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                log.info("storage: added column %s.%s", table.name, column.name)
            for index in table.indexes:   # create_all skips the indexes of tables that already exist
                index.create(conn, checkfirst=True)
        found = conn.execute(select(schema_version.c.version)).scalars().all()
        before = max(found, default=0)
        if before < 3:
            conn.execute(text("DROP INDEX IF EXISTS ix_samples_session_participant"))
        if before > SCHEMA_VERSION:
            # Forward-only: a newer file still has every column we use, so carry on, but say so.
            log.warning("storage: database schema version %d is newer than this code's %d", before, SCHEMA_VERSION)
        elif SCHEMA_VERSION not in found:
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION, applied_at=time.time()))
    return before


def current_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return max(conn.execute(select(schema_version.c.version)).scalars().all(), default=0)
