"""bot.signals on scripted streams at 2 Hz: scores, windows, attention cues and the class picture."""
from __future__ import annotations

import math

import numpy as np
import pytest

from bot.signals import (ClassSignals, Observation, StudentSignals, StudentState, attention_cues,
                         confusion_instant, downsample, yaw_components)
from core.emotions import EMOTIONS
from core.settings import SignalSettings

HZ = 2.0
S = SignalSettings()

# EMOTIONS order: angry, disgust, fear, happy, sad, surprise, neutral
CONFUSED = (0.30, 0.05, 0.10, 0.00, 0.30, 0.05, 0.20)
HAPPY = (0.02, 0.01, 0.02, 0.80, 0.02, 0.08, 0.05)
NEUTRAL = (0.02, 0.01, 0.02, 0.03, 0.05, 0.02, 0.85)

FRONTAL = np.array([[40, 50], [60, 50], [50, 62], [50, 72], [25, 55], [75, 55]], np.float32)
# Head turned so the nose moves towards the left eye: eyes closer together, the far (left) ear hides
# behind the left eye, the near (right) ear shows a long span.
TURNED = np.array([[46, 50], [62, 50], [62, 62], [58, 72], [24, 55], [64, 55]], np.float32)
BOX = np.array([20, 30, 80, 90], np.float32)


def jitter(p, rng, scale):
    q = np.clip(np.asarray(p, float) + rng.normal(0.0, scale, 7), 0.0, None)
    return q / q.sum()


