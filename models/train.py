"""Train the expression CNN on FER2013 (its own labels) or on the FER+ annotator votes (soft labels).

    python -m models.train --labels ferplus --data ../shared/datasets/fer2013 --out runs/ferplus --export ferplus

Keras 3 model (models.net), trained under the tensorflow backend with XLA by default (`--backend torch`
and `--precision bf16` exist; on this 2-core CPU they measured no faster for this net), then
`models.export` converts the best weights to an int8 TFLite file under the tensorflow backend. Selection uses PublicTest
only (a seeded tenth of Training where the data has no PublicTest); PrivateTest is never looked at here.
Checkpoints (last.keras every epoch, best.weights.h5 on PublicTest accuracy) and metrics.csv live in
--out; `--resume` continues from last.keras. `--teacher RUN ... --swa --init-weights ...` fine-tunes a trained
run by distilling several runs into it and averaging its weights (how the shipped `fer2013` was made).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from core.errors import describe

PROJECT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(PROJECT.parent / "shared" / "datasets" / "fer2013"),
                   help="fer2013.csv(.gz), a folder holding it (+ fer2013new.csv for FER+), an image-folder tree or archive.zip")
    p.add_argument("--labels", choices=("ferplus", "fer2013"), default="ferplus")
    p.add_argument("--width", choices=("tiny", "small", "base"), default="small")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.02, help="peak SGD learning rate (cosine decay after warm-up)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--dropout", type=float, default=0.4, help="dropout of the dense head")
    p.add_argument("--spatial-dropout", type=float, default=0.1, help="channel dropout after stage k is this x (k-1)")
    p.add_argument("--aug", choices=("strong", "light"), default="strong",
                   help="strong: +-15 deg, +-10 %% shift, erasing half the time; light: +-10 deg, +-6 %% shift, erasing 1 in 5")
    p.add_argument("--class-weight", choices=("none", "sqrt", "balanced"), default="sqrt",
                   help="re-weight rare classes (disgust is 1.5%% of FER2013): inverse frequency, or its square root")
    p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                   help="logit-adjusted loss (Menon et al., 2021): train on log p + TAU x log(class prior), so the "
                        "plain output is balanced across classes (1 = fully balanced, 0 = plain cross-entropy)")
    p.add_argument("--camera-aug", type=float, default=0.0, metavar="P",
                   help="share of training faces also degraded as a webcam does (blur, low light, noise, "
                        "down-scaling, JPEG, a hand over part of the lower face; one kind each, random strength)")
    p.add_argument("--select", choices=("accuracy", "balanced"), default="accuracy",
                   help="the epoch kept: best mirror-averaged selection accuracy, or best mean of accuracy and "
                        "mean per-class recall (for --logit-adjust runs, which trade one for the other)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep every batch norm in inference mode (needed for weights rebuilt by models.from_tflite, "
                        "whose batch norms are folded away)")
    p.add_argument("--backend", choices=("tensorflow", "torch"), default="tensorflow")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16 = Keras mixed_bfloat16 (AMX); measured no faster than fp32+XLA for the small net here")
    p.add_argument("--no-jit", dest="jit", action="store_false", help="disable XLA / torch.compile")
    p.add_argument("--out", default=None, help="run folder (default runs/<labels>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.keras")
    p.add_argument("--init-weights", default=None,
                   help="start from these weights (e.g. runs/ferplus/best.weights.h5): a warm restart with a new LR cycle")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training rows (smoke tests)")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap steps per epoch (smoke tests)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="CPU threads for training (0 = all)")
    p.add_argument("--teacher", action="append", default=[], metavar="RUN",
                   help="distil from these trained runs (run folders or .weights.h5, repeatable): their "
                        "mirror-averaged mean prediction on each training face is blended into its target")
    p.add_argument("--distill", type=float, default=0.5,
                   help="share of the target that comes from the teachers (with --teacher)")
    p.add_argument("--swa", action="store_true",
                   help="fine-tuning: the LR runs one cosine cycle per epoch and the weights at the end of each "
                        "cycle are averaged (stochastic weight averaging, BN statistics recomputed); the average "
                        "is a selection candidate beside each epoch's weights (--resume starts a new average)")
    p.add_argument("--export", metavar="NAME", default=None,
                   help="after training, export best weights to models/weights/NAME.tflite (or a path ending .tflite)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.out = Path(args.out or PROJECT / "runs" / args.labels)
    return args


# Augmentation ranges (degrees, pixels of 48, scale, contrast, brightness, share of faces erased), shared
# with the GPU trainer (models.train_torch.GpuAugmenter).
AUG_RANGES = {
    "strong": {"angle": 15.0, "shift": 4.8, "scale": (0.85, 1.15), "contrast": 0.3, "brightness": 0.12, "erase": 0.5},
    "light": {"angle": 10.0, "shift": 3.0, "scale": (0.9, 1.1), "contrast": 0.2, "brightness": 0.08, "erase": 0.2},
}


CAMERA_KINDS = ("blur", "dark", "noise", "downscale", "jpeg", "hand")


def camera_degrade(face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One webcam-like degradation of a uint8 48x48 face, at a random strength: what the live path adds to a
    face (models.degrade has the same kinds at fixed levels for evaluation; these ranges are drawn, and the
    hand is any size on either side or the chin, not evaluate's fixed patch)."""
    import cv2
    kind = CAMERA_KINDS[rng.integers(len(CAMERA_KINDS))]
    if kind == "blur":
        return cv2.GaussianBlur(face, (0, 0), rng.uniform(0.3, 1.0))
    if kind == "dark":
        gamma = rng.uniform(1.2, 2.5) if rng.random() < 0.8 else rng.uniform(0.5, 0.8)
        return (255.0 * (face / 255.0) ** gamma).round().astype(np.uint8)
    if kind == "noise":
        return np.clip(face + rng.normal(0, rng.uniform(2, 6), face.shape), 0, 255).astype(np.uint8)
    if kind == "downscale":
        side = int(rng.integers(20, 36))
        return cv2.resize(cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA), (48, 48),
                          interpolation=cv2.INTER_LINEAR)
    if kind == "jpeg":
        _, data = cv2.imencode(".jpg", face, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 71))])
        return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    out = face.copy()   # a hand: a smooth patch of skin-like brightness over part of the lower face
    h, w = int(rng.integers(8, 22)), int(rng.integers(12, 30))
    y0 = int(rng.integers(48 - h - 6, 48 - h + 1))
    x0 = 0 if rng.random() < 0.4 else (48 - w if rng.random() < 0.67 else int(rng.integers(0, 48 - w + 1)))
    shade = np.median(face) + rng.normal(0, 12) + np.linspace(-8, 8, w)[None, :] * rng.choice((-1, 1))
    out[y0:y0 + h, x0:x0 + w] = np.clip(shade + rng.normal(0, 3, (h, w)), 0, 255).astype(np.uint8)
    return out


