#!/usr/bin/env bash
# hmmn_ops/configs/gpu.yaml on a lent GPU, one slice per device call (a call may run 10 minutes; the
# machine stays warm 30 s between calls, and runs/ with it):
#
#   bash scripts/train_gpu.sh SECONDS [MINUTES]
#
# builds the extension if it is not built, trains (or resumes) for SECONDS, and copies the log
# and the loss curve to $OUT. The first call also sizes the run: 60 main-training steps into a
# throwaway folder measure the seconds a step takes here, and pretrain_steps + main_steps are
# set so that the whole run takes about MINUTES (default 18) of training, a fifth of it
# pretraining (a resumed run keeps that config; it refuses a changed one). The call in which
# the run finishes also scores it as the CPU stages were scored: `hmmn-vos demo` on the CPU
# with 2 threads (the target: J&F >= 0.80 on CPU in under 10 minutes), the validation J of
# scripts/per_frame_j.py, and returns the weights (weights.pt, 16 MB) and the config.
# SET="key=value ..." overrides config fields in every training call (workers=6 on fewer cores).
set -uo pipefail
cd "$(dirname "$0")/.."
SECONDS_OF_TRAINING=${1:?usage: train_gpu.sh SECONDS [MINUTES]}
MINUTES=${2:-18}
RUN=${RUN:-runs/gpu}
OUT=${OUT:-$RUN/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
sets=()
for kv in ${SET:-}; do sets+=(--set "$kv"); done

python3 -c "import hmmn_ops._C" 2>/dev/null || python3 -m pip install -q --no-build-isolation --no-deps -e . || exit
if [ ! -f "$RUN/config.yaml" ]; then
    rm -rf "$RUN.probe"
    python3 -m hmmn_ops.cli train --config gpu --quiet --out "$RUN.probe" "${sets[@]}" \
        --set pretrain_steps=0 --set main_steps=60 --set checkpoint_every=60 --set log_every=20 || exit
    # the last two 20-step windows: the first one holds CUDA's and the loaders' start
    steps=$(python3 - "$RUN.probe/log.csv" "$MINUTES" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
s = sum(float(r["s_per_step"]) for r in rows[-2:]) / 2
steps = float(sys.argv[2]) * 60 / s
print(f"{int(steps / 5) // 100 * 100} {max(100, int(steps * 4 / 5) // 100 * 100)} {s:.3f}")
PY
)
    read -r pretrain main s <<<"$steps"
    echo "train_gpu: $s s a main-training step here: $pretrain pretraining + $main main-training steps for $MINUTES minutes"
else  # the sizes the first call chose (a resumed run must be given the same config)
    read -r pretrain main <<<"$(python3 -c 'import sys, yaml; c = yaml.safe_load(open(sys.argv[1]))
print(c["pretrain_steps"], c["main_steps"])' "$RUN/config.yaml")"
fi
timeout "$SECONDS_OF_TRAINING" python3 -m hmmn_ops.cli train --config gpu --quiet --out "$RUN" --resume "${sets[@]}" \
    --set "pretrain_steps=$pretrain" --set "main_steps=$main"
trained=$?
cp "$RUN/log.csv" "$RUN/loss.png" "$RUN/config.yaml" "$OUT"/ 2>/dev/null
tail -n 2 "$RUN/log.csv"
if [ "$trained" -eq 124 ]; then
    echo "train_gpu: stopped after $SECONDS_OF_TRAINING s; call again to resume from the last checkpoint"
    exit 0
elif [ "$trained" -ne 0 ]; then
    echo "train_gpu: training failed (exit $trained)"
    exit "$trained"
fi
python3 -m hmmn_ops.cli demo --weights "$RUN/weights.pt" --out "$RUN/demo" --device cpu --threads 2 --quiet 2>&1 | tee "$OUT/demo.txt"
python3 scripts/per_frame_j.py "$RUN/weights.pt" --frames 40 --errors --threads 2 2>&1 | tr '\r' '\n' \
    | grep -E "mean J|errors of|losses of|situation" | tee "$OUT/validation.txt"
cp "$RUN/weights.pt" "$OUT"/
