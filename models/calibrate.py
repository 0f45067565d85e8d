"""Fit the temperature that makes a model's probabilities mean what they say, on PublicTest, and ship it.

    python -m models.calibrate --model ferplus --data ../shared/datasets/fer2013 --labels ferplus [--write]
    python -m models.calibrate --model fer2013 --data ../shared/datasets/fer2013 --labels fer2013 [--write]

The classifier's probabilities (mirror averaged, as the bot and models.evaluate score them) are scaled as
softmax(log p / T); T is the one of 200 values between 0.2 and 5 (log-spaced) with the lowest negative
log-likelihood on PublicTest, the selection split. PrivateTest is never read here. --write stores T and the
before/after figures under "calibration" in the model's card file (models/weights/<name>.json), which the
runtime classifier reads. The last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from models.data import DatasetError, load_dataset
from models.evaluate import ECE_BINS, expected_calibration_error, mean_recall
from models.runtime.classifier import ExpressionClassifier, apply_temperature

TEMPERATURES = np.exp(np.linspace(np.log(0.2), np.log(5.0), 200))


def nll(probs: np.ndarray, truth: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(truth)), truth], 1e-12, 1.0)).mean())


def fit_temperature(probs: np.ndarray, truth: np.ndarray) -> float:
    """The temperature with the lowest NLL on these probabilities (grid search: the NLL is smooth in T)."""
    return float(min(TEMPERATURES, key=lambda t: nll(apply_temperature(probs, float(t)), truth)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ferplus", help="ferplus | fer2013 | path to a .tflite file")
    p.add_argument("--data", required=True, help="fer2013.csv(.gz) or its folder (with the FER+ labels beside it)")
    p.add_argument("--labels", default="ferplus", choices=("fer2013", "ferplus"))
    p.add_argument("--write", action="store_true", help="store the temperature in the model's .json card file")
    args = p.parse_args(argv)
    try:
        classifier = ExpressionClassifier(args.model, threads=2, calibrated=False)
        part = load_dataset(args.data).split("PublicTest")
        hard, _ = part.targets(args.labels)
    except (DatasetError, FileNotFoundError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keep = hard >= 0
    truth = hard[keep]
    if len(truth) == 0:
        print("error: no PublicTest faces with these labels", file=sys.stderr)
        return 2
    raw = classifier.predict((part.images[keep].astype(np.float32) / 255.0)[..., None])
    temperature = fit_temperature(raw, truth)
    calibrated = apply_temperature(raw, temperature)
    result = {
        "model": classifier.name, "temperature": round(temperature, 4), "fitted_on": f"PublicTest, {args.labels} labels, "
        f"mirror averaged, n {len(truth)}", "ece_bins": ECE_BINS,
        "publictest_ece_before": round(expected_calibration_error(raw, truth), 4),
        "publictest_ece_after": round(expected_calibration_error(calibrated, truth), 4),
        "publictest_nll_before": round(nll(raw, truth), 4), "publictest_nll_after": round(nll(calibrated, truth), 4),
        "publictest_accuracy": round(float((raw.argmax(1) == truth).mean()), 4),
        "publictest_mean_recall": round(mean_recall(raw.argmax(1), truth), 4),
        "command": f"python -m models.calibrate --model {args.model} --data DATA --labels {args.labels} --write",
    }
    print(f"temperature {temperature:.4f} (PublicTest, n {len(truth)}): ECE {result['publictest_ece_before']:.4f} -> "
          f"{result['publictest_ece_after']:.4f}, NLL {result['publictest_nll_before']:.4f} -> {result['publictest_nll_after']:.4f}"
          " (accuracy unchanged: scaling keeps the order of the classes)")
    if args.write:
        card = classifier.path.with_suffix(".json")
        try:
            content = json.loads(card.read_text()) if card.exists() else {}
            content["calibration"] = {k: v for k, v in result.items() if k != "model"}
            card.write_text(json.dumps(content, indent=2) + "\n")
        except (OSError, ValueError) as exc:
            print(f"error: cannot update {card}: {exc}", file=sys.stderr)
            return 2
        print(f"wrote the temperature to {card}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
