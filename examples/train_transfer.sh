#!/usr/bin/env bash
# Train the transfer model: ImageNet MobileNetV2 (frozen) + a new dense head. Prints the job (JSON).
#   examples/train_transfer.sh                       # the reference configuration
#   FINE_TUNE_LAYERS=30 FINE_TUNE_EPOCHS=3 examples/train_transfer.sh
# Env: TRAIN_SAMPLES (5000) TEST_SAMPLES (1000) EPOCHS (10) BATCH_SIZE (32) LEARNING_RATE (0.001) SEED (42)
#      IMAGE_SIZE (96) ALPHA (1.0) DROPOUT (0.5) DENSE_UNITS (128,64) FINE_TUNE_LAYERS (0) FINE_TUNE_EPOCHS (0)
#      FINE_TUNE_LEARNING_RATE (0.00001) NAME (none); WAIT=1 waits for the end and prints the finished job.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

body=$(python3 -c '
import json, sys
(train, test, epochs, batch, lr, seed, size, alpha, dropout, units, ft_layers, ft_epochs, ft_lr,
 name) = sys.argv[1:]
print(json.dumps({"model": "transfer", "train_samples": int(train), "test_samples": int(test),
                  "epochs": int(epochs), "batch_size": int(batch), "learning_rate": float(lr),
                  "seed": int(seed), "image_size": int(size), "alpha": float(alpha), "dropout": float(dropout),
                  "dense_units": [int(u) for u in units.split(",") if u.strip()],
                  "fine_tune_layers": int(ft_layers), "fine_tune_epochs": int(ft_epochs),
                  "fine_tune_learning_rate": float(ft_lr), "name": name or None}))
' "${TRAIN_SAMPLES:-5000}" "${TEST_SAMPLES:-1000}" "${EPOCHS:-10}" "${BATCH_SIZE:-32}" \
  "${LEARNING_RATE:-0.001}" "${SEED:-42}" "${IMAGE_SIZE:-96}" "${ALPHA:-1.0}" "${DROPOUT:-0.5}" \
  "${DENSE_UNITS-128,64}" "${FINE_TUNE_LAYERS:-0}" "${FINE_TUNE_EPOCHS:-0}" "${FINE_TUNE_LEARNING_RATE:-0.00001}" \
  "${NAME:-}")

job=$(submit_job "$body")
id=$(field id <<<"$job")
echo "job $id queued; follow it with: examples/watch_job.sh $id" >&2
if [ "${WAIT:-0}" = "1" ]; then job=$(wait_job "$id"); fi
pretty <<<"$job"
