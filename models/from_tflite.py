"""Rebuild Keras weights from a shipped TFLite file, so a shipped model can be fine-tuned without its training run.

    python -m models.from_tflite --model ferplus --out runs/from-ferplus

The TFLite converter folded each batch norm into the convolution or dense layer before it (the kernel
absorbed the scale, the shift became a bias) and `models.export` stored the kernels as int8 with one scale
per output channel. This writes `<out>/best.weights.h5` for `models.net.build_model` with the dequantised
kernels and every batch norm set to the identity plus that bias, and `<out>/state.json`, so that
`models.train --init-weights <out>/best.weights.h5 --freeze-bn` continues from the shipped file. The batch
norms must stay frozen in such a fine-tune: their statistics are folded away, and a training-mode batch norm
would re-normalise every layer. The rebuilt model is checked against the TFLite file on probe faces.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent


def dequantised(interpreter, detail: dict) -> np.ndarray:
    """A constant tensor as float32; int8 weights use one scale per output channel (axis 0), zero point 0."""
    value = interpreter.get_tensor(detail["index"])
    q = detail["quantization_parameters"]
    if value.dtype == np.float32:
        return value
    scales = np.asarray(q["scales"], np.float32)
    zeros = np.asarray(q["zero_points"], np.float32)
    shape = (-1,) + (1,) * (value.ndim - 1) if scales.size > 1 else ()
    return ((value.astype(np.float32) - zeros.reshape(shape)) * scales.reshape(shape)).astype(np.float32)


def folded_tensors(path: str) -> dict[str, np.ndarray]:
    """name -> float array for every weight the network needs: '<layer>/kernel' and '<layer>/bias'.

    The converter names a fused tensor after all the ops it replaced (joined by ';'), so a conv's kernel
    carries '<layer>_conv_1/convolution' and its folded bias '<layer>_bn_1/batchnorm/add_1'."""
    import tensorflow as tf
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    found: dict[str, np.ndarray] = {}
    for detail in interpreter.get_tensor_details():
        name, shape = detail["name"], tuple(detail["shape"])
        parts = [part.split("/")[1] if "/" in part else part for part in name.split(";")]
        try:
            value = dequantised(interpreter, detail)
        except ValueError:   # activation tensors hold no data before a run
            continue
        for part, full in zip(parts, name.split(";")):
            layer = part.rsplit("_", 1)[0]    # 's2c1_conv_1' -> 's2c1_conv'
            if len(shape) == 4 and full.endswith("_conv_1/convolution"):
                found[layer.removesuffix("_conv") + "/kernel"] = value.transpose(1, 2, 3, 0)   # OHWI -> HWIO
            elif len(shape) == 1 and full.endswith("_bn_1/batchnorm/add_1") and len(parts) > 1:
                found[layer.removesuffix("_bn") + "/bias"] = value
            elif len(shape) == 2 and full.endswith("head_bn_1/batchnorm/mul_1"):
                found["head/kernel"] = value.T                                               # (out, in) -> (in, out)
            elif len(shape) == 2 and full.endswith("logits_1/MatMul"):
                found["logits/kernel"] = value.T
            elif len(shape) == 1 and full.endswith("logits_1/BiasAdd"):
                found["logits/bias"] = value
    return found


def rebuild(path: str, width: str = "small"):
    """The Keras network computing what the TFLite file computes (batch norms as identity + folded bias)."""
    from models.net import build_model
    from models.net_shape import BN_EPSILON
    tensors = folded_tensors(path)
    model = build_model(width)
    for layer in model.layers:
        name = layer.name
        if name.endswith("_conv"):
            layer.set_weights([tensors[name.removesuffix("_conv") + "/kernel"]])
        elif name.endswith("_bn"):
            base = name.removesuffix("_bn")
            bias = tensors[base + "/bias"]
            one = np.ones_like(bias)
            # gamma 1, beta bias, mean 0, variance 1 - eps: (x - 0) / sqrt(1 - eps + eps) * 1 + bias = x + bias
            layer.set_weights([one, bias, np.zeros_like(bias), one - BN_EPSILON])
        elif name == "head_dense":
            layer.set_weights([tensors["head/kernel"]])
        elif name == "logits":
            layer.set_weights([tensors["logits/kernel"], tensors["logits/bias"]])
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.from_tflite", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ferplus", help="ferplus | fer2013 | path to a .tflite file")
    p.add_argument("--out", required=True, help="run folder to write best.weights.h5 and state.json into")
    p.add_argument("--width", default=None, help="net width (default: the model's .json, else small)")
    args = p.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(PROJECT))
    path = Path(args.model if args.model.endswith(".tflite") else PROJECT / "models" / "weights" / f"{args.model}.tflite")
    if not path.is_file():
        print(f"error: {path}: no such model file", file=sys.stderr)
        return 2
    card = path.with_suffix(".json")
    meta = json.loads(card.read_text()) if card.is_file() else {}
    width = args.width or meta.get("width", "small")
    try:
        model = rebuild(str(path), width)
    except (KeyError, ValueError) as exc:
        print(f"error: {path} is not a TFLite file of models.net ({exc})", file=sys.stderr)
        return 2

    from models.runtime.classifier import ExpressionClassifier
    probe = np.random.default_rng(0).integers(0, 256, size=(64, 48, 48), dtype=np.uint8)
    faces = (probe.astype(np.float32) / 255.0)[..., None]
    shipped = ExpressionClassifier(str(path), threads=2, flip_average=False, calibrated=False).predict(faces)
    rebuilt = model.predict(faces, verbose=0)
    gap = float(np.abs(shipped - rebuilt).max())
    # The shipped file quantises activations per face at run time (dynamic range); the rebuilt net computes
    # in float32 with the same weights, so outputs differ by that rounding, not by a wrong layer.
    agree = float((shipped.argmax(1) == rebuilt.argmax(1)).mean())
    print(f"rebuilt {path.name}: largest probability gap {gap:.4f} on 64 probe images, same top class on {agree:.0%}")
    if gap > 0.1:
        print("error: the rebuilt network does not reproduce the file", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_weights(out / "best.weights.h5")
    labels = meta.get("labels", "ferplus")
    (out / "state.json").write_text(json.dumps({"args": {"width": width, "labels": labels},
                                                "from_tflite": str(path), "probe_gap": gap}, indent=2))
    print(f"wrote {out / 'best.weights.h5'}: fine-tune with models.train --init-weights it --freeze-bn")
    return 0


if __name__ == "__main__":
    sys.exit(main())
