"""Export a training run's best weights to the TFLite file the bot loads (quantised when it keeps accuracy).

    python -m models.export --run runs/ferplus --name ferplus --labels ferplus

Writes models/weights/<name>.tflite and <name>.json (the numbers the model card quotes). Two post-training
quantisations are tried (float input/output both): dynamic range (int8 weights, activations quantised per
face at run time) and full int8 (calibrated on training faces); the more accurate one on PublicTest is
shipped if it is within --max-drop of the float model, otherwise the float32 file. PublicTest is scored with
mirror averaging, as models.runtime.classifier runs the shipped file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent
WEIGHTS_DIR = PROJECT / "models" / "weights"


def classifier_accuracy(content: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of a TFLite file run exactly as the bot runs it: through models.runtime.classifier (mirror averaging on)."""
    import tempfile
    from models.runtime.classifier import ExpressionClassifier
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "candidate.tflite"
        path.write_bytes(content)
        classifier = ExpressionClassifier(str(path), threads=2, max_batch=256)   # reads the file once, here
    return float((classifier.predict(x).argmax(1) == y).mean())


def scan_prior_shift(model, x: np.ndarray, y: np.ndarray, prior: np.ndarray) -> None:
    """Accuracy and mean per-class recall on the selection faces for each prior shift (mirror averaged)."""
    import keras
    def logits(faces: np.ndarray) -> np.ndarray:
        return np.log(np.clip(model.predict(faces, batch_size=256, verbose=0), 1e-7, 1.0))
    plain, mirrored = logits(x), logits(x[:, :, ::-1])
    print("tau   accuracy  mean recall  per-class recall (angry disgust fear happy sad surprise neutral)")
    for tau in np.round(np.arange(-0.5, 1.51, 0.1), 2):
        shift = tau * np.log(prior)
        probs = (keras.ops.softmax(plain + shift).numpy() + keras.ops.softmax(mirrored + shift).numpy()) / 2
        pred = probs.argmax(1)
        recall = [float((pred[y == c] == c).mean()) if (y == c).any() else float("nan") for c in range(7)]
        print(f"{tau:5.2f}  {float((pred == y).mean()):.4f}    {np.nanmean(recall):.4f}      "
              + " ".join(f"{r:.3f}" for r in recall), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="training run folder holding best.weights.h5")
    p.add_argument("--name", required=True, help="ferplus | fer2013 | a path ending in .tflite")
    p.add_argument("--width", default=None, help="net width (default: the run's state.json)")
    p.add_argument("--data", default=str(PROJECT.parent / "shared" / "datasets" / "fer2013"))
    p.add_argument("--labels", choices=("ferplus", "fer2013"), default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--prior-shift", type=float, default=0.0, metavar="TAU",
                   help="add TAU x log(training class prior) to the output logits before converting: the operating "
                        "point of a run trained with --logit-adjust (0 = its balanced output; its TAU = plain accuracy)")
    p.add_argument("--scan-prior-shift", action="store_true",
                   help="print PublicTest accuracy and mean per-class recall for a range of --prior-shift values, "
                        "then stop (nothing is written)")
    p.add_argument("--max-drop", type=float, default=0.005, help="largest PublicTest accuracy loss allowed for a quantised file")
    args = p.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(PROJECT))
    run = Path(args.run)
    state = json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {"args": {}}
    width = args.width or state["args"].get("width", "small")
    labels = args.labels or state["args"].get("labels", "ferplus")
    if not (run / "best.weights.h5").exists():
        print(f"error: {run / 'best.weights.h5'} not found (train first)", file=sys.stderr)
        return 2

    import tensorflow as tf
    from models.data import DatasetError
    from models.net import build_model
    from models.train import load_cached
    try:
        data = load_cached(args.data, run.parent / "cache" if not args.limit else run / "cache")
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = build_model(width)
    model.load_weights(run / "best.weights.h5")
    val = data.split("PublicTest")
    hard, _ = val.targets(labels)
    keep = hard >= 0
    x_val = (val.images[keep].astype(np.float32) / 255.0)[..., None]
    y_val = hard[keep]
    if args.limit:
        x_val, y_val = x_val[:args.limit], y_val[:args.limit]
    train_images = data.split("Training").images
    calib = (train_images[np.random.default_rng(0).permutation(len(train_images))[:400]].astype(np.float32) / 255.0)[..., None]

    from models.train import class_prior, mirror_averaged
    if args.scan_prior_shift or args.prior_shift:
        train_hard, train_soft = data.split("Training").targets(labels)
        prior = class_prior(train_hard[train_hard >= 0], train_soft[train_hard >= 0])
    if args.scan_prior_shift:
        scan_prior_shift(model, x_val, y_val, prior)
        return 0
    if args.prior_shift:
        logits = model.get_layer("logits")
        kernel, bias = logits.get_weights()
        logits.set_weights([kernel, bias + args.prior_shift * np.log(prior)])
        print(f"logits shifted by {args.prior_shift} x log prior {np.round(prior, 3).tolist()}", flush=True)
    keras_acc = float((mirror_averaged(model, x_val).argmax(1) == y_val).mean())
    variants = {"float32": tf.lite.TFLiteConverter.from_keras_model(model).convert()}
    # Dynamic range: int8 weights, activations quantised per face at run time (XNNPACK's qd8 kernels); on
    # this net as fast as full int8 or faster, and closer to float, since no fixed activation ranges are baked in.
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    variants["dynamic"] = converter.convert()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calib[i:i + 1]] for i in range(len(calib)))
    variants["int8"] = converter.convert()
    accuracy = {name: classifier_accuracy(content, x_val, y_val) for name, content in variants.items()}
    # The most accurate quantised file within --max-drop of float32 (quantised files are 2-5x faster); else float32.
    quantised = [name for name in ("dynamic", "int8") if accuracy["float32"] - accuracy[name] <= args.max_drop]
    chosen = max(quantised, key=lambda name: accuracy[name]) if quantised else "float32"
    content = variants[chosen]
    descriptions = {"float32": "float32", "int8": "int8 weights+activations, float32 input/output",
                    "dynamic": "int8 weights, activations quantised per face at run time (dynamic range), float32 input/output"}

    target = Path(args.name) if args.name.endswith(".tflite") else WEIGHTS_DIR / f"{args.name}.tflite"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content)
    card = {
        "name": target.stem, "labels": labels, "width": width, "parameters": int(model.count_params()),
        "quantisation": descriptions[chosen],
        "publictest_accuracy": {"keras": keras_acc, **{f"tflite_{name}": acc for name, acc in accuracy.items()}},
        "publictest_n": int(len(y_val)), "publictest_scored_with": "mirror averaging", "best_epoch": state.get("best_epoch"), "epochs": state.get("epoch"),
        "training_minutes": round(state.get("elapsed_s", 0.0) / 60, 1), "train_args": state.get("args"),
        "trained_with": state.get("trained_with", "models.train (TensorFlow, CPU)"),
        **({"prior_shift": {"tau": args.prior_shift, "prior": np.round(prior, 5).tolist()}} if args.prior_shift else {}),
        "file_bytes": len(content), "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    target.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {target} ({len(content) // 1024} KB, {card['quantisation']}); PublicTest accuracy (mirror averaged) "
          f"keras {keras_acc:.4f}, tflite " + ", ".join(f"{name} {acc:.4f}" for name, acc in accuracy.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
