"""bot.alerts: raise / clear / cooldown / mute rules on scripted 2 Hz streams."""
from __future__ import annotations

import dataclasses
import math
import re
from types import SimpleNamespace

import pytest

from bot.alerts import AlertEngine
from bot.signals import ClassSignals, Observation, StudentSignals, StudentState
from core.settings import SignalSettings

HZ = 2.0
DT = 1 / HZ
# The rules (raise, clear, cooldown, mute, class share) are checked with absolute scores: baselines off and
# the thresholds these streams were written for; per-student baselines and the defaults are in
# tests/test_baselines.py.
S = SignalSettings(confusion_threshold=0.5, student_min_seconds=20.0, baseline_seconds=0.0,
                   min_students_for_class_alert=3, min_students_above_for_class_alert=1)
THR = S.confusion_threshold

CONFUSED = (0.30, 0.05, 0.10, 0.00, 0.30, 0.05, 0.20)
NEUTRAL = (0.02, 0.01, 0.02, 0.03, 0.05, 0.02, 0.85)
HAPPY = (0.02, 0.01, 0.02, 0.80, 0.02, 0.08, 0.05)


def no_clock():
    raise AssertionError("the engine read the clock although t was given")


def engine(**overrides):
    return AlertEngine(dataclasses.replace(S, **overrides), "sess-1", clock=no_clock)


def feed(eng, pid, name, values, t0=0.0, kind="confusion"):
    """Feed synthetic scores (one per sample at 2 Hz); returns (alerts, next t)."""
    alerts = []
    t = t0
    for v in values:
        alerts += eng.student_update(pid, name, SimpleNamespace(**{kind: v}), t)
        t += DT
    return alerts, t


def secs(seconds):
    return int(round(seconds * HZ))


# ---- one student, real signals ---------------------------------------------------------------------
def test_sustained_confusion_raises_exactly_one_alert_at_threshold_plus_min_duration():
    eng, sig = engine(), StudentSignals(S)
    alerts, first_above, t = [], None, 0.0
    for probs, seconds in ((NEUTRAL, 20), (CONFUSED, 90)):
        for _ in range(secs(seconds)):
            st = sig.update(Observation(t=t, face_found=True, probs=probs))
            if first_above is None and st.confusion is not None and st.confusion >= THR:
                first_above = t
            alerts += eng.student_update("p1", "Asha", st, t)
            t += DT
    assert first_above is not None and first_above > 20          # the window mean lags the onset
    assert len(alerts) == 1
    a = alerts[0]
    assert first_above + S.student_min_seconds <= a.t <= first_above + S.student_min_seconds + DT
    assert (a.level, a.kind, a.participant_id, a.name, a.session_id) == ("student", "confusion", "p1", "Asha", "sess-1")
    assert a.message == f"Asha seems confused for {int(S.student_min_seconds)} s"
    assert a.value >= THR and not a.acknowledged
    assert re.fullmatch(r"[0-9a-f]{32}", a.alert_id)


def test_neutral_face_looking_away_raises_boredom_not_confusion():
    eng, sig = engine(), StudentSignals(S)
    alerts = []
    for i in range(secs(80)):
        st = sig.update(Observation(t=i * DT, face_found=True, probs=NEUTRAL, yaw=0.9))
        alerts += eng.student_update("p2", "Ben", st, i * DT)
    assert [a.kind for a in alerts] == ["boredom"]
    assert alerts[0].message.startswith("Ben seems bored for ")


def test_happy_student_never_alerts():
    eng, sig = engine(), StudentSignals(S)
    alerts = []
    for i in range(secs(300)):
        st = sig.update(Observation(t=i * DT, face_found=True, probs=HAPPY, yaw=0.0))
        alerts += eng.student_update("p3", "Cy", st, i * DT)
    assert alerts == []


# ---- rules on synthetic scores -----------------------------------------------------------------
def test_flicker_inside_the_hysteresis_band_does_not_repeat_the_alert():
    eng = engine()
    alerts, t = feed(eng, "p1", "Asha", [0.6] * secs(S.student_min_seconds + 1))
    assert len(alerts) == 1
    band = [THR + 0.04, THR - 0.04] * secs(S.cooldown_seconds * 2)   # far longer than the cooldown
    more, t = feed(eng, "p1", "Asha", band, t0=t)
    assert more == []
    assert ("p1", "confusion") in eng.active()


