"""Accuracy of an expression model, with the mini-Xception baseline measured in the same run.

    python -m models.evaluate --model fer2013 --data ../shared/datasets/fer2013 --split PrivateTest --labels fer2013 --json
    python -m models.evaluate --model ferplus --data ../shared/datasets/fer2013 --split PrivateTest --labels ferplus
    python -m models.evaluate --folder DIR [--detect] --json     # DIR/<class>/*.jpg, any common class spelling
    python -m models.evaluate --model ferplus --data ../shared/datasets/fer2013 --labels ferplus --detect
        # the bot's whole path on the benchmark faces: each 48x48 face upscaled to 192 px, detected, aligned

Prints a table; with --json the last stdout line is one JSON object
{"accuracy", "n", "per_class": {label: {"accuracy", "precision", "n"}}, "baseline_accuracy", ...,
"mean_recall" (recall averaged over the classes), "ece" (expected calibration error, 15 bins)}.
Bad input gets a one-line error on stderr and exit code 2; with --folder, images that cannot be read
are reported, left out of the score, and make the exit code 1 (the table and JSON are still printed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from core.emotions import EMOTIONS, NUM_EMOTIONS
from models.data import IMAGE_SUFFIXES, DatasetError, FerData, iter_class_folders, load_dataset, read_image, to_face48
from models.cli_args import positive_int
from models.degrade import KINDS, degrade_faces, degrade_images, parse as parse_degradation


class UsageError(Exception):
    pass


def per_class(pred: np.ndarray, truth: np.ndarray) -> dict[str, dict[str, float | int | None]]:
    out = {}
    for i, label in enumerate(EMOTIONS):
        n = int((truth == i).sum())
        predicted = int((pred == i).sum())
        hits = int(((pred == i) & (truth == i)).sum())
        out[label] = {"accuracy": round(hits / n, 4) if n else None,
                      "precision": round(hits / predicted, 4) if predicted else None, "n": n}
    return out


def confusion(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    matrix = np.zeros((NUM_EMOTIONS, NUM_EMOTIONS), np.int64)
    for t, p in zip(truth, pred):
        if p >= 0:
            matrix[t, p] += 1
    return matrix


def draw_confusion(matrix: np.ndarray, path: str, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (OpenCV drawing: no plotting library needed)."""
    cell, left, top = 70, 110, 60
    size = (top + cell * NUM_EMOTIONS + 40, left + cell * NUM_EMOTIONS + 20)
    img = np.full((*size, 3), 255, np.uint8)
    rows = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    cv2.putText(img, title[:70], (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    for i in range(NUM_EMOTIONS):
        cv2.putText(img, EMOTIONS[i], (8, top + i * cell + cell // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, EMOTIONS[i][:7], (left + i * cell + 6, top - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        for j in range(NUM_EMOTIONS):
            v = rows[i, j]
            colour = (int(255 - 200 * v), int(255 - 120 * v), 255) if i != j else (int(255 - 200 * v), 255, int(255 - 200 * v))
            x, y = left + j * cell, top + i * cell
            cv2.rectangle(img, (x, y), (x + cell - 2, y + cell - 2), colour, -1)
            cv2.putText(img, f"{v:.2f}", (x + 14, y + 32), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
            cv2.putText(img, str(int(matrix[i, j])), (x + 18, y + 52), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (60, 60, 60), 1, cv2.LINE_AA)
    cv2.putText(img, "rows: true label, columns: predicted", (left, size[0] - 15), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (0, 0, 0), 1, cv2.LINE_AA)
    write_image(path, img, "confusion")


def write_image(path: str, img: np.ndarray, what: str) -> None:
    try:
        written = cv2.imwrite(path, img)
    except cv2.error:
        written = False
    if not written:
        raise UsageError(f"cannot write the {what} image {path} (use a .png or .jpg path in an existing folder)")


def draw_reliability(probs: np.ndarray, truth: np.ndarray, path: str, title: str, bins: int = 15) -> None:
    """Reliability diagram as a PNG: per confidence bin, the accuracy (bar) against the diagonal, with the
    share of faces in each bin underneath (OpenCV drawing)."""
    keep = ~np.isnan(probs).any(1)
    confidence, hits = probs[keep].max(1), probs[keep].argmax(1) == truth[keep]
    index = np.clip(np.digitize(confidence, np.linspace(0, 1, bins + 1)[1:-1], right=True), 0, bins - 1)
    w, h, left, top, plot = 620, 560, 70, 50, 420
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.putText(img, title[:60], (10, 28), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    x0, y0 = left, top + plot
    cv2.rectangle(img, (x0, top), (x0 + plot, y0), (0, 0, 0), 1)
    cv2.line(img, (x0, y0), (x0 + plot, top), (150, 150, 150), 1, cv2.LINE_AA)
    step = plot / bins
    for b in range(bins):
        members = index == b
        if not members.any():
            continue
        acc = float(hits[members].mean())
        xa, xb = int(x0 + b * step + 1), int(x0 + (b + 1) * step - 1)
        cv2.rectangle(img, (xa, int(y0 - acc * plot)), (xb, y0), (200, 130, 40), -1)
        share = float(members.mean())
        cv2.rectangle(img, (xa, y0 + 40 - int(share * 60)), (xb, y0 + 40), (120, 120, 120), -1)
    for v in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{v:.1f}", (int(x0 + v * plot) - 10, y0 + 58), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(img, f"{v:.1f}", (x0 - 40, int(y0 - v * plot) + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "confidence (top probability); bars: accuracy, grey: share of faces", (x0 - 40, h - 10),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    write_image(path, img, "reliability")


DETECT_SIZE = 192    # --data --detect: benchmark faces are upscaled to this side, like a webcam close-up


def dataset_faces(args: argparse.Namespace, data: FerData,
                  degrade: tuple[str, float] | None = None) -> tuple[np.ndarray | list, np.ndarray, dict]:
    part = data.split(args.split)
    if len(part) == 0:
        raise UsageError(f"{args.data}: no rows in split {args.split}")
    hard, _ = part.targets(args.labels)
    keep = hard >= 0
    info = {"split": args.split, "labels": args.labels, "excluded": int((~keep).sum())}
    if degrade:
        info["degrade"] = f"{degrade[0]}:{degrade[1]:g}"
    if not args.detect:
        faces48 = (part.images[keep].astype(np.float32) / 255.0)[..., None]
        return (degrade_faces(faces48, *degrade) if degrade else faces48), hard[keep], info
    detector = _detector(args)
    upscaled = [cv2.resize(image, (DETECT_SIZE, DETECT_SIZE), interpolation=cv2.INTER_CUBIC) for image in part.images[keep]]
    if degrade:
        upscaled = degrade_images(upscaled, *degrade)
    faces = [detect_and_align(detector, image) for image in upscaled]
    return faces, hard[keep], {**info, "no_face": sum(f is None for f in faces), "detect": True}


def _detector(args: argparse.Namespace):
    from models.runtime.detector import make_detector
    return make_detector("auto", threads=args.threads, tiles="auto")


def detect_and_align(detector, image: np.ndarray) -> np.ndarray | None:
    """The largest detected face, aligned to (48, 48, 1) in [0, 1]; None when there is no face."""
    from models.runtime.preprocess import align_faces
    found = detector.detect([image]).largest_per_frame()
    return align_faces([image], found)[0] if len(found) else None


def folder_faces(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, dict]:
    root = Path(args.folder)
    if not root.is_dir():
        raise UsageError(f"{root}: not a folder")
    faces, truth, skipped, unreadable, no_face = [], [], 0, 0, 0
    unreadable_files: list[str] = []
    detector = _detector(args) if args.detect else None
    classes = list(iter_class_folders(root))
    for _name, label, folder in classes:
        files = [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        if label is None:
            skipped += len(files)
            continue
        for file in files:
            try:
                image = read_image(file)
            except DatasetError as exc:
                unreadable += 1
                print(f"warning: {exc}", file=sys.stderr)
                if len(unreadable_files) < 20:
                    unreadable_files.append(str(file))
                continue
            if detector is not None:
                faces.append(detect_and_align(detector, image))
                no_face += faces[-1] is None
            else:
                faces.append((to_face48(image).astype(np.float32) / 255.0)[..., None])
            truth.append(EMOTIONS.index(label))
    if not truth:
        unknown = sorted(name for name, label, _ in classes if label is None)
        if unknown and not any(label for _, label, _ in classes):
            raise UsageError(f"{root}: no folder named after a class we predict (found {', '.join(unknown[:10])}; "
                             f"use {', '.join(EMOTIONS)} or a common spelling such as anger, happiness, surprised)")
        raise UsageError(f"{root}: no readable images in class folders (expected {root}/<class>/*.jpg)")
    return faces, np.array(truth), {"folder": str(root), "skipped": skipped, "unreadable": unreadable,
                                    "unreadable_files": unreadable_files,
                                    "no_face": no_face, "detect": bool(args.detect)}  # type: ignore[return-value]


def predict_with_gaps(predict, faces) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class where a face exists, -1 (always wrong) where the detector found none; and the
    probabilities (N, 7), NaN rows for the gaps."""
    present = [i for i, f in enumerate(faces) if f is not None]
    pred = np.full(len(faces), -1, np.int64)
    probs = np.full((len(faces), NUM_EMOTIONS), np.nan, np.float32)
    if present:
        probs[present] = predict(np.stack([faces[i] for i in present]))
        pred[present] = probs[present].argmax(1)
    return pred, probs


def mean_recall(pred: np.ndarray, truth: np.ndarray) -> float:
    """Recall averaged over the classes present in `truth` (balanced accuracy)."""
    recalls = [float((pred[truth == i] == i).mean()) for i in range(NUM_EMOTIONS) if (truth == i).any()]
    return float(np.mean(recalls)) if recalls else 0.0


ECE_BINS = 15


def expected_calibration_error(probs: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE over the faces with probabilities: |accuracy - mean confidence| per confidence bin (equal width),
    weighted by the bin's share of faces. 0 = the top probability means exactly what it says."""
    keep = ~np.isnan(probs).any(1)
    if not keep.any():
        return 0.0
    confidence, hits = probs[keep].max(1), (probs[keep].argmax(1) == truth[keep])
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            ece += members.mean() * abs(float(hits[members].mean()) - float(confidence[members].mean()))
    return float(ece)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ferplus", help="ferplus | fer2013 | path to a .tflite file")
    p.add_argument("--data", help="fer2013.csv(.gz), its folder, an image-folder tree or archive.zip")
    p.add_argument("--split", default="PrivateTest", choices=("PrivateTest", "PublicTest", "Training"))
    p.add_argument("--labels", default="fer2013", choices=("fer2013", "ferplus"),
                   help="with --data: score FER2013's own labels (default) or the FER+ majority labels")
    p.add_argument("--folder", help="folder with one sub-folder per class")
    p.add_argument("--detect", action="store_true", help="detect and align the largest face first (with --data: "
                   f"each face upscaled to {DETECT_SIZE} px; a face not found counts as wrong, under no_face)")
    p.add_argument("--threads", type=positive_int, default=2, help="TFLite interpreter threads (default 2)")
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-flip", action="store_true", help="classify each face once, without averaging with its mirror image")
    p.add_argument("--confusion", metavar="OUT.png", help="write the confusion matrix as an image")
    p.add_argument("--uncalibrated", action="store_true", help="leave out the temperature shipped with the model "
                   "(models.calibrate), to compare calibration before and after")
    p.add_argument("--reliability", metavar="OUT.png", help="write the reliability diagram (accuracy per confidence bin)")
    p.add_argument("--degrade", metavar="KIND[:LEVEL]", help="score faces degraded as the bot's camera path does "
                   f"(with --data): {', '.join(KINDS)}, at low, mid (default), high or a number (models/degrade.py); "
                   "'all': every kind at its middle level, one table")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if bool(args.data) == bool(args.folder):
        print("error: give exactly one of --data or --folder", file=sys.stderr)
        return 2
    if args.degrade and not args.data:
        print("error: --degrade needs --data (the FER2013 faces)", file=sys.stderr)
        return 2
    kinds: list[str | None] = [None, *(f"{kind}:mid" for kind in KINDS)] if args.degrade == "all" else [args.degrade]
    try:
        specs = [parse_degradation(kind) if kind else None for kind in kinds]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # The model, the baseline and the dataset are loaded once, also for `--degrade all`'s ten scores.
        from models.runtime.classifier import ExpressionClassifier
        classifier = ExpressionClassifier(args.model, threads=args.threads, flip_average=not args.no_flip,
                                          calibrated=not args.uncalibrated)
        from models.baseline import BaselineClassifier
        baseline = None if args.no_baseline else BaselineClassifier.load(threads=args.threads)
        data = load_dataset(args.data) if args.data else None
        if args.degrade == "all":
            return degrade_table(args, [score(args, spec, classifier, baseline, data)[0] for spec in specs])
        result, pred, probs, truth = score(args, specs[0], classifier, baseline, data)
        if args.reliability:
            draw_reliability(probs, truth, args.reliability,
                             f"{classifier.name}{' (uncalibrated)' if args.uncalibrated else ''}: ECE {result['ece']:.3f}")
        if args.confusion:
            draw_confusion(confusion(pred, truth), args.confusion,
                           f"{classifier.name} on {result.get('split', result.get('folder'))} "
                           f"({result.get('labels', 'folder')} labels)")
    except (DatasetError, UsageError, OSError, ValueError, cv2.error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'class':<10} {'n':>6} {'recall':>8} {'precision':>10} {'baseline recall':>16}")
    for label in EMOTIONS:
        ours = result["per_class"][label]
        base = result["baseline_per_class"][label] if result["baseline_per_class"] else None
        fmt = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        print(f"{label:<10} {ours['n']:>6} {fmt(ours['accuracy']):>8} {fmt(ours['precision']):>10} "
              f"{fmt(base['accuracy']) if base else '—':>16}")
    base_acc = result["baseline_accuracy"]
    print(f"{'overall':<10} {result['n']:>6} {100 * result['accuracy']:>7.2f}% {'':>10} "
          f"{(f'{100 * base_acc:.2f}%' if base_acc is not None else 'n/a'):>16}")
    base_mr, base_ece = result["baseline_mean_recall"], result["baseline_ece"]
    print(f"{'mean recall':<17} {100 * result['mean_recall']:>7.2f}% {'':>10} "
          f"{(f'{100 * base_mr:.2f}%' if base_mr is not None else 'n/a'):>16}")
    print(f"{'ECE (15 bins)':<17} {result['ece']:>8.4f} {'':>10} {(f'{base_ece:.4f}' if base_ece is not None else 'n/a'):>16}")
    for key in ("skipped", "unreadable", "no_face", "excluded"):
        if result.get(key):
            print(f"{key}: {result[key]}")
    if args.json:
        print(json.dumps(result))
    if result.get("unreadable"):
        # The readable images are scored above, but a corrupt input must not pass silently (exit 1).
        print(f"error: {result['unreadable']} image(s) could not be read and are not counted "
              f"(first: {result['unreadable_files'][0]})", file=sys.stderr)
        return 1
    return 0


def score(args: argparse.Namespace, degrade: tuple[str, float] | None, classifier, baseline,
          data: FerData | None) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """One evaluation: the faces of --data (degraded by `degrade`) or --folder, scored by the model and the
    baseline -> (the result dict, the model's predictions, its probabilities, the truth)."""
    faces, truth, info = dataset_faces(args, data, degrade) if data is not None else folder_faces(args)
    pred, probs = predict_with_gaps(classifier.predict, list(faces))
    base_pred, base_probs = predict_with_gaps(baseline.predict, list(faces)) if baseline else (None, None)
    result = {"model": classifier.name, "accuracy": round(float((pred == truth).mean()), 4), "n": int(len(truth)),
              "per_class": per_class(pred, truth),
              "baseline_accuracy": round(float((base_pred == truth).mean()), 4) if base_pred is not None else None,
              "baseline": baseline.name if baseline else None,
              "baseline_per_class": per_class(base_pred, truth) if base_pred is not None else None, **info,
              "mean_recall": round(mean_recall(pred, truth), 4),
              "ece": round(expected_calibration_error(probs, truth), 4),
              "baseline_mean_recall": round(mean_recall(base_pred, truth), 4) if base_pred is not None else None,
              "baseline_ece": round(expected_calibration_error(base_probs, truth), 4) if base_probs is not None else None}
    return result, pred, probs, truth


def degrade_table(args: argparse.Namespace, results: list[dict]) -> int:
    """`--degrade all`: the clean score, then every degradation at its middle level (same model, data, split,
    labels, baseline); one table and one JSON line."""
    rows = [{"degradation": result.get("degrade", "clean"), "accuracy": result["accuracy"],
             "mean_recall": result["mean_recall"], "ece": result["ece"],
             "baseline_accuracy": result["baseline_accuracy"], "baseline_mean_recall": result["baseline_mean_recall"]}
            for result in results]
    clean = rows[0]
    print(f"{'degradation':<16} {'accuracy':>9} {'change':>7} {'mean recall':>12} {'ECE':>7} {'baseline acc':>13} {'baseline mean recall':>21}")
    for row in rows:
        row["accuracy_change"] = round(row["accuracy"] - clean["accuracy"], 4)
        pct = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        print(f"{row['degradation']:<16} {pct(row['accuracy']):>9} {100 * row['accuracy_change']:>+6.1f} "
              f"{pct(row['mean_recall']):>12} {row['ece']:>7.3f} {pct(row['baseline_accuracy']):>13} "
              f"{pct(row['baseline_mean_recall']):>21}")
    if args.json:
        print(json.dumps({"model": args.model, "split": args.split, "labels": args.labels, "detect": bool(args.detect),
                          "degradations": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
