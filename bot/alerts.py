"""The alert rule engine: turns per-student and class signals into a few private alerts for the teacher.

Pure Python, imports only `core`; O(1) per update, no I/O, no wall-clock
reads when `t` is passed (the same t values always give the same alerts; alert ids are uuid4).

Rules, per (student, kind) and per (class, kind), kind in {"confusion", "boredom"} (docs/signals.md):
- RAISE when the value is >= its threshold continuously for >= student_min_seconds (class: the share of
  scored students at or above the student threshold is >= class_share_threshold, with at least
  min_students_for_class_alert scored students of whom at least min_students_above_for_class_alert are at
  or above it, for >= class_min_seconds). A student's value is their score relative to their own baseline
  (StudentState.<kind>_adjusted) when the state carries one, else the raw score. A value of None (not enough
  samples) breaks a pending run but does not clear a raised condition.
- CLEAR only when the value drops below threshold - hysteresis (a class with fewer scored students than
  the minimum clears too).
- An alert is emitted at the moment a condition raises, unless the same (target, kind) emitted one less
  than cooldown_seconds earlier. A muted student emits none: updates are ignored while muted and the
  student's conditions start afresh on unmute (their cooldown is kept).
"""
from __future__ import annotations

import math
import numbers
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from core.protocol import ALERT_KINDS as KINDS
from core.protocol import THRESHOLD_KINDS
from core.records import AlertRecord
from core.settings import SignalSettings

if TYPE_CHECKING:   # for the types only: the rules depend on no other bot module
    from bot.signals import ClassState, StudentState
_ADJECTIVE = {"confusion": "confused", "boredom": "bored"}
_TOL = 1e-9


@dataclass
class Condition:
    """The state of one rule: a pending run above threshold, whether it is raised, when it last alerted."""

    above_since: float | None = None
    raised: bool = False
    raised_at: float | None = None
    last_alert_t: float | None = None

    def restart(self) -> None:
        self.above_since, self.raised, self.raised_at = None, False, None

    def step(self, value: float | None, threshold: float, hysteresis: float, min_seconds: float, t: float) -> bool:
        """Advance with one value at time t; True exactly when the condition raises now."""
        if value is None or not math.isfinite(value):
            if not self.raised:
                self.above_since = None
            return False
        if value >= threshold:
            if self.above_since is None or t < self.above_since:
                self.above_since = t
            if not self.raised and t - self.above_since >= min_seconds - _TOL:
                self.raised, self.raised_at = True, t
                return True
            return False
        self.above_since = None
        if self.raised and value < threshold - hysteresis:
            self.raised, self.raised_at = False, None
        return False

    def cooled_down(self, t: float, cooldown: float) -> bool:
        return self.last_alert_t is None or t - self.last_alert_t >= cooldown - _TOL or t < self.last_alert_t


