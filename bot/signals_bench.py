"""Alert benchmark: false alerts on listening faces, detection and delay on confusion-like rises.

    python -m bot.signals_bench [--json] [--videos DIR] [--minutes 20] [--seed 1]

Runs the same 2 Hz streams through bot.signals + bot.alerts with the old defaults (absolute thresholds
0.5, no baseline, class alerts from 3 students) and the current SignalSettings() defaults, plus a few
candidates around them, and prints one table (docs/signals.md, "Choosing the defaults"):

- real clips: the shared face videos (../shared/media/videos/*.mp4), decoded as a browser would send
  them (320x240, 5 fps), analysed with the configured model, sampled at 2 Hz and looped for --minutes.
  Unlabelled, varied expressions: every alert on them is counted as a false alert. The per-frame
  probabilities are cached in the temp directory, so re-runs take seconds.
- neutral listening: scripted neutral faces with per-sample noise and brief (2-5 s) frowns;
- resting sad-looking face: a face the classifier reads as partly sad/angry all class (confusion ~0.4);
- confusion-like segments: a rise of angry/fear/sad/disgust lasting 20, 40 or 60 s at a known onset
  (4 min in), on a neutral and on a resting sad-looking face; detected = a student alert between the onset
  and the end of the segment plus one window; delay = alert time - onset;
- 2-student class: both students rise for 60 s: does a class alert come?
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bot.alerts import AlertEngine
from bot.signals import ClassSignals, Observation, StudentSignals
from core.emotions import EMOTION_INDEX, NUM_EMOTIONS
from core.settings import ModelSettings, SignalSettings

HZ = 2.0
DT = 1.0 / HZ
ONSET = 240.0
VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "media" / "videos"

# The old defaults (before per-student baselines): what the issue measured alerts never firing with.
OLD = dataclasses.replace(SignalSettings(), confusion_threshold=0.5, boredom_threshold=0.5, student_min_seconds=20.0,
                          baseline_seconds=0.0, min_students_for_class_alert=3, min_students_above_for_class_alert=1)


def probs(**kw: float) -> np.ndarray:
    p = np.zeros(NUM_EMOTIONS)
    for k, v in kw.items():
        p[EMOTION_INDEX[k]] = v
    return p / p.sum()


NEUTRAL = probs(neutral=0.85, sad=0.05, happy=0.04, angry=0.02, surprise=0.02, fear=0.01, disgust=0.01)
RESTING_SAD = probs(neutral=0.45, sad=0.35, angry=0.12, fear=0.04, happy=0.02, disgust=0.02)
CONFUSED = probs(angry=0.3, sad=0.3, fear=0.1, disgust=0.05, surprise=0.05, neutral=0.2)
RISE = 0.6            # a confusion-like segment: 60 % of the face's mass moves to CONFUSED


def noisy(rng: np.random.Generator, mean: np.ndarray, n: int, concentration: float = 40.0) -> np.ndarray:
    return rng.dirichlet(np.maximum(mean, 1e-3) * concentration, size=n)


def listening(rng: np.random.Generator, base: np.ndarray, seconds: float) -> np.ndarray:
    """A listening face: noise around its resting expression, a brief frown (2-5 s) about once a minute."""
    n = int(seconds * HZ)
    out = noisy(rng, base, n)
    i = int(rng.integers(20, 120))
    while i < n:
        length = int(rng.integers(4, 11))
        out[i:i + length] = noisy(rng, (1 - RISE) * base + RISE * CONFUSED, len(out[i:i + length]))
        i += int(rng.integers(60, 180))
    return out


def with_rise(rng: np.random.Generator, stream: np.ndarray, base: np.ndarray, onset: float, seconds: float) -> np.ndarray:
    out = stream.copy()
    a, b = int(onset * HZ), int((onset + seconds) * HZ)
    out[a:b] = noisy(rng, (1 - RISE) * base + RISE * CONFUSED, b - a)
    return out


def run_student(s: SignalSettings, stream: np.ndarray, faces: np.ndarray | None = None) -> list[float]:
    """Alert times (student, confusion or boredom) for one stream of per-sample probabilities."""
    sig, eng = StudentSignals(s), AlertEngine(s, "bench", clock=lambda: 0.0)
    times = []
    for i, p in enumerate(stream):
        face = True if faces is None else bool(faces[i])
        st = sig.update(Observation(t=i * DT, face_found=face, probs=p if face else None))
        times += [a.t for a in eng.student_update("s", "S", st, i * DT) if a.kind == "confusion"]
    return times


def class_alert(s: SignalSettings, streams: list[np.ndarray]) -> list[float]:
    sigs = [StudentSignals(s) for _ in streams]
    eng = AlertEngine(s, "bench", clock=lambda: 0.0)
    cls = ClassSignals(s, thresholds=eng.thresholds)
    times = []
    for i in range(len(streams[0])):
        t = i * DT
        states = {f"s{k}": sig.update(Observation(t=t, face_found=True, probs=st[i])) for k, (sig, st) in
                  enumerate(zip(sigs, streams))}
        if i % 2 == 0:          # the class ticks at 1 Hz
            times += [a.t for a in eng.class_update(cls.update(states, t), t) if a.kind == "confusion"]
    return times


def clip_streams(videos: Path, minutes: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, probs (n, 7), face (n,)) per shared video, sampled at 2 Hz and looped to `minutes`."""
    out = []
    model = ModelSettings()
    for path in sorted(videos.glob("*.mp4")):
        key = hashlib.sha1(f"{path.resolve()}:{path.stat().st_mtime}:{path.stat().st_size}:{model}".encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir()) / f"classmood-bench-{key}.npz"
        if not cache.exists():
            from bot.students import load_video_frames          # cv2 and the model only when needed
            from models.runtime.analyse import build_analyse
            frames = load_video_frames(path, 320, 240, 5.0, max_seconds=3600)
            picked = [frames[min(len(frames) - 1, int(round(k * DT * 5.0)))] for k in range(int(len(frames) / 5.0 * HZ))]
            faces = build_analyse(model)(picked)
            p = np.zeros((len(picked), NUM_EMOTIONS))
            found = np.zeros(len(picked), bool)
            assert faces.probs is not None
            for fid, pr in zip(faces.frame_ids, faces.probs):
                p[int(fid)], found[int(fid)] = pr, True
            np.savez(cache, probs=p, face=found)
        data = np.load(cache)
        n = int(minutes * 60 * HZ)
        reps = -(-n // len(data["probs"]))
        out.append((path.stem, np.tile(data["probs"], (reps, 1))[:n], np.tile(data["face"], reps)[:n]))
    return out


def evaluate(s: SignalSettings, clips: list[tuple[str, np.ndarray, np.ndarray]], minutes: float,
             seed: int, students: int = 8) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    seconds = minutes * 60
    hours = seconds / 3600
    row: dict[str, Any] = {}
    if clips:
        n_alerts = sum(len(run_student(s, p, f)) for _, p, f in clips)
        row["clips_false_per_h"] = round(n_alerts / (hours * len(clips)), 2)
    for name, base in (("neutral", NEUTRAL), ("sad_rest", RESTING_SAD)):
        n_alerts = sum(len(run_student(s, listening(rng, base, seconds))) for _ in range(students))
        row[f"{name}_false_per_h"] = round(n_alerts / (hours * students), 2)
    for seg in (20, 40, 60):
        delays = []
        for base in (NEUTRAL, RESTING_SAD):
            for _ in range(students):
                times = run_student(s, with_rise(rng, listening(rng, base, ONSET + seg + 90), base, ONSET, seg))
                hits = [t - ONSET for t in times if ONSET <= t <= ONSET + seg + s.window_seconds]
                delays.append(hits[0] if hits else None)
        found = [d for d in delays if d is not None]
        row[f"detect_{seg}s"] = round(len(found) / len(delays), 2)
        row[f"delay_{seg}s"] = round(float(np.median(found)), 1) if found else None
    both = [with_rise(rng, listening(rng, NEUTRAL, 420), NEUTRAL, ONSET, 60) for _ in range(2)]
    row["class_of_2"] = any(ONSET <= t <= ONSET + 90 for t in class_alert(s, both))
    return row


def configs() -> list[tuple[str, SignalSettings]]:
    new = SignalSettings()
    out = [("old defaults (absolute 0.50, 20 s)", OLD), ("new defaults", new)]
    for th, hold in ((0.15, 10.0), (0.20, 10.0), (0.30, 10.0), (0.25, 20.0), (0.25, 5.0)):
        if (th, hold) != (new.confusion_threshold, new.student_min_seconds):
            out.append((f"baseline, threshold {th:.2f}, hold {hold:g} s",
                        dataclasses.replace(new, confusion_threshold=th, student_min_seconds=hold)))
    out.append(("baseline, no warm-up margin", dataclasses.replace(new, baseline_warmup_margin=0.0)))
    out.append(("absolute 0.35, 10 s, no baseline", dataclasses.replace(new, baseline_seconds=0.0, confusion_threshold=0.35)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bot.signals_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per configuration instead of the table")
    ap.add_argument("--videos", type=Path, default=VIDEOS, help=f"folder of face videos (default {VIDEOS})")
    ap.add_argument("--minutes", type=float, default=20.0, help="length of every stream (default 20)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    clips = clip_streams(args.videos, args.minutes) if args.videos.is_dir() else []
    if not clips:
        print(f"note: no videos in {args.videos}: the real-clip column is left out", file=sys.stderr)
    rows = [(name, evaluate(s, clips, args.minutes, args.seed)) for name, s in configs()]
    if args.json:
        for name, row in rows:
            print(json.dumps({"config": name, **row}))
        return 0
    cols = list(rows[0][1])
    width = max(len(n) for n, _ in rows)
    print(f"{'configuration':<{width}}  " + "  ".join(cols))
    for name, row in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{str(row[c]):>{len(c)}}" for c in cols))
    print(f"\n{args.minutes:g}-minute streams at {HZ:g} Hz, seed {args.seed}; false alerts per student-hour; "
          f"detect = share of 16 rises (8 on a neutral, 8 on a sad-looking resting face) alerted; "
          f"delay = median seconds from onset; class_of_2 = a class alert when both of 2 students rise for 60 s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
