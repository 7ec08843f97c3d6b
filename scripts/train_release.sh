#!/usr/bin/env bash
# The exact commands that produced the shipped weights hmmn_ops/weights/hmmn.pt (+ hmmn.json),
# docs/training_loss.png and docs/training_log.csv, on a 2-core CPU (see docs/training.md).
# Resumable: after an interruption, run it again and training continues from the last checkpoint
# (every 100 steps) exactly as if it had not stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/release}
THREADS=${THREADS:-2}

hmmn-vos train --config configs/release.yaml --out "$RUN" --resume --threads "$THREADS" \
    --export hmmn_ops/weights/hmmn.pt
cp "$RUN/loss.png" docs/training_loss.png
cp "$RUN/log.csv" docs/training_log.csv
hmmn-vos demo --out "$RUN/demo"
