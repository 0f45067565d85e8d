#!/usr/bin/env bash
# Train the shipped expression models on a machine with an NVIDIA GPU and PyTorch (no TensorFlow needed):
# four runs at once on the one GPU, two regularisation settings per label set, each with a cosine schedule
# of up to EPOCHS epochs or MINUTES minutes, whichever ends first. Selection is on PublicTest only.
#
#   python -m models.torch_port pack --out .gpu/fer-pack.xz          # here: faces + labels in one 57 MB file
#   PACK=.gpu/fer-pack.xz OUT=runs/gpu MINUTES=7.5 scripts/train_gpu.sh   # there
#   python -m models.torch_port import --weights runs/gpu/ferplus-strong.npz --out runs/gpu-ferplus-strong
#   python -m models.export --run runs/gpu-ferplus-strong --name ferplus --labels ferplus
set -u
PACK=${PACK:-.gpu/fer-pack.xz}
OUT=${OUT:-runs/gpu}
MINUTES=${MINUTES:-7.5}
EPOCHS=${EPOCHS:-400}
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
nvidia-smi -L 2>/dev/null || true
common=(--pack "$PACK" --epochs "$EPOCHS" --minutes "$MINUTES" --class-weight none --lr 0.02 --batch 128 --device "$DEVICE")
strong=(--aug strong --dropout 0.4 --spatial-dropout 0.1)
light=(--aug light --dropout 0.25 --spatial-dropout 0.05)
run() {  # name, then the run's own flags
    local name=$1; shift
    "$PYTHON" -m models.train_torch "${common[@]}" "$@" --out "$OUT/$name.npz" >"$OUT/$name.log" 2>&1 &
}
run ferplus-strong --labels ferplus "${strong[@]}" --seed 1
run ferplus-light --labels ferplus "${light[@]}" --seed 2
run fer2013-strong --labels fer2013 "${strong[@]}" --label-smoothing 0.1 --seed 3
run fer2013-light --labels fer2013 "${light[@]}" --label-smoothing 0.1 --seed 4
wait
for log in "$OUT"/*.log; do echo "== $log"; tail -n 4 "$log"; done