def run(signals, probs, seconds, t0=0.0, yaw=0.0, face=True, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    states = []
    for i in range(int(round(seconds * HZ))):
        p = jitter(probs, rng, noise) if (face and noise) else probs
        states.append(signals.update(Observation(t=t0 + i / HZ, face_found=face, probs=p if face else None,
                                                 yaw=yaw if face else None)))
    return states


def mirror(kp, width=100.0):
    """The face turned the other way, as the detector labels it: x flipped, and since BlazeFace names the
    image-left eye/ear "right", the eye and ear labels swap too."""
    m = kp.copy()
    m[:, 0] = width - m[:, 0]
    return m[[1, 0, 2, 3, 5, 4]]


# ---- attention cues --------------------------------------------------------------------------------
def test_attention_cues_frontal_face_is_facing_the_screen():
    cues = attention_cues(BOX, FRONTAL)
    assert set(cues) == {"yaw", "face_box_frac"}
    assert abs(cues["yaw"]) < 0.05
    assert cues["face_box_frac"] is None          # no frame size given
    nose_offset, ear_asym = yaw_components(FRONTAL)
    assert abs(nose_offset) < 1e-6 and abs(ear_asym) < 1e-6


def test_attention_cues_turned_face_has_large_yaw_and_sign_follows_direction():
    yaw = attention_cues(BOX, TURNED)["yaw"]
    assert yaw > 0.7
    nose_offset, ear_asym = yaw_components(TURNED)
    assert nose_offset > 0.4 and ear_asym > 0.5
    # Turned the other way: same magnitude, opposite sign.
    assert attention_cues(BOX, mirror(TURNED))["yaw"] == pytest.approx(-yaw, abs=1e-6)


def test_attention_cues_ignore_in_plane_roll():
    centre = FRONTAL.mean(axis=0)
    a = math.radians(25)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    rolled = (FRONTAL - centre) @ rot.T + centre
    assert abs(attention_cues(BOX, rolled)["yaw"]) < 0.05
    rolled_turned = (TURNED - centre) @ rot.T + centre
    assert attention_cues(BOX, rolled_turned)["yaw"] == pytest.approx(attention_cues(BOX, TURNED)["yaw"], abs=1e-5)


def test_attention_cues_degenerate_keypoints_and_box_fraction():
    same = np.tile([[50.0, 50.0]], (6, 1))
    assert attention_cues(BOX, same)["yaw"] is None
    assert attention_cues(BOX, np.full((6, 2), np.nan))["yaw"] is None
    assert attention_cues(BOX, FRONTAL, frame_shape=(240, 320, 3))["face_box_frac"] == pytest.approx(3600 / 76800)


def test_observation_validates_probs_length():
    with pytest.raises(ValueError):
        Observation(t=0.0, face_found=True, probs=(0.5, 0.5))
    assert Observation(t=0.0, face_found=True, probs=np.array(HAPPY)).probs == pytest.approx(HAPPY)


# ---- per-student scores ----------------------------------------------------------------------------
def test_confusion_instant_formula_uses_named_weights():
    p = np.zeros(7)
    p[EMOTIONS.index("angry")] = 0.5
    p[EMOTIONS.index("surprise")] = 0.5
    assert confusion_instant(p, S) == pytest.approx(0.5 * S.confusion_w_angry + 0.5 * S.confusion_w_surprise)
    smiling = np.zeros(7)
    smiling[EMOTIONS.index("sad")] = 0.4
    smiling[EMOTIONS.index("happy")] = 0.6
    assert confusion_instant(smiling, S) == 0.0                  # a smile counts against confusion, clipped at 0


def test_happy_stream_gives_low_confusion_and_low_boredom():
    st = run(StudentSignals(S), HAPPY, 40, noise=0.08)[-1]
    assert st.top_label == "happy"
    assert st.confusion is not None and st.confusion < 0.15
    assert st.boredom is not None and st.boredom < 0.15
    assert st.attention == pytest.approx(1.0)
    assert st.face_share == 1.0 and st.n == int(S.window_seconds * HZ)


def test_confused_stream_gives_high_confusion():
    st = run(StudentSignals(S), CONFUSED, 40, noise=0.03)[-1]
    assert st.confusion > S.confusion_threshold + 0.05
    assert st.boredom < S.boredom_threshold


def test_neutral_still_face_alone_is_not_bored_but_looking_away_or_absent_is():
    attentive = run(StudentSignals(S), NEUTRAL, 40, noise=0.02)[-1]
    assert attentive.boredom < S.boredom_threshold             # listening with a still face is the norm
    assert attentive.confusion < 0.2

    away = run(StudentSignals(S), NEUTRAL, 40, yaw=0.8, noise=0.02)[-1]
    assert away.boredom >= S.boredom_threshold + 0.05
    assert away.attention == 0.0 and away.components["away_share"] == pytest.approx(1.0)

    mixed = StudentSignals(S)
    run(mixed, NEUTRAL, 15, yaw=0.9, noise=0.02)
    st = run(mixed, None, 15, t0=15, face=False)[-1]
    assert st.face_share == pytest.approx(0.5)
    assert st.boredom >= S.boredom_threshold + 0.05
    assert st.attention == pytest.approx(0.0)


def test_absent_face_has_no_confusion_and_zero_attention():
    st = run(StudentSignals(S), None, 20, face=False)[-1]
    assert st.confusion is None and st.top_label is None and st.mean_probs is None
    assert st.attention == 0.0
    assert st.boredom == pytest.approx(S.boredom_w_absent)


def test_scores_wait_for_min_samples():
    sig = StudentSignals(S)
    states = run(sig, CONFUSED, (S.min_samples - 1) / HZ)
    assert all(st.confusion is None and st.boredom is None for st in states)
    st = sig.update(Observation(t=100.0, face_found=True, probs=CONFUSED))
    # t=100 is far past the window: the old samples are gone, one sample is not enough.
    assert st.n == 1 and st.confusion is None
    st = run(sig, CONFUSED, S.min_samples / HZ, t0=100.5)[-1]
    assert st.confusion is not None


def test_window_forgets_old_samples():
    sig = StudentSignals(S)
    run(sig, CONFUSED, 40)
    st = run(sig, HAPPY, S.window_seconds + 1, t0=40)[-1]
    assert st.confusion == 0.0 and st.top_label == "happy"
    assert st.n == int(S.window_seconds * HZ)


def test_stillness_distinguishes_a_still_from_a_changing_face():
    still = run(StudentSignals(S), NEUTRAL, 30, noise=0.01)[-1]
    sig = StudentSignals(S)
    for i in range(60):  # alternates neutral and surprise every 2 s: same mean arousal terms, more movement
        p = NEUTRAL if (i // 4) % 2 == 0 else (0.02, 0.01, 0.05, 0.05, 0.02, 0.8, 0.05)
        changing = sig.update(Observation(t=i / HZ, face_found=True, probs=p))
    assert still.components["stillness"] > 0.8
    assert changing.components["stillness"] < 0.2
    assert changing.boredom < still.boredom


def test_a_long_class_scores_each_window_from_exactly_its_own_samples():
    # 20 minutes of mixed samples (faces, empty frames, jumps in time): the state after each sample must equal
    # that of a fresh student fed only the samples still inside the window, and the baseline must be the
    # median of the scores of the last baseline_seconds.
    rng = np.random.default_rng(7)
    sig, seen, scores, t = StudentSignals(S), [], [], 0.0
    for i in range(2400):
        t += float(rng.choice([0.5, 0.5, 0.45, 3.0], p=[0.5, 0.3, 0.17, 0.03]))
        face = bool(rng.random() > 0.2)
        obs = Observation(t=t, face_found=face, probs=rng.dirichlet(np.ones(7)) if face else None,
                          yaw=float(rng.uniform(-1, 1)))
        seen.append(obs)
        st = sig.update(obs)
        scores.append((t, st.confusion))
        if i % 97:
            continue
        fresh = StudentSignals(S)
        for old in seen:
            if old.t > t - S.window_seconds:
                expected = fresh.update(old)
        assert (st.n, st.n_face, st.top_label) == (expected.n, expected.n_face, expected.top_label)
        for name in ("confusion", "boredom", "attention", "mean_probs"):
            assert getattr(st, name) == pytest.approx(getattr(expected, name), abs=1e-12)
        kept = [c for u, c in scores if u >= t - S.baseline_seconds and c is not None]
        if st.confusion_baseline is not None:
            assert st.confusion_baseline == pytest.approx(float(np.median(kept)), abs=1e-12)


def test_out_of_order_sample_does_not_break_the_window():
    sig = StudentSignals(S)
    run(sig, NEUTRAL, 10)
    st = sig.update(Observation(t=3.0, face_found=True, probs=NEUTRAL))
    assert st.t == pytest.approx(9.5) and st.n == 21


# ---- the class ---------------------------------------------------------------------------------
def state(t, confusion, boredom, probs=NEUTRAL, attention=1.0):
    return StudentState(t=t, n=60, n_face=60, face_share=1.0, confusion=confusion, boredom=boredom,
                        attention=attention, top_label="neutral", mean_probs=tuple(probs))


def test_class_signals_shares_means_and_contract():
    cls = ClassSignals(S)
    states = {"a": state(10, 0.7, 0.1), "b": state(10, 0.6, 0.6), "c": state(10, 0.1, 0.2),
              "d": state(10, None, 0.55), "e": None}
    cs = cls.update(states, 10.0)
    assert cs.analysed == 4 and cs.n_confusion == 3 and cs.n_boredom == 4
    assert cs.confusion_share == pytest.approx(2 / 3)
    assert cs.boredom_share == pytest.approx(2 / 4)
    assert cs.mean_confusion == pytest.approx((0.7 + 0.6 + 0.1) / 3)
    assert cs.mean_probs == pytest.approx(NEUTRAL)
    js = cs.to_json()
    assert set(js) == {"analysed", "confusion_share", "boredom_share", "mean_confusion", "mean_boredom",
                       "mean_probs", "history"}
    assert set(js["history"][0]) == {"t", "confusion_share", "boredom_share", "mean_confusion", "mean_boredom"}


def test_class_signals_ignore_stale_states_and_follow_changed_thresholds():
    thresholds = {"confusion": 0.5, "boredom": 0.5}
    cls = ClassSignals(S, thresholds=lambda: thresholds)
    states = {"a": state(100, 0.65, 0.1), "b": state(100 - S.state_max_age_seconds - 1, 0.9, 0.9)}
    cs = cls.update(states, 100.0)
    assert cs.analysed == 1 and cs.confusion_share == 1.0
    thresholds["confusion"] = 0.7
    assert cls.update(states, 101.0).confusion_share == 0.0


def test_class_history_one_point_per_second_bounded_and_downsampled():
    cls = ClassSignals(S)
    for i in range(int(S.history_seconds * 4) + 40):  # 4 updates per second for > 10 minutes
        t = i / 4
        cs = cls.update({"a": state(t, 0.7, 0.2)}, t)
    hist = cls.history
    assert len(hist) == int(S.history_seconds / S.history_step_seconds)
    steps = np.diff([h.t for h in hist])
    assert np.allclose(steps, S.history_step_seconds)
    sent = cs.to_json()["history"]
    assert len(sent) <= S.history_max_points
    assert sent[-1]["t"] == pytest.approx(hist[-1].t)
    assert downsample(list(range(5)), 10) == list(range(5))  # type: ignore[arg-type]
