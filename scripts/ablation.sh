#!/usr/bin/env bash
# The ablation of docs/ablation.md (HMMN Table 5 on synthetic videos): one trained model scored
# with each res4 kernel (none = STM's read, kmn, hmmn) on two held-out synthetic sets.
#   bash scripts/ablation.sh WEIGHTS TAG [demo options...]   # e.g. --no-topk
# Appends "TAG set kernel options | J&F .. J .. F .. ms/frame .." to runs/ablation.txt.
# Set A: 48 videos, 1-2 look-alike distractors; set B: 48 videos, 3 distractors. 30 frames,
# 112x192, seeds 30000000 / 31000000 (never used in training).
set -euo pipefail
cd "$(dirname "$0")/.."
WEIGHTS=$1; TAG=$2; shift 2
mkdir -p runs
for set in "A 30000000 1 2" "B 31000000 3 3"; do
  read -r name seed dmin dmax <<< "$set"
  for kernel in none kmn hmmn; do
    line=$(hmmn-vos demo --out "runs/ablation-$TAG" --weights "$WEIGHTS" --seed "$seed" --sequences 48 \
           --frames 30 --distractors "$dmin" "$dmax" --kernel "$kernel" --threads "${THREADS:-1}" --quiet "$@" | tail -1)
    echo "$TAG set$name kernel=$kernel $* | $line" | tee -a runs/ablation.txt
  done
done
