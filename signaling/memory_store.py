"""A dict-backed Store for running the server alone (`python -m signaling`) and for tests."""
from __future__ import annotations

import time
from typing import Any, Iterator


class MemoryStore:
    def __init__(self) -> None:
        self.rooms: dict[str, dict[str, Any]] = {}
        self.sessions: dict[str, dict[str, Any]] = {}
        self.reviews: dict[str, dict[str, Any]] = {}
        self.samples_csv: dict[str, list[str]] = {}
        self.alerts_csv: dict[str, list[str]] = {}

    def create_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> None:
        self.rooms[room_id] = {"room_id": room_id, "title": title, "join_key": join_key,
                               "teacher_token_hash": teacher_token_hash, "created_at": time.time()}

    def get_room(self, room_id: str) -> dict[str, Any] | None:
        return self.rooms.get(room_id)

    def add_session(self, session_id: str, room_id: str, review: dict[str, Any] | None = None) -> None:
        self.sessions[session_id] = {"session_id": session_id, "room_id": room_id, "started_at": time.time(),
                                     "ended_at": None, "participants": 0, "samples": 0, "alerts": 0}
        self.reviews[session_id] = review or {"session": self.sessions[session_id], "emotions": [], "timeline": [],
                                              "alerts": [], "students": []}

    def list_sessions(self, room_id: str) -> list[dict[str, Any]]:
        return sorted((s for s in self.sessions.values() if s["room_id"] == room_id),
                      key=lambda s: s["started_at"], reverse=True)

    def session_room(self, session_id: str) -> str | None:
        session = self.sessions.get(session_id)
        return session["room_id"] if session else None

    def session_review(self, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
        return self.reviews.get(session_id)

    def iter_samples_csv(self, session_id: str) -> Iterator[str]:
        yield "time_iso,t,participant_id,name\n"
        yield from self.samples_csv.get(session_id, [])

    def iter_alerts_csv(self, session_id: str) -> Iterator[str]:
        yield "time_iso,t,level,kind\n"
        yield from self.alerts_csv.get(session_id, [])
