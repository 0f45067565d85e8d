"""Plain records that cross package boundaries: what the bot stores and what the teacher is sent.

Kept in `core` so `bot/`, `storage/` and `signaling/` agree on them without importing each other.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from core.emotions import EMOTIONS


@dataclass(frozen=True)
class SampleRecord:
    """One analysed frame of one student (a row of the `samples` table).

    t: wall-clock seconds since the epoch when the frame was received by the bot.
    probs: 7 floats in EMOTIONS order, or None when no face was found.
    confusion/boredom: the per-student signals (bot.signals) at this moment, in [0, 1], or None.
    """

    session_id: str
    participant_id: str
    t: float
    face_found: bool
    probs: tuple[float, ...] | None = None
    confusion: float | None = None
    boredom: float | None = None
    attention: float | None = None
    latency_s: float | None = None      # frame received -> row accepted by the repository

    @property
    def top_label(self) -> str | None:
        if self.probs is None:
            return None
        return EMOTIONS[max(range(len(self.probs)), key=self.probs.__getitem__)]


@dataclass(frozen=True)
class AlertRecord:
    """An alert raised for the teacher.

    level: "student" or "class"; kind: "confusion" | "boredom" | "absent" (absent = face not seen);
    participant_id is None for class alerts; value is the score or class share that triggered it.
    """

    alert_id: str
    session_id: str
    t: float
    level: str
    kind: str
    message: str
    value: float
    participant_id: str | None = None
    name: str | None = None
    acknowledged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
