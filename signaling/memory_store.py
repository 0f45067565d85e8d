"""A dict-backed Store for running the server alone (`python -m signaling`) and for tests.

Implements signaling.store.Store. Nothing is persisted: rooms and sessions live as long as the process.
Tests insert review data with `add_session(...)`.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

SAMPLES_HEADER = "time_iso,t,participant_id,name\n"
ALERTS_HEADER = "time_iso,t,level,kind\n"


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()    # the server calls the Store from worker threads
        self.rooms: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.reviews: dict[str, dict[str, Any]] = {}
        self.samples_csv: dict[str, list[str]] = {}
        self.alerts_csv: dict[str, list[str]] = {}
        self.assignments: dict[str, dict[str, Any]] = {}

    # ---- Store --------------------------------------------------------------------------------
    def create_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> None:
        with self._lock:
            if room_id in self.rooms:
                raise ValueError(f"room {room_id} exists")
            self.rooms[room_id] = {"room_id": room_id, "title": title, "join_key": join_key,
                                   "teacher_token_hash": teacher_token_hash, "created_at": time.time()}

    def get_room(self, room_id: str) -> dict[str, Any] | None:
        with self._lock:
            room = self.rooms.get(room_id)
            return dict(room) if room else None

    def list_sessions(self, room_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return sorted((dict(s) for s in self.sessions.values() if s["room_id"] == room_id),
                          key=lambda s: s["started_at"], reverse=True)

    def session_room(self, session_id: str) -> str | None:
        with self._lock:
            session = self.sessions.get(session_id)
            return session["room_id"] if session else None

    def session_review(self, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
        with self._lock:
            return self.reviews.get(session_id)

    def iter_samples_csv(self, session_id: str) -> Iterator[str]:
        yield SAMPLES_HEADER
        yield from list(self.samples_csv.get(session_id, []))

    def iter_alerts_csv(self, session_id: str) -> Iterator[str]:
        yield ALERTS_HEADER
        yield from list(self.alerts_csv.get(session_id, []))

    def delete_session(self, session_id: str) -> bool:
        with self._lock:
            for table in (self.reviews, self.samples_csv, self.alerts_csv):
                table.pop(session_id, None)
            return self.sessions.pop(session_id, None) is not None

    def delete_sessions_before(self, cutoff: float) -> list[str]:
        with self._lock:
            expired = [sid for sid, s in self.sessions.items()
                       if (s["ended_at"] if s["ended_at"] is not None else s["started_at"]) < cutoff]
        return [sid for sid in expired if self.delete_session(sid)]

    def finish_session(self, session_id: str, ended_at: float) -> bool:
        with self._lock:
            session = self.sessions.get(session_id)
            if session is None or session["ended_at"] is not None:
                return False
            session["ended_at"] = ended_at
            review = self.reviews.get(session_id)
            if review is not None and isinstance(review.get("session"), dict):
                review["session"]["ended_at"] = ended_at
            return True

    def session_alerts(self, session_id: str) -> list[dict[str, Any]]:
        with self._lock:
            review = self.reviews.get(session_id) or {}
            return [dict(a) for a in review.get("alerts", [])]

    def assign_room(self, room_id: str, worker_id: str, lease_until: float, session_id: str | None = None) -> None:
        with self._lock:
            row = self.assignments.setdefault(room_id, {"room_id": room_id, "session_id": None, "students": 0})
            row.update(worker_id=worker_id, lease_until=lease_until, assigned_at=time.time())
            if session_id is not None:
                row["session_id"] = session_id

    def claim_expired_room(self, worker_id: str, now: float, lease_until: float) -> dict[str, Any] | None:
        with self._lock:
            expired = sorted((r for r in self.assignments.values() if r["lease_until"] < now),
                             key=lambda r: r["lease_until"])
            if not expired:
                return None
            before = dict(expired[0])
            expired[0].update(worker_id=worker_id, lease_until=lease_until, assigned_at=time.time())
            return before

    def release_room(self, room_id: str, worker_id: str | None = None) -> bool:
        with self._lock:
            row = self.assignments.get(room_id)
            if row is None or (worker_id is not None and row["worker_id"] != worker_id):
                return False
            del self.assignments[room_id]
            return True

    # ---- test helpers ---------------------------------------------------------------------------
    def add_session(self, session_id: str, room_id: str, review: dict[str, Any] | None = None,
                    samples: list[str] | None = None, alerts: list[str] | None = None) -> None:
        """Insert a finished-looking session with optional review data and CSV lines (each ending in \\n)."""
        with self._lock:
            self.sessions[session_id] = {"session_id": session_id, "room_id": room_id, "started_at": time.time(),
                                         "ended_at": None, "participants": 0, "samples": len(samples or []),
                                         "alerts": len(alerts or [])}
            self.reviews[session_id] = review or {"session": dict(self.sessions[session_id]), "emotions": [],
                                                  "timeline": [], "alerts": [], "students": []}
            self.samples_csv[session_id] = list(samples or [])
            self.alerts_csv[session_id] = list(alerts or [])
