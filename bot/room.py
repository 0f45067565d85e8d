"""ClassRoom: everything the bot knows about one class session, with no networking in it.

Inference results come in (one per analysed frame), become per-student signals, stored samples and
alerts; `tick()` computes the class picture and pushes live state for the teacher. `send` is the only
way out (the BotPeer relays it through the signaling server to the room's teachers).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bot.alerts import AlertEngine
from bot.analyzer import FrameResult
from bot.recorder import Recorder
from bot.signals import ClassSignals, ClassState, Observation, StudentSignals, StudentState, attention_cues
from core.records import AlertRecord, SampleRecord
from core.settings import Settings

log = logging.getLogger("classmood.bot.room")


@dataclass
class Student:
    peer_id: str
    name: str
    analysis: bool
    signals: StudentSignals
    connected: bool = False
    state: StudentState | None = None  # latest signals of this student
    last_seen: float | None = None    # last time a face was seen
    last_probs: list[float] | None = None
    face: bool = False
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class ClassRoom:
    def __init__(self, settings: Settings, room_id: str, session_id: str, repository: Recorder,
                 send: Callable[[dict[str, Any]], None], clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.room_id = room_id
        self.session_id = session_id
        self.repository = repository
        self.send = send
        self.clock = clock
        self.students: dict[str, Student] = {}
        self.engine = AlertEngine(settings.signals, session_id)
        self.class_signals = ClassSignals(settings.signals, thresholds=self.engine.thresholds)
        self.muted: set[str] = set()
        self.closed = False

    # ---- roster ----------------------------------------------------------------------------------
    def add_student(self, peer_id: str, name: str, analysis: bool) -> None:
        if peer_id in self.students:
            return
        # The participant row is queued before any sample can reference it (the writer keeps order).
        self.repository.add_participant(self.session_id, peer_id, name)
        if not analysis:
            self.repository.set_opt_out(self.session_id, peer_id, True)
        self.students[peer_id] = Student(peer_id, name, analysis, StudentSignals(self.settings.signals))
        # The participant id, never the name: logs are outside retention and erasure (core/logs.py).
        log.info("room %s: participant %s joined (analysis %s)", self.room_id, peer_id, "on" if analysis else "off")

    def remove_student(self, peer_id: str) -> None:
        student = self.students.pop(peer_id, None)
        if student is None:
            return
        self.engine.remove_student(peer_id)
        self.muted.discard(peer_id)
        self.repository.participant_left(self.session_id, peer_id)
        log.info("room %s: participant %s left", self.room_id, peer_id)

    def set_consent(self, peer_id: str, analysis: bool) -> None:
        student = self.students.get(peer_id)
        if student is None or student.analysis == analysis:
            return
        student.analysis = analysis
        self.repository.set_opt_out(self.session_id, peer_id, not analysis)
        if not analysis:
            # Opting out stops analysis at once and forgets the window: nothing about them is inferred further.
            self.engine.remove_student(peer_id)
            student.signals = StudentSignals(self.settings.signals)
            student.state, student.last_probs, student.face = None, None, False
        log.info("room %s: participant %s turned analysis %s", self.room_id, peer_id, "on" if analysis else "off")

    def sync_roster(self, roster: dict[str, tuple[str, bool]]) -> list[str]:
        """Make the roster match the server's list {peer_id: (name, analysis)} (a welcome after a reconnect).

        Returns the students whose video must stop: those gone from the room or no longer consenting.
        """
        stop = [peer_id for peer_id, s in self.students.items()
                if peer_id not in roster or (s.analysis and not roster[peer_id][1])]
        for peer_id in [p for p in self.students if p not in roster]:
            self.remove_student(peer_id)
        for peer_id, (name, analysis) in roster.items():
            if peer_id in self.students:
                self.set_consent(peer_id, analysis)
            else:
                self.add_student(peer_id, name, analysis)
        return stop

    def wants_video(self, peer_id: str) -> bool:
        student = self.students.get(peer_id)
        return student is not None and student.analysis and not self.closed

    def mark_connected(self, peer_id: str, connected: bool) -> None:
        student = self.students.get(peer_id)
        if student is not None:
            student.connected = connected

    # ---- analysis --------------------------------------------------------------------------------
    def on_result(self, result: FrameResult) -> None:
        _, peer_id = result.key
        student = self.students.get(peer_id)
        if student is None or not student.analysis or self.closed or result.error:
            return
        cues: dict[str, Any] = {}
        if result.face_found and result.box is not None and result.keypoints is not None:
            cues = attention_cues(result.box, result.keypoints, frame_shape=result.frame_shape,
                                  settings=self.settings.signals)
        probs = None if result.probs is None or not result.face_found else [float(p) for p in result.probs]
        state = student.signals.update(Observation(t=result.received_at, face_found=result.face_found,
                                                   probs=probs, **cues))
        student.state, student.face, student.samples = state, result.face_found, student.samples + 1
        if result.face_found:
            student.last_seen, student.last_probs = result.received_at, probs
        self.repository.add_samples([SampleRecord(
            session_id=self.session_id, participant_id=peer_id, t=result.received_at,
            face_found=result.face_found, probs=tuple(probs) if probs else None,
            confusion=_f(state.confusion), boredom=_f(state.boredom), attention=_f(state.attention),
            latency_s=time.monotonic() - result.received_mono)])
        if peer_id not in self.muted:
            for alert in self.engine.student_update(peer_id, student.name, state, result.received_at):
                self._raise(alert)

    def _raise(self, alert: AlertRecord) -> None:
        self.repository.add_alert(alert)
        self.send({"type": "alert", "alert": alert.to_json()})
        log.info("room %s: alert %s", self.room_id, alert.message)

    def tick(self) -> None:
        """Once per state period: class signals, class alerts, live state to the teacher."""
        if self.closed:
            return
        now = self.clock()
        analysed = {pid: s.state for pid, s in self.students.items()
                    if s.analysis and s.connected and s.state is not None}
        class_state = self.class_signals.update(analysed, now)
        for alert in self.engine.class_update(class_state, now):
            self._raise(alert)
        self.send({"type": "state", "state": self.snapshot(class_state, now)})

    def snapshot(self, class_state: ClassState, now: float) -> dict[str, Any]:
        students = []
        for s in self.students.values():
            st = s.state if s.analysis else None
            students.append({
                "peer_id": s.peer_id, "name": s.name, "analysis": s.analysis, "connected": s.connected,
                "face": bool(s.face) if s.analysis else False,
                "top_label": st.top_label if st else None,
                "probs": [round(p, 3) for p in s.last_probs] if s.analysis and s.last_probs else None,
                "confusion": _f(st.confusion if st else None), "boredom": _f(st.boredom if st else None),
                "attention": _f(st.attention if st else None), "muted": s.peer_id in self.muted,
                # What the alerts compare with the thresholds (relative to the student's usual), and that usual.
                "confusion_adjusted": _f(st.confusion_adjusted if st else None),
                "boredom_adjusted": _f(st.boredom_adjusted if st else None),
                "confusion_baseline": _f(st.confusion_baseline if st else None),
                "boredom_baseline": _f(st.boredom_baseline if st else None),
                "last_seen": s.last_seen,
            })
        return {"t": now, "session_id": self.session_id, "students": students,
                "class": class_state.to_json(),
                "thresholds": self.engine.thresholds()}

    # ---- teacher controls ------------------------------------------------------------------------
    def control(self, message: dict[str, Any]) -> None:
        action = message.get("action")
        try:
            if action == "ack" and isinstance(message.get("alert_id"), str):
                # Stored even when this engine did not issue it (an alert from before a bot restart).
                self.engine.acknowledge(message["alert_id"])
                self.repository.acknowledge_alert(message["alert_id"], self.room_id)
            elif action in ("mute", "unmute") and isinstance(message.get("peer_id"), str):
                peer = message["peer_id"]
                if action == "mute":
                    self.muted.add(peer)
                    self.engine.mute(peer)
                else:
                    self.muted.discard(peer)
                    self.engine.unmute(peer)
            elif action == "threshold":
                value = message.get("value")
                if not isinstance(value, (int, float)):
                    raise ValueError("threshold value must be a number")
                self.engine.set_threshold(str(message.get("kind")), float(value))
            else:
                log.warning("room %s: unknown control %r ignored", self.room_id, action)
        except (TypeError, ValueError) as exc:
            log.warning("room %s: invalid control %r: %s", self.room_id, action, exc)

    def close(self) -> None:
        self.closed = True


def _f(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)