class AlertEngine:
    """Per-session rule engine. Feed it every StudentState and every ClassState; it returns new alerts."""

    def __init__(self, settings: SignalSettings, session_id: str, clock: Callable[[], float] | None = None,
                 keep_alerts: int = 1000) -> None:
        self.settings = settings
        self.session_id = session_id
        self.clock = clock or time.time
        self.keep_alerts = keep_alerts
        self._thresholds: dict[str, float] = {}
        for kind, value in (("confusion", settings.confusion_threshold), ("boredom", settings.boredom_threshold),
                            ("class_share", settings.class_share_threshold)):
            self._thresholds[kind] = self._validate(kind, value)
        self._students: dict[str, dict[str, Condition]] = {}
        self._class: dict[str, Condition] = {k: Condition() for k in KINDS}
        self._muted: set[str] = set()
        self._alerts: OrderedDict[str, AlertRecord] = OrderedDict()

    # ---- inputs ----------------------------------------------------------------------------------
    def student_update(self, participant_id: str, name: str | None, state: StudentState | None,
                       t: float | None = None) -> list[AlertRecord]:
        """One student's new StudentState (fields `confusion`, `boredom`: float in [0, 1] or None)."""
        t = self.clock() if t is None else float(t)
        if participant_id in self._muted:
            return []
        conds = self._students.get(participant_id)
        if conds is None:
            conds = self._students[participant_id] = {k: Condition() for k in KINDS}
        s = self.settings
        out: list[AlertRecord] = []
        for kind in KINDS:
            raw = getattr(state, kind, None) if state is not None else None
            # The rule runs on the score relative to the student's own baseline when there is one
            # (StudentState.<kind>_adjusted); plain score objects without it use the raw score.
            adjusted = getattr(state, f"{kind}_adjusted", None) if state is not None else None
            baseline = getattr(state, f"{kind}_baseline", None) if state is not None else None
            value = None if raw is None else float(adjusted if adjusted is not None else raw)
            cond = conds[kind]
            if cond.step(value, self._thresholds[kind], s.hysteresis, s.student_min_seconds, t) \
                    and cond.cooled_down(t, s.cooldown_seconds) and value is not None and raw is not None:
                cond.last_alert_t = t
                held = t - (cond.above_since if cond.above_since is not None else t)
                who = (name or "").strip() or "A student"
                message = f"{who} seems {_ADJECTIVE[kind]} for {_secs(held)} s"
                extra: dict[str, Any] = {"threshold": self._thresholds[kind], "held_seconds": round(held, 3)}
                if baseline is not None:
                    # Say the rise: "more than usual" is what the alert means once a baseline exists.
                    message += f" (score {float(raw):.2f}, usually {float(baseline):.2f})"
                    extra.update(score=round(float(raw), 4), baseline=round(float(baseline), 4))
                out.append(self._record(t, "student", kind, message, float(value),
                                        participant_id=participant_id, name=name, extra=extra))
        return out

    def class_update(self, class_state: ClassState, t: float | None = None) -> list[AlertRecord]:
        """The class picture (bot.signals.ClassState). Shares are recomputed from the per-student scores
        with the thresholds in force here when the state carries them (`confusion_scores`, `boredom_scores`)."""
        t = self.clock() if t is None else float(t)
        s = self.settings
        out: list[AlertRecord] = []
        for kind in KINDS:
            scores = getattr(class_state, f"{kind}_scores", None)
            if scores is not None:
                scores = [float(v) for v in scores if v is not None]
                n = len(scores)
                count = sum(1 for v in scores if v >= self._thresholds[kind])
                share = count / n if n else 0.0
            else:
                n = int(getattr(class_state, f"n_{kind}", getattr(class_state, "analysed", 0)) or 0)
                share = float(getattr(class_state, f"{kind}_share", 0.0) or 0.0)
                count = int(round(share * n))
            # A class alert needs enough scored students and at least min_students_above of them at or
            # above the threshold: in a pair, one student's rise is that student's alert, not the class's.
            enough = n >= s.min_students_for_class_alert and count >= s.min_students_above_for_class_alert
            value = share if enough else 0.0
            cond = self._class[kind]
            if cond.step(value, self._thresholds["class_share"], s.hysteresis, s.class_min_seconds, t) \
                    and cond.cooled_down(t, s.cooldown_seconds):
                cond.last_alert_t = t
                held = t - (cond.above_since if cond.above_since is not None else t)
                message = (f"{round(share * 100)} % of the class ({count} of {n}) looks {_ADJECTIVE[kind]} "
                           f"over the last {_secs(held)} s")
                out.append(self._record(t, "class", kind, message, share, extra={
                    "threshold": self._thresholds[kind], "class_share_threshold": self._thresholds["class_share"],
                    "count": count, "scored": n, "held_seconds": round(held, 3)}))
        return out

    def restore(self, stored: list[dict[str, Any]]) -> int:
        """Continue a session another bot recorded (a worker died; this one took the room over): its stored
        alerts, oldest first (storage's session_alerts rows), come back with their acknowledgements, and
        each (target, kind) keeps its cooldown from its last alert, so the teacher is not told again what the
        previous bot already said. Rows that are not alerts of this session are skipped. How many came back."""
        restored = 0
        for row in stored:
            try:
                kind, level, t = str(row["kind"]), str(row["level"]), float(row["t"])
                alert = AlertRecord(alert_id=str(row["alert_id"]), session_id=self.session_id, t=t, level=level,
                                    kind=kind, message=str(row.get("message") or ""), value=float(row["value"]),
                                    participant_id=row.get("participant_id"), name=row.get("name"),
                                    acknowledged=bool(row.get("acknowledged")))
            except (KeyError, TypeError, ValueError):
                continue
            if row.get("session_id") not in (None, self.session_id) or kind not in KINDS or not math.isfinite(t):
                continue
            self._alerts[alert.alert_id] = alert
            if level == "class":
                cond = self._class[kind]
            elif alert.participant_id:
                cond = self._students.setdefault(alert.participant_id, {k: Condition() for k in KINDS})[kind]
            else:
                continue
            cond.last_alert_t = max(t, cond.last_alert_t or t)
            restored += 1
        while len(self._alerts) > self.keep_alerts:
            self._alerts.popitem(last=False)
        return restored

    # ---- teacher controls ------------------------------------------------------------------------
    def remove_student(self, participant_id: str) -> None:
        """A student who left or opted out: everything about them is forgotten (conditions, cooldown, mute).
        Callers stop feeding their updates; a later update would start from nothing."""
        self._students.pop(participant_id, None)
        self._muted.discard(participant_id)

    def mute(self, participant_id: str) -> None:
        """No alerts for this student until unmute (class signals still count them)."""
        self._muted.add(participant_id)
        for cond in self._students.get(participant_id, {}).values():
            cond.restart()

    def unmute(self, participant_id: str) -> None:
        """Alerts resume; conditions start afresh, so a still-confused student alerts after min seconds again."""
        self._muted.discard(participant_id)
        for cond in self._students.get(participant_id, {}).values():
            cond.restart()

    def is_muted(self, participant_id: str) -> bool:
        return participant_id in self._muted

    def acknowledge(self, alert_id: str) -> bool:
        """Mark an alert seen; True when it was known and not yet acknowledged."""
        alert = self._alerts.get(alert_id)
        if alert is None or alert.acknowledged:
            return False
        self._alerts[alert_id] = replace(alert, acknowledged=True)
        return True

    def set_threshold(self, kind: str, value: float) -> None:
        """Change a threshold during class: kind "confusion" | "boredom" | "class_share", value in
        (hysteresis, 1]. Takes effect on the next update; raised conditions clear below the new value - hysteresis."""
        if kind not in THRESHOLD_KINDS:
            raise ValueError(f"unknown threshold kind {kind!r}; expected one of {', '.join(THRESHOLD_KINDS)}")
        self._thresholds[kind] = self._validate(kind, value)

    def thresholds(self) -> dict[str, float]:
        return dict(self._thresholds)

    # ---- introspection ---------------------------------------------------------------------------
    def alerts(self) -> list[AlertRecord]:
        """The most recent alerts (up to keep_alerts), oldest first, with their acknowledged flag."""
        return list(self._alerts.values())

    def active(self) -> list[tuple[str | None, str]]:
        """Raised conditions now: (participant_id or None for the class, kind)."""
        out: list[tuple[str | None, str]] = [(None, k) for k, c in self._class.items() if c.raised]
        for pid, conds in self._students.items():
            out.extend((pid, k) for k, c in conds.items() if c.raised)
        return out

    # ---- internals -------------------------------------------------------------------------------
    def _validate(self, kind: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"threshold {kind} must be a number, got {value!r}")
        v = float(value)
        low = self.settings.hysteresis
        if not math.isfinite(v) or not (low < v <= 1.0):
            raise ValueError(f"threshold {kind} must be in ({low:g}, 1] (above the hysteresis), got {value!r}")
        return v

    def _record(self, t: float, level: str, kind: str, message: str, value: float,
                participant_id: str | None = None, name: str | None = None,
                extra: dict[str, Any] | None = None) -> AlertRecord:
        alert = AlertRecord(alert_id=uuid.uuid4().hex, session_id=self.session_id, t=t, level=level, kind=kind,
                            message=message, value=round(value, 4), participant_id=participant_id, name=name,
                            extra=extra or {})
        self._alerts[alert.alert_id] = alert
        while len(self._alerts) > self.keep_alerts:
            self._alerts.popitem(last=False)
        return alert


def _secs(seconds: float) -> int:
    return int(round(max(seconds, 0.0)))
