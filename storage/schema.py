"""SQLAlchemy schema (rooms, sessions, participants, samples, alerts) and the engine factory.

SQLite gets WAL, synchronous=NORMAL and a busy timeout so that the bot's writer thread and the server's
readers do not block each other; any other SQLAlchemy URL works too. Tables are created on start and
missing columns are added (a forward-only migration), recorded in schema_version.
"""
from __future__ import annotations

from sqlalchemy import (Boolean, Column, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text,
                        create_engine, event, inspect, text)
from sqlalchemy.engine import Engine

from core.emotions import EMOTIONS

SCHEMA_VERSION = 2
PROB_COLUMNS = [f"p_{name}" for name in EMOTIONS]

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
    Index("ix_samples_session_t", "session_id", "t"),
    Index("ix_samples_session_participant", "session_id", "participant_id"),
)

alerts = Table(
    "alerts", metadata,
    Column("alert_id", String(64), primary_key=True),
    Column("session_id", String(64), nullable=False),
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
)


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def create_engine_for(url: str) -> Engine:
    """Engine with SQLite tuned for one writer + many readers; schema created/migrated."""
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 5} if is_sqlite else {},
                           pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    migrate(engine)
    return engine


def migrate(engine: Engine) -> None:
    metadata.create_all(engine)
    inspector = inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            existing = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in existing:  # forward-only: add what an older file lacks
                    kind = column.type.compile(engine.dialect)
                    conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
        current = conn.execute(schema_version.select()).scalars().all()
        if SCHEMA_VERSION not in current:
            conn.execute(schema_version.delete())
            conn.execute(schema_version.insert().values(version=SCHEMA_VERSION))