def test_flicker_across_the_threshold_before_raising_never_raises():
    eng = engine()
    # Never continuously above for student_min_seconds: each dip restarts the run.
    pattern = [0.6] * secs(S.student_min_seconds - 2) + [THR - 0.01]
    alerts, _ = feed(eng, "p1", "Asha", pattern * 10)
    assert alerts == []


def test_cooldown_blocks_a_quick_re_raise_and_allows_a_later_one():
    eng = engine()
    hold = secs(S.student_min_seconds)
    alerts, t = feed(eng, "p1", "Asha", [0.7] * (hold + 1))
    assert len(alerts) == 1
    t_first = alerts[0].t
    # clear (below threshold - hysteresis), then re-raise well inside the cooldown
    again, t = feed(eng, "p1", "Asha", [THR - S.hysteresis - 0.05] * secs(5) + [0.7] * (hold + 4), t0=t)
    assert again == [] and t < t_first + S.cooldown_seconds
    assert ("p1", "confusion") in eng.active()                     # raised, but silent inside the cooldown
    # clear again, wait until past the cooldown, raise again: a new alert
    low = [0.1] * secs(t_first + S.cooldown_seconds - t + 1)
    later, t = feed(eng, "p1", "Asha", low + [0.7] * (hold + 1), t0=t)
    assert len(later) == 1
    assert later[0].t >= t_first + S.cooldown_seconds
    assert later[0].alert_id != alerts[0].alert_id


def test_mute_suppresses_and_unmute_restores():
    eng = engine()
    eng.mute("p1")
    assert eng.is_muted("p1")
    alerts, t = feed(eng, "p1", "Asha", [0.8] * secs(60))
    assert alerts == []
    eng.unmute("p1")
    t_unmute = t
    alerts, t = feed(eng, "p1", "Asha", [0.8] * secs(30), t0=t)
    assert len(alerts) == 1
    assert alerts[0].t == pytest.approx(t_unmute + S.student_min_seconds)
    # muting another student does not silence this one's class-level contribution or others' alerts
    eng.mute("p9")
    other, _ = feed(eng, "p2", "Ben", [0.8] * secs(25))
    assert len(other) == 1


def test_muting_mid_run_discards_the_pending_run():
    eng = engine()
    _, t = feed(eng, "p1", "Asha", [0.8] * secs(S.student_min_seconds - 5))
    eng.mute("p1")
    eng.unmute("p1")
    alerts, _ = feed(eng, "p1", "Asha", [0.8] * secs(S.student_min_seconds - 5), t0=t)
    assert alerts == []


def test_remove_student_forgets_state_and_stops_alerts():
    eng = engine()
    _, t = feed(eng, "p1", "Asha", [0.8] * secs(S.student_min_seconds - 5))
    eng.mute("p2")
    eng.remove_student("p1")
    eng.remove_student("p2")
    eng.remove_student("never-seen")                     # harmless
    assert not eng.is_muted("p2")
    assert all(pid != "p1" for pid, _ in eng.active())
    # The 15 s already above threshold are forgotten: 10 s more do not complete a run.
    alerts, _ = feed(eng, "p1", "Asha", [0.8] * secs(10), t0=t)
    assert alerts == []


def test_unknown_scores_break_a_pending_run_but_do_not_clear_a_raised_one():
    eng = engine()
    values = [0.8] * secs(10) + [None] + [0.8] * secs(S.student_min_seconds - 1)
    alerts, t = feed(eng, "p1", "Asha", values)
    assert alerts == []
    alerts, t = feed(eng, "p1", "Asha", [0.8] * secs(2), t0=t)
    assert len(alerts) == 1
    _, t = feed(eng, "p1", "Asha", [None] * secs(30), t0=t)
    assert ("p1", "confusion") in eng.active()


def test_same_inputs_same_alerts():
    def once():
        eng = engine()
        values = ([0.1] * 10 + [0.7] * secs(25) + [0.2] * 10) * 8
        alerts, _ = feed(eng, "p1", "Asha", values, t0=1000.0)
        return [(a.t, a.kind, a.message, a.value) for a in alerts]
    first = once()
    assert len(first) >= 2 and first == once()


# ---- class alerts ------------------------------------------------------------------------------------
def student_state(t, confusion, boredom=0.1):
    return StudentState(t=t, n=60, n_face=60, face_share=1.0, confusion=confusion, boredom=boredom,
                        attention=1.0, top_label="neutral", mean_probs=NEUTRAL)


