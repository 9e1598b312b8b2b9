#!/usr/bin/env bash
# The reference experiment: the baseline CNN and the MobileNetV2 transfer model on the same seeded subset
# (5000 train / 1000 test images, 10 epochs, batch 32, Adam 0.001, seed 42; transfer at 96 px, alpha 1.0,
# head 128-64, dropout 0.5). Starts both jobs, waits for them, and prints the side-by-side table.
#   examples/reproduce_seed.sh
#   TRAIN_SAMPLES=500 TEST_SAMPLES=200 EPOCHS=2 IMAGE_SIZE=32 examples/reproduce_seed.sh   # a quick smaller run
# Env: TRAIN_SAMPLES TEST_SAMPLES EPOCHS BATCH_SIZE SEED IMAGE_SIZE (the defaults above); BASE_URL, TL_API_KEY.
set -euo pipefail
source "$(dirname "$0")/_common.sh"

common=$(python3 -c '
import json, sys
train, test, epochs, batch, seed = (int(v) for v in sys.argv[1:])
print(json.dumps({"train_samples": train, "test_samples": test, "epochs": epochs, "batch_size": batch,
                  "learning_rate": 0.001, "seed": seed}))
' "${TRAIN_SAMPLES:-5000}" "${TEST_SAMPLES:-1000}" "${EPOCHS:-10}" "${BATCH_SIZE:-32}" "${SEED:-42}")
baseline_body=$(python3 -c 'import json, sys; print(json.dumps({"model": "baseline", **json.loads(sys.argv[1])}))' \
    "$common")
transfer_body=$(python3 -c '
import json, sys
print(json.dumps({"model": "transfer", **json.loads(sys.argv[1]), "image_size": int(sys.argv[2]), "alpha": 1.0,
                  "dense_units": [128, 64], "dropout": 0.5, "fine_tune_layers": 0, "fine_tune_epochs": 0}))
' "$common" "${IMAGE_SIZE:-96}")

baseline_id=$(submit_job "$baseline_body" | field id)
transfer_id=$(submit_job "$transfer_body" | field id)
echo "started baseline job $baseline_id and transfer job $transfer_id; waiting (one worker runs them in turn)" >&2
baseline=$(wait_job "$baseline_id")
transfer=$(wait_job "$transfer_id")

python3 - "$BASE_URL" "$baseline" "$transfer" <<'PY'
import json, sys

base_url, jobs = sys.argv[1], {"baseline": json.loads(sys.argv[2]), "transfer": json.loads(sys.argv[3])}
failed = {kind: job for kind, job in jobs.items() if job["status"] != "succeeded"}
for kind, job in failed.items():
    error = job.get("error") or {}
    print(f"{kind} job {job['id']} {job['status']}: {error.get('type', '')} {error.get('message', '')}", file=sys.stderr)
if failed:
    sys.exit(1)

spec = jobs["baseline"]["spec"]
print(f"Reference experiment: {spec['train_samples']} train / {spec['test_samples']} test images, "
      f"{spec['epochs']} epochs, batch {spec['batch_size']}, seed {spec['seed']}; "
      f"transfer at {jobs['transfer']['spec']['image_size']} px\n")
rows = [
    ("train accuracy", lambda m: f"{m['train_accuracy']:.4f}"),
    ("test accuracy", lambda m: f"{m['test_accuracy']:.4f}"),
    ("total params", lambda m: f"{m['params_total']:,}"),
    ("trainable params", lambda m: f"{m['params_trainable']:,}"),
    ("seconds", lambda m: f"{m['train_seconds']:.1f}"),
]
print(f"| {'':<18} | {'baseline':>12} | {'transfer':>12} |")
print(f"|{'-' * 20}|{'-' * 14}|{'-' * 14}|")
for label, show in rows:
    cells = [show(jobs[kind]["metrics"]) for kind in ("baseline", "transfer")]
    print(f"| {label:<18} | {cells[0]:>12} | {cells[1]:>12} |")
print()
for kind, job in jobs.items():
    print(f"{kind} curves: {base_url}/v1/models/{job['model_id']}/curves.png")
PY
