"""Per-student and class signals: confusion, boredom and attention proxies from expression probabilities.

Pure Python + numpy, imports only `core`. Every update is O(window) in plain arithmetic and never blocks.
The formulas and their default weights are in `core.settings.SignalSettings` and explained, with their
limits, in docs/signals.md. In short, over a sliding window of `window_seconds`:

    confusion = clip(mean over face samples of
                     (w_angry*angry + w_fear*fear + w_sad*sad + w_disgust*disgust + w_surprise*surprise
                      - w_happy*happy), 0, 1)
    boredom   = clip(w_low_arousal * mean(w_neutral*neutral + w_sad*sad)      # face samples
                     + w_stillness * (1 - clip(expressiveness / stillness_full_scale, 0, 1))
                     + w_away * away_share + w_absent * absent_share, 0, 1)
    attention = 1 - away_share - absent_share

Alerts use each student's *adjusted* scores (docs/signals.md, "Baselines"): once a student has
baseline_warmup_seconds of history, adjusted = clip(score - baseline + reference, 0, 1), where baseline is
the median of the student's own scores over the last baseline_seconds; before that (the warm-up),
adjusted = clip(score - baseline_warmup_margin, 0, 1); with baselines off, adjusted = score.

These are proxies computed from facial behaviour; FER-7 has no "confused" or "bored" class.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from core.emotions import EMOTION_INDEX, EMOTIONS, NUM_EMOTIONS
from core.settings import SignalSettings

_ANGRY, _DISGUST, _FEAR, _HAPPY, _SAD, _SURPRISE, _NEUTRAL = (
    EMOTION_INDEX[n] for n in ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"))
_EPS = 1e-9


# ---- attention cues from the detector --------------------------------------------------------------
def yaw_components(keypoints: Any) -> tuple[float, float] | None:
    """(nose_offset, ear_asymmetry) from BlazeFace's six keypoints, or None for a degenerate face.

    Both are measured along the eye axis u (right eye -> left eye, so in-plane roll does not matter):
    nose_offset   = ((nose - eye_midpoint) . u) / inter_ocular_distance            (0 for a frontal face)
    ear_asymmetry = (d_right - d_left) / (d_right + d_left), with d_right = (right_eye - right_ear) . u and
                    d_left = (left_ear - left_eye) . u, the ear-to-eye spans (the far ear's span shrinks
                    as it turns out of view). Both are positive when the nose moves towards the left eye.
    """
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (6, 2) or not np.all(np.isfinite(kp)):
        return None
    # Plain floats from here: numpy on 2-vectors costs more than the arithmetic (this runs on every sample).
    (rx, ry), (lx, ly), (nx, ny), _mouth, (rex, rey), (lex, ley) = kp.tolist()
    iod = math.hypot(lx - rx, ly - ry)
    if iod < 1e-6:
        return None
    ux, uy = (lx - rx) / iod, (ly - ry) / iod
    nose_offset = ((nx - (rx + lx) / 2.0) * ux + (ny - (ry + ly) / 2.0) * uy) / iod
    d_right = max((rx - rex) * ux + (ry - rey) * uy, 0.0)
    d_left = max((lex - lx) * ux + (ley - ly) * uy, 0.0)
    span = d_right + d_left
    ear_asymmetry = (d_right - d_left) / span if span > _EPS else 0.0
    return nose_offset, ear_asymmetry


def attention_cues(box: Any, keypoints: Any, frame_shape: Sequence[int] | None = None,
                   settings: SignalSettings | None = None) -> dict[str, float | None]:
    """Observation keyword arguments from one detection: {"yaw": [-1, 1] or None, "face_box_frac": float or None}.

    yaw = clip(w_nose * clip(nose_offset / nose_full_scale, -1, 1) + w_ear * ear_asymmetry, -1, 1);
    0 = facing the camera, |yaw| -> 1 = head turned fully to one side. Positive = nose towards the eye the
    detector labels "left_eye" (the image's right); the sign flips with a mirrored image, and only |yaw| is used. face_box_frac = box area / frame area, when
    frame_shape (height, width, ...) is given. Eyes closed cannot be read from these keypoints (BlazeFace
    gives one point per eye, no lids), so no eye-closure cue exists here.
    """
    s = settings or SignalSettings()
    yaw: float | None = None
    parts = yaw_components(keypoints)
    if parts is not None:
        nose_offset, ear_asymmetry = parts
        nose_term = _clip(nose_offset / max(s.yaw_nose_full_scale, _EPS), -1.0, 1.0)
        yaw = _clip(s.yaw_nose_weight * nose_term + s.yaw_ear_weight * ear_asymmetry, -1.0, 1.0)
    frac: float | None = None
    if frame_shape is not None and box is not None:
        b = np.asarray(box, dtype=np.float64).reshape(-1).tolist()
        h, w = float(frame_shape[0]), float(frame_shape[1])
        if len(b) == 4 and all(map(math.isfinite, b)) and h > 0 and w > 0:
            frac = _clip(max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0) / (h * w), 0.0, 1.0)
    return {"yaw": yaw, "face_box_frac": frac}


# ---- one sample ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observation:
    """One analysed frame of one student.

    t: seconds (any clock, the same for all of a student's observations); face_found: a face was detected;
    probs: 7 floats in EMOTIONS order (ignored when face_found is False); yaw: head-turn proxy in [-1, 1]
    from `attention_cues` (None = unknown, counted as facing); face_box_frac: face box area / frame area
    (recorded, not used in any score).
    """

    t: float
    face_found: bool
    probs: Sequence[float] | None = None
    yaw: float | None = None
    face_box_frac: float | None = None

    def __post_init__(self) -> None:
        if self.probs is not None:
            p = tuple(float(x) for x in self.probs)
            if len(p) != NUM_EMOTIONS:
                raise ValueError(f"probs must have {NUM_EMOTIONS} values in EMOTIONS order, got {len(p)}")
            object.__setattr__(self, "probs", p)


def confusion_instant(probs: Sequence[float] | np.ndarray, s: SignalSettings) -> np.ndarray | float:
    """Per-sample confusion evidence (before the window mean), clipped to [0, 1]. probs: (7,) or (N, 7)."""
    p = np.asarray(probs, dtype=np.float64)
    raw = (s.confusion_w_angry * p[..., _ANGRY] + s.confusion_w_fear * p[..., _FEAR]
           + s.confusion_w_sad * p[..., _SAD] + s.confusion_w_disgust * p[..., _DISGUST]
           + s.confusion_w_surprise * p[..., _SURPRISE] - s.confusion_w_happy * p[..., _HAPPY])
    out = np.clip(raw, 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def low_arousal_instant(probs: Sequence[float] | np.ndarray, s: SignalSettings) -> np.ndarray | float:
    """Per-sample low-arousal evidence: w_neutral * neutral + w_sad * sad, clipped to [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    out = np.clip(s.low_arousal_w_neutral * p[..., _NEUTRAL] + s.low_arousal_w_sad * p[..., _SAD], 0.0, 1.0)
    return float(out) if out.ndim == 0 else out


def facing(yaw: float | None, s: SignalSettings) -> float:
    """1 when |yaw| <= yaw_attentive, 0 when |yaw| >= yaw_away, linear in between; unknown yaw counts as 1."""
    if yaw is None or not math.isfinite(yaw):
        return 1.0
    span = max(s.yaw_away - s.yaw_attentive, _EPS)
    return 1.0 - _clip((abs(yaw) - s.yaw_attentive) / span, 0.0, 1.0)


# ---- one student -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentState:
    """A student's signals over the window ending at t.

    n: samples in the window; n_face: those with a face; face_share = n_face / n.
    confusion: [0, 1], None until n_face >= min_samples.  boredom: [0, 1], None until n >= min_samples.
    attention: [0, 1], share of window samples with a face turned towards the screen (soft edge on yaw).
    top_label: argmax of mean_probs (window mean of the face samples' probabilities), or None without faces.
    components: the window terms the scores are made of (low_arousal, stillness, expressiveness,
    away_share, absent_share; None where there were too few face samples).
    confusion_baseline / boredom_baseline: the median of this student's own scores over the last
    baseline_seconds, None during the warm-up (or with baselines off).
    confusion_adjusted / boredom_adjusted: what the alerts compare with the thresholds:
    clip(score - baseline + baseline_reference, 0, 1) with a baseline, clip(score - baseline_warmup_margin, 0, 1)
    during the warm-up, the score itself with baselines off (baseline_seconds 0).
    """

    t: float
    n: int
    n_face: int
    face_share: float
    confusion: float | None
    boredom: float | None
    attention: float | None
    top_label: str | None
    mean_probs: tuple[float, ...] | None
    components: Mapping[str, float | None] = field(default_factory=dict)
    confusion_baseline: float | None = None
    boredom_baseline: float | None = None
    confusion_adjusted: float | None = None
    boredom_adjusted: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "n": self.n, "n_face": self.n_face, "face_share": _r(self.face_share),
                "confusion": _r(self.confusion), "boredom": _r(self.boredom), "attention": _r(self.attention),
                "top_label": self.top_label,
                "mean_probs": None if self.mean_probs is None else [_r(p) for p in self.mean_probs],
                "components": {k: _r(v) for k, v in self.components.items()},
                "confusion_baseline": _r(self.confusion_baseline), "boredom_baseline": _r(self.boredom_baseline),
                "confusion_adjusted": _r(self.confusion_adjusted), "boredom_adjusted": _r(self.boredom_adjusted)}


class Baseline:
    """One student's usual level of one score: the median of their scores over the last `seconds`.

    A median, not a mean or an EMA, so that a confused minute inside five does not move it: an episode
    changes the baseline only once it fills half of the span (then it *is* this student's usual).
    `ready` once the kept history spans `warmup_seconds`; until then `value` is None and the raw score
    is used, so that a student who looks confused from the start is not taken as their own normal.
    The scores are also kept sorted, so the median costs nothing: it is read on every sample (200 a
    second in a class of 100) over up to 600 scores.
    """

    def __init__(self, seconds: float, warmup_seconds: float) -> None:
        self.seconds, self.warmup_seconds = float(seconds), float(warmup_seconds)
        self._history: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []

    def reset(self) -> None:
        self._history.clear()
        self._sorted.clear()

    def add(self, t: float, score: float | None) -> None:
        if self.seconds <= 0 or score is None:
            return
        self._history.append((t, float(score)))
        bisect.insort(self._sorted, float(score))
        while self._history and self._history[0][0] < t - self.seconds:
            _, old = self._history.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    @property
    def value(self) -> float | None:
        if self.seconds <= 0 or not self._history or \
                self._history[-1][0] - self._history[0][0] < self.warmup_seconds - _EPS:
            return None
        values, mid = self._sorted, len(self._sorted) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2.0


def adjusted_score(score: float | None, baseline: float | None, reference: float) -> float | None:
    """The score the alerts use: relative to the student's baseline, on the scale of a typical resting face."""
    if score is None or baseline is None:
        return score
    return _clip(score - baseline + reference, 0.0, 1.0)


@dataclass(frozen=True)
class _Sample:
    t: float
    face: bool
    facing: float          # facing() of this sample; 0 without a face


class _FaceRows:
    """The probabilities of the window's face samples as one (n, 7) array, oldest first. Rows are appended
    at the end and dropped from the front in place, so the window is never re-stacked from its samples."""

    def __init__(self, capacity: int = 64) -> None:
        self._rows = np.empty((capacity, NUM_EMOTIONS), dtype=np.float64)
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, probs: np.ndarray) -> None:
        if self._end == len(self._rows):
            n = len(self)
            rows = np.empty((2 * len(self._rows), NUM_EMOTIONS)) if 2 * n > len(self._rows) else self._rows
            rows[:n] = self._rows[self._start:self._end]
            self._rows, self._start, self._end = rows, 0, n
        self._rows[self._end] = probs
        self._end += 1

    def popleft(self) -> None:
        self._start += 1

    def clear(self) -> None:
        self._start = self._end = 0

    @property
    def array(self) -> np.ndarray:
        return self._rows[self._start:self._end]


class StudentSignals:
    """Sliding-window signals for one student. `update(obs)` adds a sample and returns the new StudentState."""

    def __init__(self, settings: SignalSettings | None = None) -> None:
        self.settings = settings or SignalSettings()
        self._window: deque[_Sample] = deque()
        self._faces = _FaceRows()      # the probabilities of the window's face samples, in window order
        self._last_t: float | None = None
        self.state: StudentState | None = None
        s = self.settings
        self._baselines = {kind: Baseline(s.baseline_seconds, s.baseline_warmup_seconds)
                           for kind in ("confusion", "boredom")}

    def reset(self) -> None:
        """Forget every sample (e.g. when the student opts out)."""
        self._window.clear()
        self._faces.clear()
        for baseline in self._baselines.values():
            baseline.reset()
        self._last_t = None
        self.state = None

    def __len__(self) -> int:
        return len(self._window)

    def update(self, obs: Observation) -> StudentState:
        s = self.settings
        t = float(obs.t)
        if self._last_t is not None and t < self._last_t:
            t = self._last_t          # out-of-order sample: keep the window's time monotone
        self._last_t = t
        probs = None
        if obs.face_found and obs.probs is not None:
            arr = np.asarray(obs.probs, dtype=np.float64)
            if np.all(np.isfinite(arr)):
                probs = arr
        face = probs is not None
        self._window.append(_Sample(t, face, facing(obs.yaw, s) if face else 0.0))
        if probs is not None:
            self._faces.append(probs)
        horizon = t - s.window_seconds
        while self._window and self._window[0].t <= horizon:
            if self._window.popleft().face:
                self._faces.popleft()
        fields = self._compute(t)
        confusion, boredom = fields["confusion"], fields["boredom"]
        base_c, base_b = self._baselines["confusion"], self._baselines["boredom"]
        base_c.add(t, confusion)
        base_b.add(t, boredom)
        bc, bb = base_c.value, base_b.value
        self.state = StudentState(**fields, confusion_baseline=bc, boredom_baseline=bb,
                                  confusion_adjusted=self._adjusted(confusion, bc, s.baseline_reference_confusion),
                                  boredom_adjusted=self._adjusted(boredom, bb, s.baseline_reference_boredom))
        return self.state

    def _adjusted(self, score: float | None, baseline: float | None, reference: float) -> float | None:
        s = self.settings
        if score is None or s.baseline_seconds <= 0:
            return score
        if baseline is None:
            # Warm-up: no usual yet, so the raw score counts, less a margin (the threshold plus the margin is
            # the old absolute threshold): a face that reads sad at rest does not alert before its usual is known.
            return _clip(score - s.baseline_warmup_margin, 0.0, 1.0)
        return adjusted_score(score, baseline, reference)

    def _compute(self, t: float) -> dict[str, Any]:
        """StudentState's fields over the window, without the baselines."""
        s = self.settings
        window = self._window
        n = len(window)
        P = self._faces.array
        n_face = len(P)
        face_share = n_face / n if n else 0.0
        absent_share = 1.0 - face_share
        attention = sum(w.facing for w in window) / n if n else None
        away_share = max(face_share - (attention or 0.0), 0.0)

        mean_probs: np.ndarray | None = None
        confusion = low_arousal = stillness = expressiveness = None
        if n_face:
            mean_probs = P.mean(axis=0)
            if n_face >= s.min_samples:
                confusion = float(np.mean(confusion_instant(P, s)))
                low_arousal = float(np.mean(low_arousal_instant(P, s)))
                # expressiveness: mean total-variation distance of each sample from the window's mean expression
                expressiveness = float(np.mean(0.5 * np.abs(P - mean_probs).sum(axis=1)))
                stillness = 1.0 - _clip(expressiveness / max(s.stillness_full_scale, _EPS), 0.0, 1.0)
        boredom = None
        if n >= s.min_samples:
            boredom = _clip(s.boredom_w_low_arousal * (low_arousal or 0.0) + s.boredom_w_stillness * (stillness or 0.0)
                            + s.boredom_w_away * away_share + s.boredom_w_absent * absent_share, 0.0, 1.0)
        top_label = EMOTIONS[int(np.argmax(mean_probs))] if mean_probs is not None else None
        return dict(
            t=t, n=n, n_face=n_face, face_share=face_share,
            confusion=None if confusion is None else _clip(confusion, 0.0, 1.0), boredom=boredom,
            attention=None if attention is None else _clip(attention, 0.0, 1.0), top_label=top_label,
            mean_probs=None if mean_probs is None else tuple(mean_probs.tolist()),
            components={"low_arousal": low_arousal, "stillness": stillness, "expressiveness": expressiveness,
                        "away_share": away_share, "absent_share": absent_share})


# ---- the class -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HistoryPoint:
    t: float
    confusion_share: float
    boredom_share: float
    mean_confusion: float | None
    mean_boredom: float | None

    def to_json(self) -> dict[str, Any]:
        return {"t": round(self.t, 1), "confusion_share": _r(self.confusion_share),
                "boredom_share": _r(self.boredom_share), "mean_confusion": _r(self.mean_confusion),
                "mean_boredom": _r(self.mean_boredom)}


@dataclass(frozen=True)
class ClassState:
    """The class picture at t over the analysed students whose state is fresh (<= state_max_age_seconds).

    analysed: students counted; n_confusion / n_boredom: those with a confusion / boredom score.
    confusion_share / boredom_share: share of the scored students at or above the threshold (0 when none).
    mean_confusion / mean_boredom / mean_probs: means over the scored students (None when none).
    confusion_scores / boredom_scores: the per-student scores behind the shares (each student's adjusted
    score, see StudentState), so the alert engine can recompute the shares with the thresholds in force. thresholds: those used for the shares here.
    history: one point per history_step_seconds, oldest first, at most history_seconds long.
    """

    t: float
    analysed: int
    n_confusion: int
    n_boredom: int
    confusion_share: float
    boredom_share: float
    mean_confusion: float | None
    mean_boredom: float | None
    mean_attention: float | None
    mean_probs: tuple[float, ...] | None
    confusion_scores: tuple[float, ...]
    boredom_scores: tuple[float, ...]
    thresholds: Mapping[str, float]
    history: tuple[HistoryPoint, ...] = ()
    history_max_points: int = 60

    def to_json(self) -> dict[str, Any]:
        """The `class` object of the live state message (docs/architecture.md), history downsampled."""
        return {"analysed": self.analysed, "confusion_share": _r(self.confusion_share),
                "boredom_share": _r(self.boredom_share), "mean_confusion": _r(self.mean_confusion),
                "mean_boredom": _r(self.mean_boredom),
                "mean_probs": None if self.mean_probs is None else [_r(p) for p in self.mean_probs],
                "history": [h.to_json() for h in downsample(self.history, self.history_max_points)]}


def downsample(points: Sequence[HistoryPoint], max_points: int) -> list[HistoryPoint]:
    """At most max_points, evenly strided and always ending with the latest point."""
    n = len(points)
    if max_points <= 0 or n <= max_points:
        return list(points)
    stride = math.ceil(n / max_points)
    return [points[i] for i in range(n - 1, -1, -stride)][::-1]


class ClassSignals:
    """Aggregates the current StudentStates of the analysed students (present, not opted out; muted students
    are included: muting only silences that student's own alerts).

    thresholds: optional callable returning {"confusion": x, "boredom": x} in force (e.g.
    `AlertEngine.thresholds`), so the shares shown follow a threshold the teacher changed during class.
    """

    def __init__(self, settings: SignalSettings | None = None,
                 thresholds: Callable[[], Mapping[str, float]] | None = None) -> None:
        self.settings = settings or SignalSettings()
        self._thresholds = thresholds
        maxlen = max(1, int(math.ceil(self.settings.history_seconds / max(self.settings.history_step_seconds, _EPS))))
        self._history: deque[HistoryPoint] = deque(maxlen=maxlen)
        self.state: ClassState | None = None

    def thresholds(self) -> dict[str, float]:
        base = {"confusion": self.settings.confusion_threshold, "boredom": self.settings.boredom_threshold}
        if self._thresholds is not None:
            given = self._thresholds()
            base.update({k: float(given[k]) for k in ("confusion", "boredom") if k in given})
        return base

    def update(self, states: Mapping[str, StudentState | None] | Iterable[StudentState | None],
               t: float) -> ClassState:
        s = self.settings
        values = states.values() if isinstance(states, Mapping) else states
        fresh = [st for st in values if st is not None and st.t >= t - s.state_max_age_seconds]
        th = self.thresholds()
        conf = tuple(float(st.confusion) for st in fresh if st.confusion is not None)
        bore = tuple(float(st.boredom) for st in fresh if st.boredom is not None)
        # Shares count students against their own baseline, as their alerts do; means stay absolute.
        conf_alert = tuple(alert_score(st, "confusion") for st in fresh if st.confusion is not None)
        bore_alert = tuple(alert_score(st, "boredom") for st in fresh if st.boredom is not None)
        att = [float(st.attention) for st in fresh if st.attention is not None]
        probs = [st.mean_probs for st in fresh if st.mean_probs is not None]
        state = ClassState(
            t=float(t), analysed=len(fresh), n_confusion=len(conf), n_boredom=len(bore),
            confusion_share=share_at_or_above(conf_alert, th["confusion"]),
            boredom_share=share_at_or_above(bore_alert, th["boredom"]),
            mean_confusion=sum(conf) / len(conf) if conf else None,
            mean_boredom=sum(bore) / len(bore) if bore else None,
            mean_attention=sum(att) / len(att) if att else None,
            mean_probs=tuple(float(x) for x in np.mean(np.asarray(probs, dtype=np.float64), axis=0)) if probs else None,
            confusion_scores=conf_alert, boredom_scores=bore_alert, thresholds=th,
            history_max_points=s.history_max_points)
        last = self._history[-1].t if self._history else None
        if last is None or t - last >= 0.9 * s.history_step_seconds or t < last:
            if last is not None and t < last:
                self._history.clear()     # the clock went backwards: start a new history
            self._history.append(HistoryPoint(float(t), state.confusion_share, state.boredom_share,
                                              state.mean_confusion, state.mean_boredom))
        self.state = _with_history(state, tuple(self._history))
        return self.state

    @property
    def history(self) -> tuple[HistoryPoint, ...]:
        return tuple(self._history)


def alert_score(state: Any, kind: str) -> float:
    """A state's adjusted score of `kind` when it has one, else its raw score (states built without baselines)."""
    adjusted = getattr(state, f"{kind}_adjusted", None)
    return float(adjusted if adjusted is not None else getattr(state, kind))


def share_at_or_above(scores: Sequence[float], threshold: float) -> float:
    return sum(1 for v in scores if v >= threshold) / len(scores) if scores else 0.0


def _with_history(state: ClassState, history: tuple[HistoryPoint, ...]) -> ClassState:
    return replace(state, history=history)


def _clip(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else float(x)


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)
