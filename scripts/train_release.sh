#!/usr/bin/env bash
# The exact commands that produced the shipped weights hmmn_ops/weights/hmmn.pt (+ hmmn.json),
# docs/training_loss.png, docs/training_log.csv, docs/finetune_loss.png, docs/finetune_log.csv,
# docs/long_clips_loss.png, docs/long_clips_log.csv, docs/prev_mask_loss.png, docs/prev_mask_log.csv,
# docs/prior_res4_loss.png and docs/prior_res4_log.csv,
# on a 2-core CPU (see docs/training.md).
# Stage 1 + 2 (hmmn_ops/configs/release.yaml): pretraining on stills, main training on videos, 96x96.
# Stage 3 (hmmn_ops/configs/finetune.yaml): main training continued at the demo's frame size, 112x192.
# Stage 4 (hmmn_ops/configs/long_clips.yaml): main training continued on 5-frame clips.
# Stage 5 (hmmn_ops/configs/prev_mask.yaml): + the previous-mask prior (HMMNConfig.prev_mask), 5-frame clips.
# Stage 6 (hmmn_ops/configs/prior_res4.yaml): + the prior at 1/16 too (HMMNConfig.prev_mask_res4).
# Resumable: after an interruption, run it again and training continues from the last checkpoint
# (every 100 steps) exactly as if it had not stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}

hmmn-vos train --config release --out runs/release --resume --threads "$THREADS"
hmmn-vos train --config finetune --out runs/finetune --resume --threads "$THREADS"
hmmn-vos train --config long_clips --out runs/long_clips --resume --threads "$THREADS"
hmmn-vos train --config prev_mask --out runs/prev_mask --resume --threads "$THREADS"
hmmn-vos train --config prior_res4 --out runs/prior_res4 --resume --threads "$THREADS" \
    --export hmmn_ops/weights/hmmn.pt
cp runs/release/loss.png docs/training_loss.png
cp runs/release/log.csv docs/training_log.csv
cp runs/finetune/loss.png docs/finetune_loss.png
cp runs/finetune/log.csv docs/finetune_log.csv
cp runs/long_clips/loss.png docs/long_clips_loss.png
cp runs/long_clips/log.csv docs/long_clips_log.csv
cp runs/prev_mask/loss.png docs/prev_mask_loss.png
cp runs/prev_mask/log.csv docs/prev_mask_log.csv
cp runs/prior_res4/loss.png docs/prior_res4_loss.png
cp runs/prior_res4/log.csv docs/prior_res4_log.csv
hmmn-vos demo --out runs/prior_res4/demo
