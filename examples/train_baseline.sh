#!/usr/bin/env bash
# Train the baseline: a small CNN from scratch on a seeded CIFAR-10 subset. Prints the job (JSON).
#   examples/train_baseline.sh                       # the reference configuration
#   EPOCHS=2 TRAIN_SAMPLES=500 examples/train_baseline.sh
# Env: TRAIN_SAMPLES (5000) TEST_SAMPLES (1000) EPOCHS (10) BATCH_SIZE (32) LEARNING_RATE (0.001) SEED (42)
#      NAME (none); WAIT=1 waits for the end and prints the finished job. BASE_URL, TL_API_KEY: see _common.sh.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

body=$(python3 -c '
import json, sys
train, test, epochs, batch, lr, seed, name = sys.argv[1:]
print(json.dumps({"model": "baseline", "train_samples": int(train), "test_samples": int(test),
                  "epochs": int(epochs), "batch_size": int(batch), "learning_rate": float(lr),
                  "seed": int(seed), "name": name or None}))
' "${TRAIN_SAMPLES:-5000}" "${TEST_SAMPLES:-1000}" "${EPOCHS:-10}" "${BATCH_SIZE:-32}" \
  "${LEARNING_RATE:-0.001}" "${SEED:-42}" "${NAME:-}")

job=$(submit_job "$body")
id=$(field id <<<"$job")
echo "job $id queued; follow it with: examples/watch_job.sh $id" >&2
if [ "${WAIT:-0}" = "1" ]; then job=$(wait_job "$id"); fi
pretty <<<"$job"
