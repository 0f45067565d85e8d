"""What the signaling server needs from a database, as a Protocol (storage.Repository implements it).

signaling/ never imports storage/: `bot` (the wiring) passes a Repository to `create_app(store=...)`.
All methods are synchronous and quick; the server calls them via `asyncio.to_thread`.
"""
from __future__ import annotations

from typing import Any, Iterator, Protocol


class Store(Protocol):
    def create_room(self, room_id: str, title: str, join_key: str, teacher_token_hash: str) -> None:
        """Persist a new room. Tokens are stored only as hashes (sha256 hex)."""

    def get_room(self, room_id: str) -> dict[str, Any] | None:
        """{"room_id", "title", "join_key", "teacher_token_hash", "created_at"} or None."""

    def list_sessions(self, room_id: str) -> list[dict[str, Any]]:
        """Sessions of a room, newest first: {"session_id", "room_id", "started_at", "ended_at",
        "participants", "samples", "alerts"}."""

    def session_room(self, session_id: str) -> str | None:
        """The room a session belongs to (for authorising review requests), or None."""

    def session_review(self, session_id: str, bucket_seconds: float = 10.0) -> dict[str, Any] | None:
        """Everything the review page draws, see storage.review for the exact shape."""

    def iter_samples_csv(self, session_id: str) -> Iterator[str]:
        """CSV text lines (header first) of the session's samples."""

    def iter_alerts_csv(self, session_id: str) -> Iterator[str]:
        """CSV text lines (header first) of the session's alerts."""

    def delete_session(self, session_id: str) -> bool:
        """Erase a session and everything stored about it; False when there is no such session."""

    def delete_sessions_before(self, cutoff: float) -> list[str]:
        """Erase sessions that ended before `cutoff` epoch seconds, or never ended and show no activity
        since before it (a class still being recorded is kept); their ids."""

    def finish_session(self, session_id: str, ended_at: float) -> bool:
        """End the session at `ended_at` (epoch seconds) now, unless it has ended already (the teacher's End
        class button: the review shows it ended at once). True when this call ended it."""

    def session_alerts(self, session_id: str) -> list[dict[str, Any]]:
        """The session's alerts, oldest first: {"alert_id", "session_id", "t", "level", "kind", "message",
        "value", "participant_id", "name", "acknowledged", "acknowledged_at"} (the teacher page's feed)."""

    # ---- bot workers' leases (table room_assignments; the worker renews its own, see docs/scaling.md) ----
    def assign_room(self, room_id: str, worker_id: str, lease_until: float, session_id: str | None = None) -> None:
        """Give the room to `worker_id` until `lease_until` (epoch seconds): an invite."""

    def claim_expired_room(self, worker_id: str, now: float, lease_until: float) -> dict[str, Any] | None:
        """Atomically take one room whose lease ended before `now` for `worker_id`; the row as it was
        ({"room_id", "worker_id", "session_id", "students", "lease_until", "assigned_at"}) or None."""

    def release_room(self, room_id: str, worker_id: str | None = None) -> bool:
        """The room's class is over: drop its assignment (nobody is invited there again by itself)."""