class Augmenter:
    """Random affine (rotation, scale, shift, mirror), brightness/contrast and erasing on uint8 48x48, and
    with `camera` > 0 that share of faces also degraded as a webcam does (camera_degrade)."""

    def __init__(self, rng: np.random.Generator, strength: str = "strong", camera: float = 0.0) -> None:
        self.rng = rng
        self.camera = camera
        self.__dict__.update(AUG_RANGES[strength])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import cv2
        rng, out = self.rng, np.empty(images.shape, np.float32)
        for i, img in enumerate(images):
            angle = rng.uniform(-self.angle, self.angle)
            scale = rng.uniform(*self.scale)
            m = cv2.getRotationMatrix2D((23.5, 23.5), angle, scale)
            m[:, 2] += rng.uniform(-self.shift, self.shift, size=2)
            warped = cv2.warpAffine(img, m, (48, 48), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
            if rng.random() < 0.5:
                warped = warped[:, ::-1]
            if self.camera and rng.random() < self.camera:
                warped = camera_degrade(np.ascontiguousarray(warped), rng)
            x = warped.astype(np.float32) / 255.0
            x = (x - x.mean()) * rng.uniform(1 - self.contrast, 1 + self.contrast) + x.mean() \
                + rng.uniform(-self.brightness, self.brightness)
            if rng.random() < self.erase:  # random erasing: robustness to hands, glasses, occluders
                h, w = rng.integers(8, 24, size=2)
                y0, x0 = rng.integers(0, 48 - h), rng.integers(0, 48 - w)
                x[y0:y0 + h, x0:x0 + w] = rng.random()
            out[i] = np.clip(x, 0.0, 1.0)
        return out[..., None]


def class_counts(hard: np.ndarray | None, soft: np.ndarray | None) -> np.ndarray:
    """How much of each class the training targets hold: the soft votes where there are any, else hard labels."""
    if soft is None and hard is None:
        raise ValueError("class counts need hard or soft targets")
    return soft.sum(0) if soft is not None else np.bincount(np.asarray(hard), minlength=7)


def class_weights(hard: np.ndarray, soft: np.ndarray, mode: str) -> np.ndarray:
    counts = class_counts(hard, soft)
    freq = counts / counts.sum()
    if mode == "none":
        return np.ones(7, np.float32)
    weight = (1.0 / np.maximum(freq, 1e-3)) ** (0.5 if mode == "sqrt" else 1.0)
    return (weight / (weight * freq).sum()).astype(np.float32)


def class_prior(hard: np.ndarray | None, soft: np.ndarray | None) -> np.ndarray:
    """Share of each class in the training targets, never 0 (its log is taken)."""
    counts = np.maximum(class_counts(hard, soft), 1e-6)
    return (counts / counts.sum()).astype(np.float32)


def logit_adjusted_loss(prior: np.ndarray, tau: float, label_smoothing: float = 0.0):
    """Cross-entropy on the softmax output shifted by tau x log prior (Menon et al., 2021, "Long-tail learning
    via logit adjustment"): the network learns to leave the prior out of its own output, so at inference its
    plain probabilities favour no class for being common. The model outputs probabilities, whose log is the
    logits up to a constant per face, which softmax ignores."""
    import keras
    shift = keras.ops.convert_to_tensor((tau * np.log(prior)).astype(np.float32))

    def loss(y_true, y_pred):
        logits = keras.ops.log(keras.ops.clip(keras.ops.cast(y_pred, "float32"), 1e-7, 1.0)) + shift
        return keras.losses.categorical_crossentropy(y_true, logits, from_logits=True, label_smoothing=label_smoothing)
    return loss


def mirror_averaged(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Predictions averaged with the mirrored faces: how models.runtime.classifier runs the shipped models."""
    return (model.predict(x, batch_size=batch, verbose=0) + model.predict(x[:, :, ::-1], batch_size=batch, verbose=0)) / 2


def teacher_weights(teacher: str) -> Path:
    """--teacher names a run folder (its best.weights.h5) or a weights file."""
    return Path(teacher) / "best.weights.h5" if Path(teacher).is_dir() else Path(teacher)


def teacher_targets(teachers: list[str], x: np.ndarray, default_width: str, cache: Path) -> np.ndarray:
    """Mean mirror-averaged prediction of the teacher runs on faces x (uint8 (N, 48, 48)); cached in the run
    folder because six passes over 28k faces take minutes on a CPU."""
    from models.net import build_model
    files = [teacher_weights(t) for t in teachers]
    digest = hashlib.sha256(x.tobytes())
    for f in files:
        st = f.stat()
        digest.update(f"|{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    if cache.exists():
        z = np.load(cache)
        if str(z["stamp"]) == digest.hexdigest():
            return z["targets"]
    faces = (x.astype(np.float32) / 255.0)[..., None]
    total = np.zeros((len(x), 7), np.float32)
    for f in files:
        state = f.parent / "state.json"
        width = json.loads(state.read_text()).get("args", {}).get("width", default_width) if state.is_file() else default_width
        teacher = build_model(width)
        teacher.load_weights(f)
        total += mirror_averaged(teacher, faces)
        print(f"teacher {f}: done", flush=True)
    targets = total / len(files)
    np.savez(cache, targets=targets, stamp=np.array(digest.hexdigest()))
    return targets


def recompute_batch_norm(model, x: np.ndarray, batch: int = 256, batches: int = 16) -> None:
    """Set every BN layer's moving statistics to the cumulative average over `batches` training batches,
    as averaged weights need their own statistics (Izmailov et al., 2018)."""
    import keras
    bn = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    saved = [layer.momentum for layer in bn]
    rng = np.random.default_rng(0)
    for k in range(1, batches + 1):
        idx = rng.choice(len(x), size=min(batch, len(x)), replace=False)
        for layer in bn:
            layer.momentum = (k - 1) / k   # k-th batch gets weight 1/k: a plain running mean
        model(x[idx], training=True)
    for layer, momentum in zip(bn, saved):
        layer.momentum = momentum


def dataset_fingerprint(source: Path) -> str:
    """Changes whenever any file the dataset is read from changes: for a folder every file under it (an
    image tree gains or loses images), for a CSV the file and the FER+ votes beside it."""
    if source.is_dir():
        files = sorted(Path(d) / f for d, _, names in os.walk(source) for f in names)
    else:
        files = [source, source.with_name("fer2013new.csv")]
    digest = hashlib.sha256(str(source).encode())
    for file in files:
        try:
            st = file.stat()
        except OSError:
            continue
        digest.update(f"|{file}|{st.st_size}|{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def load_cached(data_path: str, cache_dir: Path):
    """Parsing 36k CSV rows takes ~15 s: keep an npz cache in the run folder's parent."""
    from models.data import FerData, load_dataset
    source = Path(data_path).resolve()
    stamp = dataset_fingerprint(source) if source.exists() else "missing"
    cache = cache_dir / "dataset-cache.npz"
    if cache.exists():
        z = np.load(cache, allow_pickle=False)
        if str(z["stamp"]) == stamp:
            votes = z["votes"] if z["votes"].size else None
            return FerData(z["images"], z["labels"], z["splits"], votes)
    data = load_dataset(source)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"dataset-cache.{os.getpid()}.tmp.npz")
    np.savez(tmp, images=data.images, labels=data.labels, splits=data.splits.astype(str),
             votes=data.votes if data.votes is not None else np.zeros(0), stamp=np.array(stamp))
    tmp.replace(cache)
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    sys.path.insert(0, str(PROJECT))
    from models.data import DatasetError

    if args.out.exists() and not args.out.is_dir():
        print(f"error: --out {args.out} is a file, not a run folder", file=sys.stderr)
        return 2
    if args.init_weights and not Path(args.init_weights).is_file():
        print(f"error: --init-weights {args.init_weights}: no such weights file", file=sys.stderr)
        return 2
    for teacher in args.teacher:
        if not teacher_weights(teacher).is_file():
            print(f"error: --teacher {teacher}: no such run folder or weights file", file=sys.stderr)
            return 2
    if not 0.0 <= args.distill <= 1.0:
        print(f"error: --distill {args.distill}: must be between 0 and 1", file=sys.stderr)
        return 2
    if args.resume and (args.out / "last.keras").exists() and not (args.out / "state.json").is_file():
        print(f"error: --resume: {args.out / 'state.json'} is missing", file=sys.stderr)
        return 2
    try:
        data = load_cached(args.data, args.out.parent / "cache" if args.limit == 0 else args.out / "cache")
        train, val = data.split("Training"), data.subset(data.splits == "PublicTest")
        selection = "PublicTest"
        if len(val) == 0 and len(train) > 1:
            # The downloaded image-folder layout often has no PublicTest (test/ is PrivateTest, or unnamed):
            # select on a fixed, seeded tenth of Training instead; the test split is still never looked at.
            held = np.random.default_rng(args.seed).permutation(len(train))[:max(1, len(train) // 10)]
            mask = np.zeros(len(train), bool)
            mask[held] = True
            train, val = train.subset(~mask), train.subset(mask)
            selection = "held-out Training"
            print(f"no PublicTest rows: selecting on {len(val)} held-out Training faces (seed {args.seed})",
                  flush=True)
        train_hard, train_soft = train.targets(args.labels)
        val_hard, _ = val.targets(args.labels)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    keep = train_hard >= 0 if args.labels == "ferplus" else np.ones(len(train), bool)
    x_train, y_train, h_train = train.images[keep], train_soft[keep], train_hard[keep]
    if args.limit:
        x_train, y_train, h_train = x_train[:args.limit], y_train[:args.limit], h_train[:args.limit]
    vkeep = val_hard >= 0
    x_val = (val.images[vkeep].astype(np.float32) / 255.0)[..., None]
    y_val = np.eye(7, dtype=np.float32)[val_hard[vkeep]]
    if args.limit:
        x_val, y_val = x_val[:args.limit], y_val[:args.limit]
    if len(x_train) == 0 or len(x_val) == 0:
        print("error: no Training rows (or no usable selection rows) in the dataset", file=sys.stderr)
        return 2

    import keras
    if args.backend == "torch" and args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.backend == "tensorflow" and args.threads:
        import tensorflow as tf
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(args.seed)
    if args.precision == "bf16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    from models.net import build_model

    weights = class_weights(h_train, y_train, args.class_weight)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher:
        try:
            taught = teacher_targets(args.teacher, x_train, args.width, args.out / "teacher-targets.npz")
        except Exception as exc:   # h5py/keras raise many types for a wrong or damaged file
            print(f"error: --teacher: not weights of this network ({describe(exc)})", file=sys.stderr)
            return 2
        y_train = (1 - args.distill) * y_train + args.distill * taught
        print(f"distilling from {len(args.teacher)} teacher(s): they agree with the training labels on "
              f"{(taught.argmax(1) == h_train).mean():.1%} of faces; {args.distill:.0%} of each target is theirs",
              flush=True)
    rng = np.random.default_rng(args.seed)
    augment = Augmenter(rng, args.aug, camera=args.camera_aug)

    class Batches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.order = rng.permutation(len(x_train))

        def __len__(self) -> int:
            n = int(np.ceil(len(x_train) / args.batch))
            return min(n, args.steps_per_epoch) if args.steps_per_epoch else n

        def __getitem__(self, i: int):
            idx = self.order[i * args.batch:(i + 1) * args.batch]
            y = y_train[idx]
            # Class weights on soft targets: weight each row by its target's expected class weight.
            return augment(x_train[idx]), y, (y * weights).sum(1)

        def on_epoch_end(self) -> None:
            self.order = rng.permutation(len(x_train))

    batches = Batches()
    steps = len(batches) * args.epochs
    warmup = min(len(batches) * 2, steps // 5)
    if args.swa:   # one cycle per epoch, each ending near zero where its weights are averaged
        schedule = keras.optimizers.schedules.CosineDecayRestarts(
            initial_learning_rate=args.lr, first_decay_steps=len(batches), t_mul=1.0, m_mul=1.0, alpha=0.02)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=args.lr / 10, decay_steps=max(1, steps - warmup), alpha=0.0,
            warmup_target=args.lr, warmup_steps=warmup)
    last, best = args.out / "last.keras", args.out / "best.weights.h5"
    state_file = args.out / "state.json"
    initial_epoch = 0
    state = {"best_val_accuracy": 0.0, "best_epoch": None, "args": {k: str(v) for k, v in vars(args).items()}}
    prior = class_prior(h_train, y_train)
    loss = (logit_adjusted_loss(prior, args.logit_adjust, args.label_smoothing) if args.logit_adjust else
            keras.losses.CategoricalCrossentropy(label_smoothing=args.label_smoothing))
    if args.resume and last.exists():
        try:
            model = keras.saving.load_model(last, custom_objects={"loss": loss})
            state = json.loads(state_file.read_text())
        except Exception as exc:   # a checkpoint cut short by a full disk or a kill
            print(f"error: --resume: cannot load {last} ({type(exc).__name__}); start without --resume "
                  f"or from --init-weights {best}", file=sys.stderr)
            return 2
        initial_epoch = int(state["epoch"])
        print(f"resuming {last} at epoch {initial_epoch}", flush=True)
    else:
        model = build_model(args.width, dropout=args.dropout, spatial_dropout=args.spatial_dropout)
        if args.init_weights:
            try:
                model.load_weights(args.init_weights)
            except Exception as exc:   # h5py/keras raise many types for a wrong or damaged file
                print(f"error: --init-weights {args.init_weights}: not weights of this network "
                      f"({describe(exc)})", file=sys.stderr)
                return 2
            print(f"starting from {args.init_weights}", flush=True)
        if args.freeze_bn:
            for layer in model.layers:
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.trainable = False   # Keras 3 runs a frozen batch norm in inference mode
        model.compile(
            optimizer=keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=args.weight_decay),
            loss=loss,
            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")], jit_compile=args.jit)
    print(f"{model.name}: {model.count_params():,} parameters; {len(x_train)} training faces "
          f"({args.labels} labels), {len(x_val)} {selection} faces for selection; class weights "
          f"{np.round(weights, 2).tolist()}", flush=True)

    # Faces whose batch-norm statistics the weight average gets (only --swa needs them).
    x_bn = (x_train[:4096].astype(np.float32) / 255.0)[..., None] if args.swa else None
    swa_file = args.out / "swa.weights.h5"

    def mirror_accuracy(model, logs: dict, key: str) -> float:
        """The selection score: mirror-averaged accuracy, or with --select balanced its mean with the mean
        per-class recall; both go into metrics.csv (val_accuracy<key>, val_mean_recall<key>)."""
        from models.evaluate import mean_recall
        pred, truth = mirror_averaged(model, x_val).argmax(1), y_val.argmax(1)
        accuracy = logs[f"val_accuracy{key}"] = float((pred == truth).mean())
        recall = logs[f"val_mean_recall{key}"] = mean_recall(pred, truth)
        print(f"  selection faces: accuracy {accuracy:.4f}, mean per-class recall {recall:.4f}", flush=True)
        return (accuracy + recall) / 2 if args.select == "balanced" else accuracy

    class Checkpoint(keras.callbacks.Callback):
        swa_sum, swa_n = None, 0

        def on_epoch_end(self, epoch, logs=None):
            logs = logs if logs is not None else {}
            # Selection on mirror-averaged accuracy: that is how models.runtime.classifier runs the shipped file.
            val_acc = mirror_accuracy(self.model, logs, "_mirror")
            if val_acc > state["best_val_accuracy"]:
                state.update(best_val_accuracy=val_acc, best_epoch=epoch + 1)
                self.model.save_weights(best)
            if args.swa:
                self.average(epoch + 1, logs)
            self.model.save(last.with_suffix(".tmp.keras"))
            last.with_suffix(".tmp.keras").replace(last)  # atomic: a crash never leaves a torn checkpoint
            state.update(epoch=epoch + 1, elapsed_s=state.get("elapsed_s", 0.0) + time.time() - self.t0)
            state_file.write_text(json.dumps(state, indent=2))
            print(f"epoch {epoch + 1}: selection score ({args.select}) {val_acc:.4f} (best {state['best_val_accuracy']:.4f} "
                  f"at {state['best_epoch']})", flush=True)

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def average(self, epoch: int, logs: dict) -> None:
            current = self.model.get_weights()
            self.swa_sum = current if self.swa_sum is None else [a + b for a, b in zip(self.swa_sum, current)]
            self.swa_n += 1
            self.model.set_weights([w / self.swa_n for w in self.swa_sum])
            recompute_batch_norm(self.model, x_bn)
            swa_acc = mirror_accuracy(self.model, logs, "_swa")
            self.model.save_weights(swa_file)
            if swa_acc > state["best_val_accuracy"]:
                state.update(best_val_accuracy=swa_acc, best_epoch=f"swa of epochs {epoch - self.swa_n + 1}-{epoch}")
                self.model.save_weights(best)
            print(f"epoch {epoch}: average of {self.swa_n} epochs scores {swa_acc:.4f}", flush=True)
            self.model.set_weights(current)

    model.fit(batches, validation_data=(x_val, y_val), epochs=args.epochs, initial_epoch=initial_epoch,
              verbose=2 if args.quiet else 1,
              callbacks=[Checkpoint(), keras.callbacks.CSVLogger(str(args.out / "metrics.csv"), append=True)])
    print(f"done: best {selection} accuracy {state['best_val_accuracy']:.4f} at epoch {state['best_epoch']}; "
          f"{state.get('elapsed_s', 0) / 60:.1f} min of training", flush=True)
    if args.export:
        cmd = [sys.executable, "-m", "models.export", "--run", str(args.out), "--name", args.export,
               "--width", args.width, "--data", args.data, "--labels", args.labels]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        return subprocess.call(cmd, cwd=PROJECT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
