"""Train the expression CNN with PyTorch on a GPU (the lent machines have no TensorFlow).

    python -m models.torch_port pack --data ../shared/datasets/fer2013 --out .gpu/fer-pack.xz
    python -m models.train_torch --pack .gpu/fer-pack.xz --labels ferplus --out OUT/ferplus-small.npz --minutes 7
    python -m models.torch_port import --weights OUT/ferplus-small.npz --out runs/gpu-ferplus
    python -m models.export --run runs/gpu-ferplus --name ferplus --labels ferplus
    # distillation: trained runs (shrunk by `torch_port teacher`) teach a new one on every augmented batch
    python -m models.train_torch --pack .gpu/fer-pack.xz --teacher .gpu/teacher-a.npz --teacher .gpu/teacher-b.npz \
        --distill 0.7 --out OUT/ferplus-kd.npz --minutes 7

Same network as models.net (an exact PyTorch copy, Keras layer names, NHWC flatten), same data and
targets as models.train; augmentation runs on the GPU, so one epoch takes about a second. The cosine
learning-rate schedule runs over --epochs or --minutes, whichever ends first (a lent machine is lent
for minutes, not epochs), so a run always ends with a fully decayed learning rate. Selection is on
PublicTest only, mirror averaged as models.runtime.classifier runs the shipped file; the output .npz holds the
best weights in PyTorch layout, the metrics log, and the model's outputs on probe faces, which
`torch_port import` checks Keras reproduces.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

PROJECT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from models.cli_args import positive_int, unit_interval
    p = argparse.ArgumentParser(prog="python -m models.train_torch", description=__doc__.split("\n\n")[0])
    p.add_argument("--pack", required=True, help="file written by `python -m models.torch_port pack`")
    p.add_argument("--labels", choices=("ferplus", "fer2013"), default="ferplus")
    p.add_argument("--width", choices=("tiny", "small", "base"), default="small")
    p.add_argument("--out", required=True, help="output .npz (best weights, log, probe outputs)")
    p.add_argument("--init", action="store_true", help="start from the pack's weights for --labels (a warm restart)")
    p.add_argument("--epochs", type=positive_int, default=300)
    p.add_argument("--minutes", type=float, default=0.0, help="also end the schedule after this many minutes (0 = no limit)")
    p.add_argument("--batch", type=positive_int, default=128)
    p.add_argument("--lr", type=float, default=0.02, help="peak SGD learning rate (cosine decay after warm-up)")
    p.add_argument("--warmup-epochs", type=float, default=3.0)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=unit_interval, default=0.0)
    p.add_argument("--dropout", type=unit_interval, default=0.4)
    p.add_argument("--spatial-dropout", type=unit_interval, default=0.1)
    p.add_argument("--aug", choices=("strong", "light"), default="strong")
    p.add_argument("--class-weight", choices=("none", "sqrt", "balanced"), default="sqrt")
    p.add_argument("--camera-aug", type=unit_interval, default=0.0, metavar="P",
                   help="share of training faces also degraded as a webcam does (as models.train; no JPEG here)")
    p.add_argument("--logit-adjust", type=float, default=0.0, metavar="TAU",
                   help="logit-adjusted loss (as models.train): train on logits + TAU x log(class prior)")
    p.add_argument("--select", choices=("accuracy", "balanced"), default="accuracy",
                   help="keep the epoch with the best PublicTest accuracy, or the best mean of accuracy and mean "
                        "per-class recall (for --logit-adjust runs)")
    p.add_argument("--teacher", action="append", default=[], metavar="NPZ",
                   help="a trained run (models.train_torch output or `torch_port teacher` file) whose prediction on "
                        "each augmented batch is blended into the targets (repeatable: the teachers' mean)")
    p.add_argument("--distill", type=unit_interval, default=0.5,
                   help="with --teacher: the teachers' share of each target (the rest: the labels)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default="cuda", help="cuda | cpu (cpu for smoke tests)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N training rows (smoke tests; 0 = all)")
    return p.parse_args(argv)


def build_torch_net(width: str = "small", dropout: float = 0.4, spatial_dropout: float = 0.1):
    """models.net.build_model in PyTorch: submodules carry the Keras layer names, so weights map one to one."""
    import torch
    from torch import nn

    from core.emotions import NUM_EMOTIONS
    from models.net_shape import BN_EPSILON, CONVS_PER_STAGE, DENSE_UNITS, PIXEL_MEAN, PIXEL_STD, WIDTHS

    class ExpressionNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: dict[str, nn.Module] = {}
            channels = 1
            self.plan: list[tuple[str, str]] = []   # (layer name, kind) in call order
            for stage, (filters, convs) in enumerate(zip(WIDTHS[width], CONVS_PER_STAGE), start=1):
                for i in range(convs):
                    name = f"s{stage}c{i + 1}"
                    layers[f"{name}_conv"] = nn.Conv2d(channels, filters, 3, padding=1, bias=False)
                    layers[f"{name}_bn"] = nn.BatchNorm2d(filters, eps=BN_EPSILON, momentum=0.01)
                    self.plan += [(f"{name}_conv", "layer"), (f"{name}_bn", "layer"), ("", "relu")]
                    channels = filters
                self.plan.append(("", "pool"))
                if stage >= 2:
                    layers[f"s{stage}_drop"] = nn.Dropout2d(spatial_dropout * (stage - 1))
                    self.plan.append((f"s{stage}_drop", "layer"))
            flat = channels * (48 // 2 ** len(CONVS_PER_STAGE)) ** 2
            layers["head_drop1"] = nn.Dropout(dropout)
            layers["head_dense"] = nn.Linear(flat, DENSE_UNITS, bias=False)
            layers["head_bn"] = nn.BatchNorm1d(DENSE_UNITS, eps=BN_EPSILON, momentum=0.01)
            layers["head_drop2"] = nn.Dropout(dropout)
            layers["logits"] = nn.Linear(DENSE_UNITS, NUM_EMOTIONS)
            self.layers = nn.ModuleDict(layers)
            self.mean, self.std = PIXEL_MEAN, PIXEL_STD
            self._init_like_keras()

        def _init_like_keras(self) -> None:
            # Keras' defaults (Glorot uniform, zero bias), so a fresh PyTorch run starts where a Keras one would.
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)

        def forward(self, x):  # x: (N, 1, 48, 48) in [0, 1] -> logits (N, 7)
            x = (x - self.mean) / self.std
            for name, kind in self.plan:
                if kind == "layer":
                    x = self.layers[name](x)
                elif kind == "relu":
                    x = torch.relu(x)
                else:
                    x = torch.nn.functional.max_pool2d(x, 2)
            x = x.permute(0, 2, 3, 1).flatten(1)     # NHWC order, as Keras' Flatten
            x = self.layers["head_drop1"](x)
            x = torch.relu(self.layers["head_bn"](self.layers["head_dense"](x)))
            return self.layers["logits"](self.layers["head_drop2"](x))

    return ExpressionNet()


def state_arrays(net) -> dict[str, np.ndarray]:
    """PyTorch state -> {"<keras layer>.<param>": float32 array}, copied (on the CPU, numpy() would share the
    live parameters), batch-norm step counters dropped."""
    return {k.removeprefix("layers."): v.detach().float().cpu().numpy().copy() for k, v in net.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def load_arrays(net, arrays: dict[str, np.ndarray]) -> None:
    import torch
    state = {f"layers.{k}": torch.from_numpy(np.asarray(v)) for k, v in arrays.items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the network: missing {missing[:3]}, unexpected {unexpected[:3]}")


class GpuAugmenter:
    """models.train.Augmenter on whole batches on the device: random affine (rotation, scale, shift, mirror),
    contrast/brightness and erasing; same ranges as the CPU path."""

    KINDS = ("blur", "dark", "noise", "downscale", "hand")   # models.train.camera_degrade's, less JPEG

    def __init__(self, strength: str, generator, camera: float = 0.0) -> None:
        from models.train import AUG_RANGES
        self.__dict__.update(AUG_RANGES[strength])
        self.g = generator
        self.camera = camera

    def _uniform(self, n: int, low: float, high: float, device):
        import torch
        return torch.rand(n, device=device, generator=self.g) * (high - low) + low

    def __call__(self, x):  # (N, 1, 48, 48) float in [0, 1]
        import torch
        import torch.nn.functional as F
        n, dev = len(x), x.device
        angle = self._uniform(n, -self.angle, self.angle, dev) * math.pi / 180
        scale = self._uniform(n, *self.scale, dev)
        mirror = torch.where(torch.rand(n, device=dev, generator=self.g) < 0.5, -1.0, 1.0)
        # affine_grid maps output to input coordinates: the inverse of "rotate by angle, zoom by scale".
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        shift = self._uniform(2 * n, -self.shift, self.shift, dev).view(n, 2) * (2 / 48)
        theta = torch.stack([torch.stack([cos * mirror, -sin, shift[:, 0]], 1),
                             torch.stack([sin * mirror, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        mean = x.mean((1, 2, 3), keepdim=True)
        contrast = self._uniform(n, 1 - self.contrast, 1 + self.contrast, dev).view(n, 1, 1, 1)
        bright = self._uniform(n, -self.brightness, self.brightness, dev).view(n, 1, 1, 1)
        x = (x - mean) * contrast + mean + bright
        # Random erasing (hands, glasses, occluders): a box of 8-23 px a side, a random gray.
        h = torch.randint(8, 24, (n, 1, 1), device=dev, generator=self.g)
        w = torch.randint(8, 24, (n, 1, 1), device=dev, generator=self.g)
        y0 = (torch.rand(n, 1, 1, device=dev, generator=self.g) * (48 - h)).long()
        x0 = (torch.rand(n, 1, 1, device=dev, generator=self.g) * (48 - w)).long()
        rows = torch.arange(48, device=dev).view(1, 48, 1)
        cols = torch.arange(48, device=dev).view(1, 1, 48)
        box = (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w)
        box &= (torch.rand(n, 1, 1, device=dev, generator=self.g) < self.erase)
        fill = torch.rand(n, 1, 1, device=dev, generator=self.g).expand(n, 48, 48)
        x = torch.where(box.unsqueeze(1), fill.unsqueeze(1), x)
        if self.camera > 0:
            chosen = torch.rand(n, device=dev, generator=self.g) < self.camera
            x = torch.where(chosen.view(n, 1, 1, 1), self.degrade(x.clamp(0.0, 1.0)), x)
        return x.clamp(0.0, 1.0)

    def degrade(self, x, kind: str | None = None):
        """Each face degraded as a webcam does, one kind each (random, or `kind` for all), at random strengths:
        models.train.camera_degrade on the device, except JPEG, which has no GPU kernel here."""
        import torch
        import torch.nn.functional as F
        n, dev = len(x), x.device
        # One blur width and one down-scaled size per batch (a batch is 128 faces of thousands of batches).
        sigma = float(self._uniform(1, 0.3, 1.0, dev))
        taps = torch.arange(-2, 3, device=dev, dtype=x.dtype)
        kernel = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel = kernel / kernel.sum()
        blurred = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="reflect"), kernel.view(1, 1, 1, 5))
        blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="reflect"), kernel.view(1, 1, 5, 1))
        gamma = torch.where(torch.rand(n, 1, 1, 1, device=dev, generator=self.g) < 0.8,
                            self._uniform(n, 1.2, 2.5, dev).view(n, 1, 1, 1), self._uniform(n, 0.5, 0.8, dev).view(n, 1, 1, 1))
        dark = x.clamp(1e-4, 1.0) ** gamma
        noisy = x + torch.randn(x.shape, device=dev, generator=self.g) * self._uniform(n, 2, 6, dev).view(n, 1, 1, 1) / 255
        side = int(torch.randint(20, 36, (1,), device=dev, generator=self.g))
        small = F.interpolate(F.interpolate(x, size=(side, side), mode="area"), size=(48, 48), mode="bilinear",
                              align_corners=False)
        # A hand: a smooth skin-like patch over part of the lower face, at the left, right or anywhere.
        h = torch.randint(8, 22, (n, 1, 1), device=dev, generator=self.g)
        w = torch.randint(12, 30, (n, 1, 1), device=dev, generator=self.g)
        y0 = 48 - h - (torch.rand(n, 1, 1, device=dev, generator=self.g) * 7).long()
        where = torch.rand(n, 1, 1, device=dev, generator=self.g)
        anywhere = (torch.rand(n, 1, 1, device=dev, generator=self.g) * (48 - w + 1)).long()
        x0 = torch.where(where < 0.4, torch.zeros_like(w), torch.where(where < 0.8, 48 - w, anywhere))
        rows = torch.arange(48, device=dev).view(1, 48, 1)
        cols = torch.arange(48, device=dev).view(1, 1, 48)
        patch = (rows >= y0) & (rows < y0 + h) & (cols >= x0) & (cols < x0 + w)
        slope = torch.where(torch.rand(n, 1, 1, device=dev, generator=self.g) < 0.5, -1.0, 1.0)
        shade = (x.median(dim=3).values.median(dim=2).values.view(n, 1, 1)
                 + torch.randn(n, 1, 1, device=dev, generator=self.g) * 12 / 255
                 + slope * ((cols - x0).float() / w.float() * 16 - 8) / 255
                 + torch.randn(n, 48, 48, device=dev, generator=self.g) * 3 / 255)
        hand = torch.where(patch.unsqueeze(1), shade.unsqueeze(1), x)
        options = torch.stack([blurred, dark, noisy, small, hand])          # (kinds, N, 1, 48, 48)
        pick = (torch.full((n,), self.KINDS.index(kind), device=dev) if kind is not None
                else torch.randint(0, len(self.KINDS), (n,), device=dev, generator=self.g))
        return options[pick, torch.arange(n, device=dev)].clamp(0.0, 1.0)


@contextlib.contextmanager
def full_precision(torch):
    """Plain float32 (no TF32) while computing the probe outputs that Keras must reproduce on a CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def training_targets(pack: dict[str, np.ndarray], labels: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train faces, soft targets, PublicTest faces, PublicTest labels), excluded rows dropped as in models.train."""
    keep = pack[f"train_hard_{labels}"] >= 0
    val_hard = pack[f"val_{labels}"]
    vkeep = val_hard >= 0
    return (pack["train_images"][keep], pack[f"train_soft_{labels}"][keep].astype(np.float32),
            pack["val_images"][vkeep], val_hard[vkeep])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(PROJECT))
    args = parse_args(argv)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("error: PyTorch is not installed (this trainer is for machines with a GPU; "
              "models.train trains the same network with TensorFlow)", file=sys.stderr)
        return 2
    from models.torch_port import read_pack, read_teacher
    from models.train import class_prior, class_weights   # numpy only at import time, like this module
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device (use --device cpu for a smoke test)", file=sys.stderr)
        return 2
    try:
        pack = read_pack(Path(args.pack))
    except (OSError, EOFError, ValueError) as exc:
        print(f"error: --pack {args.pack}: {exc}", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # training only
    g = torch.Generator(device=dev)
    g.manual_seed(args.seed)

    x_np, y_np, xv_np, yv_np = training_targets(pack, args.labels)
    if args.limit:
        x_np, y_np, xv_np, yv_np = x_np[:args.limit], y_np[:args.limit], xv_np[:args.limit], yv_np[:args.limit]
    if len(x_np) == 0 or len(xv_np) == 0:
        print("error: the pack holds no usable Training or PublicTest faces for these labels", file=sys.stderr)
        return 2
    weights_np = class_weights(None, y_np, args.class_weight)
    x_train = torch.from_numpy(x_np).to(dev).unsqueeze(1)            # uint8 on the device: 66 MB
    y_train = torch.from_numpy(y_np).to(dev)
    x_val = torch.from_numpy(xv_np).to(dev).unsqueeze(1)
    y_val = torch.from_numpy(yv_np.astype(np.int64)).to(dev)
    class_w = torch.from_numpy(weights_np).to(dev)
    prior_shift = torch.from_numpy(args.logit_adjust * np.log(class_prior(None, y_np))).to(dev)

    net = build_torch_net(args.width, args.dropout, args.spatial_dropout).to(dev)
    probe = torch.from_numpy(pack["probe_images"]).to(dev).permute(0, 3, 1, 2)
    meta_in = json.loads(str(pack["meta"]))
    if args.init:
        prefix = f"init/{args.labels}/"
        init = {k[len(prefix):]: v for k, v in pack.items() if k.startswith(prefix) and not k.endswith("probe_probs")}
        if not init:
            print(f"error: --init: the pack holds no start weights for {args.labels}", file=sys.stderr)
            return 2
        load_arrays(net, init)
        net.eval()
        with torch.no_grad(), full_precision(torch):
            gap = float((torch.softmax(net(probe), 1).cpu() - torch.from_numpy(pack[prefix + "probe_probs"])).abs().max())
        if gap > 1e-3:  # the port is wrong: training from it would waste the lent minutes
            print(f"error: the PyTorch copy does not reproduce Keras' outputs (largest difference {gap:.2g})",
                  file=sys.stderr)
            return 2
        print(f"starting from {meta_in['init'][args.labels]['run']} (PyTorch matches Keras within {gap:.1g})",
              flush=True)

    teachers = []
    for path in args.teacher:
        try:
            arrays, meta = read_teacher(Path(path))
            teacher = build_torch_net(meta["args"]["width"]).to(dev)
            load_arrays(teacher, arrays)
        except (ValueError, RuntimeError) as exc:   # RuntimeError: arrays of another shape than the width says
            print(f"error: --teacher {exc}", file=sys.stderr)
            return 2
        teachers.append(teacher.eval().requires_grad_(False))

    def mirror_averaged(model, xb):
        # Softmax averaged with the mirrored faces: how models.runtime.classifier runs the shipped file.
        return (torch.softmax(model(xb), 1) + torch.softmax(model(xb.flip(3)), 1)) / 2

    def evaluate(models_=None) -> float:
        """Mirror-averaged PublicTest accuracy of the student, or of the given models' mean prediction; with
        --select balanced, its mean with the mean per-class recall."""
        models_ = models_ or [net]
        for m in models_:
            m.eval()
        preds = []
        with torch.no_grad():
            for start in range(0, len(x_val), 1024):
                xb = x_val[start:start + 1024].float() / 255
                preds.append(sum(mirror_averaged(m, xb) for m in models_).argmax(1))
        pred = torch.cat(preds)
        accuracy = float((pred == y_val).float().mean())
        if args.select == "accuracy":
            return accuracy
        recalls = [float((pred[y_val == c] == c).float().mean()) for c in range(7) if bool((y_val == c).any())]
        return (accuracy + sum(recalls) / len(recalls)) / 2

    def teachers_predict(xb):
        # The teachers see the very batch the student sees ("consistent" distillation); bf16 for speed.
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            return sum(torch.softmax(t(xb).float(), 1) for t in teachers) / len(teachers)

    if teachers:
        scores = ", ".join(f"{evaluate([t]):.4f}" for t in teachers)
        print(f"{len(teachers)} teachers, distill {args.distill}: PublicTest {scores}; together {evaluate(teachers):.4f}",
              flush=True)

    start_acc = evaluate() if args.init else 0.0
    opt = torch.optim.SGD(net.parameters(), lr=args.lr / 10, momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    augment = GpuAugmenter(args.aug, g, camera=args.camera_aug)
    steps_per_epoch = math.ceil(len(x_train) / args.batch)
    total_steps = steps_per_epoch * args.epochs
    warmup = min(args.warmup_epochs * steps_per_epoch, total_steps / 5)
    budget_s = args.minutes * 60 if args.minutes > 0 else math.inf
    print(f"{args.labels} {args.width}: {sum(p.numel() for p in net.parameters()):,} parameters, "
          f"{len(x_train)} training faces, {len(x_val)} PublicTest faces, {steps_per_epoch} steps per epoch, "
          f"up to {args.epochs} epochs / {args.minutes or 'unlimited'} min on {dev}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def probe_outputs() -> np.ndarray:
        net.eval()
        with torch.no_grad(), full_precision(torch):
            return torch.softmax(net(probe), 1).cpu().numpy()

    def save(final: bool) -> None:
        """Best weights so far, with their probe outputs and the log; atomic, so a run killed at its time
        limit still leaves its best model behind."""
        meta = {"best_val_accuracy": best_acc, "best_epoch": best_epoch, "epochs": epoch, "final": final,
                "elapsed_s": round(time.time() - t0, 1), "log": "\n".join(log) + "\n",
                "trained_with": "models.train_torch on " + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
                "args": {**{k: str(v) for k, v in vars(args).items()}, "width": args.width, "labels": args.labels}}
        if args.init:
            meta["args"]["init_weights"] = meta_in["init"][args.labels]["run"]
            meta["start_val_accuracy"] = start_acc
        tmp = out.with_name(out.stem + ".tmp.npz")
        np.savez(tmp, **best_state, probe_images=pack["probe_images"], probe_probs=best_probe,
                 meta=np.array(json.dumps(meta)))
        tmp.replace(out)

    best_acc, best_epoch, best_state, best_probe = start_acc, 0, state_arrays(net), probe_outputs()
    last_save = time.time()
    log = ["epoch,progress,lr,loss,train_accuracy,val_accuracy,elapsed_s"]
    t0, step, epoch, progress = time.time(), 0, 0, 0.0

    def schedule_progress() -> float:
        # By steps or by the clock, whichever is further: the schedule always completes.
        return min(1.0, max(step / total_steps, (time.time() - t0) / budget_s))

    while progress < 1.0:
        net.train()
        order = torch.randperm(len(x_train), device=dev, generator=g)
        loss_sum = torch.zeros((), device=dev)
        hits = torch.zeros((), device=dev)
        seen = 0
        for i in range(steps_per_epoch):
            progress = schedule_progress()
            if progress >= 1.0:   # out of time mid-epoch
                break
            done = progress * total_steps
            lr = args.lr * (0.1 + 0.9 * done / warmup) if done < warmup else \
                args.lr * 0.5 * (1 + math.cos(math.pi * (done - warmup) / max(1.0, total_steps - warmup)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[i * args.batch:(i + 1) * args.batch]
            xb = augment(x_train[idx].float() / 255)
            yb = y_train[idx]
            target = yb * (1 - args.label_smoothing) + args.label_smoothing / yb.shape[1]
            if teachers:
                target = (1 - args.distill) * target + args.distill * teachers_predict(xb)
            logits = net(xb)
            # Logit adjustment (Menon et al., 2021): the loss sees the prior added, so the plain logits learn without it.
            per_row = -(target * F.log_softmax(logits + prior_shift, 1)).sum(1)
            # Class weights on soft targets: each row weighted by its target's expected class weight.
            loss = (per_row * (yb * class_w).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            seen += len(idx)
            loss_sum += loss.detach() * len(idx)
            hits += (logits.argmax(1) == yb.argmax(1)).sum()
        if seen == 0:
            break
        epoch += 1
        progress = schedule_progress()
        acc = evaluate()
        if acc > best_acc:
            best_acc, best_epoch, best_state, best_probe = acc, epoch, state_arrays(net), probe_outputs()
            if time.time() - last_save > 30:
                save(final=False)
                last_save = time.time()
        log.append(f"{epoch},{progress:.4f},{lr:.6f},{float(loss_sum) / seen:.4f},{float(hits) / seen:.4f},"
                   f"{acc:.4f},{time.time() - t0:.1f}")
        if epoch % 10 == 0 or progress >= 1.0:
            print(f"epoch {epoch} ({time.time() - t0:.0f} s, progress {progress:.2f}, lr {lr:.5f}): "
                  f"PublicTest {args.select} {acc:.4f} (best {best_acc:.4f} at {best_epoch})", flush=True)

    save(final=True)
    print(f"done: {args.labels} best PublicTest {args.select} {best_acc:.4f} at epoch {best_epoch} of {epoch} "
          f"({(time.time() - t0) / 60:.1f} min) -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