def run_class(eng, confusions, seconds, t0=0.0, cls=None):
    cls = cls or ClassSignals(S, thresholds=eng.thresholds)
    alerts, t = [], t0
    while t < t0 + seconds - 1e-9:
        states = {f"s{i}": student_state(t, c) for i, c in enumerate(confusions)}
        alerts += eng.class_update(cls.update(states, t), t)
        t += 1.0                                 # class ticks at 1 Hz
    return alerts, t


def test_class_alert_when_40_percent_of_five_are_confused():
    eng = engine()
    alerts, _ = run_class(eng, [0.7, 0.65, 0.1, 0.2, 0.3], 60)
    assert len(alerts) == 1
    a = alerts[0]
    assert (a.level, a.kind, a.participant_id) == ("class", "confusion", None)
    assert a.t == pytest.approx(S.class_min_seconds)
    assert a.value == pytest.approx(0.4)
    assert a.message == f"40 % of the class (2 of 5) looks confused over the last {int(S.class_min_seconds)} s"


def test_no_class_alert_for_one_of_five_or_too_few_students():
    eng = engine()
    assert run_class(eng, [0.9, 0.1, 0.2, 0.1, 0.3], 120)[0] == []
    eng = engine()
    assert run_class(eng, [0.9, 0.9], 120)[0] == []                # 100 % but fewer than 3 students
    eng = engine()
    assert len(run_class(eng, [0.9, 0.9, 0.1], 60)[0]) == 1        # 3 students, 67 %


def test_class_alert_uses_the_thresholds_in_force():
    eng = engine()
    eng.set_threshold("confusion", 0.8)
    assert run_class(eng, [0.7, 0.7, 0.7], 60)[0] == []
    eng.set_threshold("confusion", 0.6)
    eng.set_threshold("class_share", 0.9)
    assert run_class(eng, [0.7, 0.7, 0.1], 60, t0=60)[0] == []     # 67 % < 90 %
    assert len(run_class(eng, [0.7, 0.7, 0.7], 60, t0=120)[0]) == 1


def test_class_alert_without_per_student_scores_uses_the_given_share():
    eng = engine()
    alerts = []
    for t in range(30):
        cs = SimpleNamespace(analysed=5, n_confusion=5, n_boredom=5, confusion_share=0.6, boredom_share=0.0)
        alerts += eng.class_update(cs, float(t))
    assert [a.kind for a in alerts] == ["confusion"] and alerts[0].t == pytest.approx(S.class_min_seconds)


# ---- teacher controls ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,value", [
    ("confusion", 0.0), ("boredom", -0.2), ("class_share", 1.5), ("confusion", S.hysteresis),
    ("confusion", math.nan), ("boredom", math.inf), ("confusion", "0.5"), ("confusion", None),
    ("confusion", True), ("sadness", 0.5), ("", 0.5),
])
def test_set_threshold_rejects_bad_kinds_and_values(kind, value):
    eng = engine()
    before = eng.thresholds()
    with pytest.raises(ValueError):
        eng.set_threshold(kind, value)
    assert eng.thresholds() == before


def test_set_threshold_changes_the_rule():
    eng = engine()
    eng.set_threshold("confusion", 0.75)
    eng.set_threshold("class_share", 1)
    assert eng.thresholds() == {"confusion": 0.75, "boredom": S.boredom_threshold, "class_share": 1.0}
    alerts, t = feed(eng, "p1", "Asha", [0.7] * secs(60))
    assert alerts == []
    eng.set_threshold("confusion", 0.65)
    alerts, _ = feed(eng, "p1", "Asha", [0.7] * secs(25), t0=t)
    assert len(alerts) == 1 and alerts[0].extra["threshold"] == 0.65


def test_invalid_settings_are_rejected_at_construction():
    with pytest.raises(ValueError):
        AlertEngine(SignalSettings(confusion_threshold=1.2), "s")


def test_acknowledge():
    eng = engine()
    alerts, _ = feed(eng, "p1", "Asha", [0.8] * secs(25))
    (a,) = alerts
    assert eng.acknowledge(a.alert_id) is True
    assert eng.acknowledge(a.alert_id) is False          # already acknowledged
    assert eng.acknowledge("nope") is False
    assert [x.acknowledged for x in eng.alerts()] == [True]


def test_clock_is_used_only_when_t_is_omitted():
    now = [500.0]
    eng = AlertEngine(S, "s", clock=lambda: now[0])
    out = []
    for _ in range(secs(25)):
        out += eng.student_update("p1", "Asha", SimpleNamespace(confusion=0.9, boredom=None))
        now[0] += DT
    assert len(out) == 1 and out[0].t == pytest.approx(500.0 + S.student_min_seconds)
