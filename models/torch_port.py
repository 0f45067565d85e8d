"""Move models.net weights between Keras and the PyTorch copy in models.train_torch, and the data with them.

    python -m models.torch_port pack --data ../shared/datasets/fer2013 --out .gpu/fer-pack.xz [--init ferplus=runs/ferplus]
    python -m models.torch_port import --weights ferplus-small.npz --out runs/gpu-ferplus
    python -m models.torch_port teacher --weights ferplus-small.npz --out .gpu/teacher-ferplus.npz

The lent GPU machines have PyTorch but no TensorFlow, so GPU training (models.train_torch) runs on a
PyTorch copy of the network. `pack` writes what it needs into one file that can travel (Training and
PublicTest faces, both label sets; never PrivateTest), optionally with a Keras run's weights to start
from; `import` turns the trained arrays back into a Keras run folder (best.weights.h5 + state.json) that
models.export converts to TFLite as usual, after checking that Keras reproduces the PyTorch outputs.
`teacher` shrinks a trained run to int8 weights (one scale per output channel) so that several fit
beside the pack in what may travel, for models.train_torch --teacher to distil from.
Arrays travel in PyTorch's layout, keyed by the Keras layer names; this module needs numpy only.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent

# Keras layer kinds in models.net, by name pattern; every other layer has no weights.
BN_KEYS = ("weight", "bias", "running_mean", "running_var")   # Keras: gamma, beta, moving mean, variance


def weighted_layers(width: str) -> list[tuple[str, str]]:
    """(Keras layer name, kind) of every layer with weights in models.net.build_model(width), in order."""
    from models.net_shape import CONVS_PER_STAGE
    names: list[tuple[str, str]] = []
    for stage, convs in enumerate(CONVS_PER_STAGE, start=1):
        for i in range(convs):
            names += [(f"s{stage}c{i + 1}_conv", "conv"), (f"s{stage}c{i + 1}_bn", "bn")]
    return names + [("head_dense", "dense_nobias"), ("head_bn", "bn"), ("logits", "dense")]


def keras_to_torch(model, width: str) -> dict[str, np.ndarray]:
    """Keras model weights -> {'<layer>.<param>': array in PyTorch layout}."""
    arrays: dict[str, np.ndarray] = {}
    for name, kind in weighted_layers(width):
        w = model.get_layer(name).get_weights()
        if kind == "conv":      # Keras (kh, kw, in, out) -> PyTorch (out, in, kh, kw)
            arrays[f"{name}.weight"] = np.ascontiguousarray(w[0].transpose(3, 2, 0, 1))
        elif kind == "bn":
            arrays.update({f"{name}.{key}": value for key, value in zip(BN_KEYS, w)})
        else:                   # Dense (in, out) -> Linear (out, in); the flatten is NHWC on both sides
            arrays[f"{name}.weight"] = np.ascontiguousarray(w[0].T)
            if kind == "dense":
                arrays[f"{name}.bias"] = w[1]
    return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def torch_to_keras(arrays: dict[str, np.ndarray], model, width: str) -> None:
    """Set a Keras models.net model's weights from PyTorch-layout arrays (KeyError/ValueError if they do not fit)."""
    for name, kind in weighted_layers(width):
        layer = model.get_layer(name)
        if kind == "conv":
            weights = [arrays[f"{name}.weight"].transpose(2, 3, 1, 0)]
        elif kind == "bn":
            weights = [arrays[f"{name}.{key}"] for key in BN_KEYS]
        else:
            weights = [arrays[f"{name}.weight"].T] + ([arrays[f"{name}.bias"]] if kind == "dense" else [])
        layer.set_weights([np.asarray(w, np.float32) for w in weights])


LABEL_SETS = ("ferplus", "fer2013")
PACK_KEYS = ("train_images", "val_images", "meta", "probe_images",
             *(f"{kind}_{labels}" for labels in LABEL_SETS for kind in ("train_hard", "train_soft", "val")))


def probe_faces(val_images: np.ndarray) -> np.ndarray:
    """The first PublicTest faces, as models take them: the PyTorch side checks it reproduces Keras' outputs on them."""
    return (val_images[:64].astype(np.float32) / 255.0)[..., None]


def write_pack(out: Path, data, init: dict[str, np.ndarray] | None = None, meta: dict | None = None) -> None:
    """One file with Training and PublicTest faces and both label sets (FerData.targets: hard labels, -1 =
    excluded, and soft targets); LZMA, so the faces compress to ~57 MB, small enough to travel to a lent machine."""
    train, val = data.split("Training"), data.split("PublicTest")
    arrays = {"train_images": train.images, "val_images": val.images, "probe_images": probe_faces(val.images),
              "meta": np.array(json.dumps(meta or {}))}
    for labels in LABEL_SETS:
        arrays[f"train_hard_{labels}"], arrays[f"train_soft_{labels}"] = train.targets(labels)
        arrays[f"val_{labels}"] = val.targets(labels)[0]
    arrays.update(init or {})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with lzma.open(tmp, "wb", preset=6) as handle:
        np.savez(handle, **arrays)
    tmp.replace(out)


