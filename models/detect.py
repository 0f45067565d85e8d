"""Detect faces in an image and classify their expressions.

    python -m models.detect photo.jpg [--json] [--annotate out.png] [--detector auto|short|full] [--tiles auto|off|N]
                                      [--model ferplus|fer2013|PATH]

With --json the last stdout line is {"image", "faces": [{"box", "score", "keypoints", "probs", "label"}]}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np

from core.emotions import EMOTIONS
from core.faces import KEYPOINT_NAMES
from models.data import DatasetError, read_image
from models.cli_args import unit_interval


def annotate(image: np.ndarray, faces, path: str) -> None:
    out = image.copy()
    for i in range(len(faces)):
        x1, y1, x2, y2 = faces.boxes[i].astype(int)
        cv2.rectangle(out, (x1, y1), (x2, y2), (40, 200, 40), 2)
        for x, y in faces.keypoints[i].astype(int):
            cv2.circle(out, (int(x), int(y)), 2, (0, 140, 255), -1)
        label = f"{faces.labels[i]} {faces.probs[i].max():.2f}"
        cv2.putText(out, label, (x1, max(12, y1 - 6)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (40, 200, 40), 1, cv2.LINE_AA)
    try:
        written = cv2.imwrite(path, out)
    except cv2.error:
        written = False
    if not written:
        raise ValueError(f"cannot write {path} (use a .png or .jpg path in an existing folder)")


def tiles_arg(value: str) -> str | int | None:
    if value in ("auto", "off"):
        return None if value == "off" else value
    if value.isdigit() and int(value) >= 32:
        return int(value)
    raise argparse.ArgumentTypeError("use auto, off or a window side of at least 32 px")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.detect", description=__doc__.split("\n\n")[0])
    p.add_argument("image")
    p.add_argument("--model", default="ferplus", help="ferplus | fer2013 | path to a .tflite file")
    p.add_argument("--detector", default="full", choices=("full", "short", "auto"),
                   help="full range, tiled (photos, groups; default) | short range (one near face, webcam) | "
                   "auto (short range, then full range where it found nobody, then a close-up pass: the bot's detector; the bot does not tile, so add --tiles off to see exactly what it sees)")
    p.add_argument("--tiles", default="auto", type=tiles_arg, help="auto | off | window side in px: tile big photos for the "
                   "full-range passes so that small faces (crowds, galleries) are found (default auto)")
    p.add_argument("--min-score", type=unit_interval, default=0.5, help="lowest face score kept, 0..1 (default 0.5)")
    p.add_argument("--annotate", metavar="OUT.png")
    p.add_argument("--no-flip", action="store_true", help="classify each face once, without averaging with its mirror image")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    try:
        image = read_image(args.image)
        from models.runtime.classifier import ExpressionClassifier
        from models.runtime.detector import make_detector
        classifier = ExpressionClassifier(args.model, threads=2, flip_average=not args.no_flip)
        detector = make_detector(args.detector, 2, args.min_score, tiles=args.tiles)
        faces = classifier.classify([image], detector.detect([image]))
        if args.annotate:
            annotate(image, faces, args.annotate)
    except (DatasetError, OSError, ValueError, cv2.error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = {"image": args.image, "width": int(image.shape[1]), "height": int(image.shape[0]), "faces": [
        {"box": [round(float(v), 1) for v in faces.boxes[i]], "score": round(float(faces.scores[i]), 4),
         "keypoints": {name: [round(float(v), 1) for v in faces.keypoints[i, k]] for k, name in enumerate(KEYPOINT_NAMES)},
         "probs": {label: round(float(faces.probs[i, j]), 4) for j, label in enumerate(EMOTIONS)},
         "label": faces.labels[i]} for i in range(len(faces))]}
    print(f"{len(faces)} face(s) in {args.image} ({image.shape[1]}x{image.shape[0]})")
    for i, face in enumerate(result["faces"]):
        print(f"  #{i + 1} box {face['box']} score {face['score']:.2f} -> {face['label']} "
              f"({face['probs'][face['label']]:.2f})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