def read_pack(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a pack; ValueError if the file is not one (or is cut short), OSError if unreadable."""
    try:
        with lzma.open(path, "rb") as handle:
            z = np.load(handle, allow_pickle=False)
            arrays = {key: z[key] for key in z.files}
    except (lzma.LZMAError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a data pack written by `models.torch_port pack` ({exc})") from None
    missing = [key for key in PACK_KEYS if key not in arrays]
    if missing:
        raise ValueError(f"not a data pack written by `models.torch_port pack` (missing {', '.join(missing)})")
    return arrays


def quantize_teacher(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weight matrices and kernels -> int8 with one float scale per output channel ('<key>.scale'); the
    rest (biases, batch-norm) stays float32. A quarter of the size, and the outputs barely move."""
    out: dict[str, np.ndarray] = {}
    for key, value in arrays.items():
        value = np.asarray(value, np.float32)
        if key.endswith(".weight") and value.ndim >= 2:
            scale = np.abs(value.reshape(len(value), -1)).max(1) / 127
            scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
            out[key] = np.round(value / scale.reshape(-1, *[1] * (value.ndim - 1))).astype(np.int8)
            out[key + ".scale"] = scale
        else:
            out[key] = value
    return out


def read_teacher(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(float32 weights in PyTorch layout, meta with at least args.width) of a models.train_torch output or a
    `teacher` file; ValueError if the file is neither."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays.pop("meta")))
        if "width" not in meta["args"]:
            raise KeyError("args.width")
        weights: dict[str, np.ndarray] = {}
        for key, value in arrays.items():
            if key.startswith("probe_") or key.endswith(".scale"):
                continue
            if value.dtype == np.int8:
                scale = arrays[key + ".scale"]
                value = value.astype(np.float32) * scale.reshape(-1, *[1] * (value.ndim - 1))
            weights[key] = value.astype(np.float32)
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a models.train_torch output or teacher file ({type(exc).__name__}: {exc})") from None
    return weights, meta


def _teacher(args: argparse.Namespace) -> int:
    try:
        weights, meta = read_teacher(Path(args.weights))
    except ValueError as exc:
        print(f"error: --weights {exc}", file=sys.stderr)
        return 2
    width = meta["args"]["width"]
    keep = {"args": {"width": width, "labels": meta["args"].get("labels")}, "source": str(args.weights),
            "best_val_accuracy": meta.get("best_val_accuracy")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **quantize_teacher(weights), meta=np.array(json.dumps(keep)))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, int8 weights, {width})")
    return 0


def _pack(args: argparse.Namespace) -> int:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.data import DatasetError, load_dataset
    try:
        data = load_dataset(Path(args.data))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    init: dict[str, np.ndarray] = {}
    meta: dict = {"init": {}}
    probe = probe_faces(data.split("PublicTest").images)
    for spec in args.init or []:
        labels, _, run_dir = spec.partition("=")
        if labels not in LABEL_SETS or not run_dir:
            print(f"error: --init {spec!r}: expected ferplus=RUN or fer2013=RUN", file=sys.stderr)
            return 2
        from models.net import build_model
        run = Path(run_dir)
        state = json.loads((run / "state.json").read_text()) if (run / "state.json").exists() else {"args": {}}
        width = state["args"].get("width", "small")
        model = build_model(width)
        model.load_weights(run / "best.weights.h5")
        init.update({f"init/{labels}/{k}": v for k, v in keras_to_torch(model, width).items()})
        init[f"init/{labels}/probe_probs"] = model.predict(probe, verbose=0).astype(np.float32)
        meta["init"][labels] = {"run": str(run), "width": width,
                                "publictest_accuracy": state.get("best_val_accuracy")}
    write_pack(Path(args.out), data, init, meta)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")
    return 0


def _import(args: argparse.Namespace) -> int:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from models.net import build_model
    try:
        z = np.load(args.weights, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
        width = meta["args"]["width"]
        model = build_model(width)
        torch_to_keras(arrays, model, width)
        gap = float(np.abs(model.predict(arrays["probe_images"], verbose=0) - arrays["probe_probs"]).max())
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        print(f"error: --weights {args.weights}: not the output of models.train_torch ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if gap > 1e-3:
        print(f"error: Keras does not reproduce the PyTorch outputs (largest difference {gap:.2g})", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_weights(out / "best.weights.h5")
    state = {"best_val_accuracy": meta["best_val_accuracy"], "best_epoch": meta["best_epoch"],
             "epoch": meta["epochs"], "elapsed_s": meta["elapsed_s"], "args": meta["args"],
             "trained_with": meta.get("trained_with", "models.train_torch")}
    (out / "state.json").write_text(json.dumps(state, indent=2))
    if "log" in meta:
        (out / "metrics.csv").write_text(meta["log"])
    print(f"wrote {out}/best.weights.h5 (PublicTest {meta['best_val_accuracy']:.4f} at epoch {meta['best_epoch']} "
          f"of {meta['epochs']}; Keras matches PyTorch within {gap:.1g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(PROJECT))
    p = argparse.ArgumentParser(prog="python -m models.torch_port", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pack = sub.add_parser("pack", help="Training+PublicTest faces and labels (and optional start weights) in one file")
    pack.add_argument("--data", default=str(PROJECT.parent / "shared" / "datasets" / "fer2013"))
    pack.add_argument("--out", required=True)
    pack.add_argument("--init", action="append", metavar="LABELS=RUN",
                      help="Keras run folder whose best.weights.h5 training on LABELS may start from (repeatable)")
    imp = sub.add_parser("import", help="trained PyTorch arrays (.npz) -> Keras run folder for models.export")
    imp.add_argument("--weights", required=True)
    imp.add_argument("--out", required=True)
    teach = sub.add_parser("teacher", help="trained PyTorch arrays (.npz) -> int8 teacher file for train_torch --teacher")
    teach.add_argument("--weights", required=True)
    teach.add_argument("--out", required=True)
    args = p.parse_args(argv)
    return {"pack": _pack, "import": _import, "teacher": _teacher}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
