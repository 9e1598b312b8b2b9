#!/usr/bin/env bash
# Train a classifier on your own images. DIR holds one folder per class (roses/1.jpg, tulips/2.png, ...; also
# train/ + test/ folders, or a labels.csv: see "Datasets" in shared/API.md). The script zips DIR, uploads it
# (POST /v1/datasets), waits until the dataset is ready and prints its counts, trains a transfer model on it
# (POST /v1/jobs), waits for the job, and classifies one image of DIR with the new model. Progress goes to
# stderr; stdout is one JSON object: dataset_id, job_id, model_id, classes, test_accuracy, image, prediction.
#   examples/train_on_folder.sh ~/flowers
#   EPOCHS=10 IMAGE_SIZE=128 examples/train_on_folder.sh ~/flowers
#   MODEL=baseline examples/train_on_folder.sh ~/flowers    # the small CNN from scratch instead
# Env: EPOCHS (3) MODEL (transfer) IMAGE_SIZE (96, transfer only) BATCH_SIZE (32) LEARNING_RATE (0.001) SEED (42)
#      TRAIN_SAMPLES TEST_SAMPLES (empty: all images) TEST_FRACTION (0.2) NAME (DIR's name);
#      BASE_URL, TL_API_KEY, POLL: see _common.sh.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -ne 1 ]; then echo "usage: $0 DIR" >&2; exit 2; fi
if [ ! -d "$1" ]; then echo "$0: no such folder: $1" >&2; exit 2; fi
dir="${1%/}"
name="${NAME:-$(basename "$(cd "$dir" && pwd)")}"

# 1. Zip the folder (paths relative to DIR) into a temporary file.
archive=$(mktemp "${TMPDIR:-/tmp}/tl-dataset-XXXXXX.zip")
trap 'rm -f "$archive"' EXIT
count=$(python3 -c '
import os, sys, zipfile
root, out = sys.argv[1:]
count = 0
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as zf:
    for parent, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(parent, name)
            if os.path.isfile(path):
                zf.write(path, os.path.relpath(path, root))
                count += 1
print(count)
' "$dir" "$archive")
echo "zipped $count files of $dir ($(wc -c <"$archive" | tr -d ' ') bytes)" >&2

# 2. Upload it as a raw application/zip body; the options go in the query string.
query=$(python3 -c '
import sys, urllib.parse
name, fraction, seed = sys.argv[1:]
print(urllib.parse.urlencode({"name": name[:64], "test_fraction": fraction, "seed": seed}))
' "$name" "${TEST_FRACTION:-0.2}" "${SEED:-42}")
dataset=$(api -X POST "$BASE_URL/v1/datasets?$query" -H "Content-Type: application/zip" --data-binary "@$archive")
dataset_id=$(field id <<<"$dataset")
echo "dataset $dataset_id uploaded; processing" >&2

# 3. Wait until it is ready (or failed), then print its counts.
waited_from=$SECONDS
hinted=0
while true; do
    dataset=$(api "$BASE_URL/v1/datasets/$dataset_id")
    status=$(field status <<<"$dataset")
    case "$status" in
        ready|failed) break ;;
    esac
    if [ "$hinted" = 0 ] && [ $((SECONDS - waited_from)) -ge 60 ] \
        && [[ "$(field progress <<<"$dataset")" =~ ^0(\.0*)?$ ]]; then
        echo "still at 0% after a minute: is a dataset worker running (celery -A worker.dataset_tasks:app" \
             "worker -Q datasets; make run starts one)?" >&2
        hinted=1
    fi
    python3 -c '
import json, sys
d = json.load(sys.stdin)
print("{}: {:<10} {:.0%}".format(d["id"], d["status"], d.get("progress") or 0.0), file=sys.stderr)' <<<"$dataset"
    sleep "$POLL"
done
python3 - "$dataset" <<'PY'
import json, sys

d = json.loads(sys.argv[1])
if d["status"] != "ready":
    error = d.get("error") or {}
    print(f"dataset {d['id']} failed: {error.get('type', '')}: {error.get('message', '')}", file=sys.stderr)
    sys.exit(1)
train, test = d["counts"]["train"], d["counts"]["test"]
print(f"dataset {d['id']} ready: {len(d['classes'])} classes, {sum(train.values())} train / "
      f"{sum(test.values())} test images", file=sys.stderr)
width = max(len(c) for c in d["classes"])
for c in d["classes"]:
    print(f"  {c:<{width}}  train {train.get(c, 0):>6}  test {test.get(c, 0):>6}", file=sys.stderr)
dup = d.get("duplicates") or {}
if d.get("skipped_count") or dup.get("within_split") or dup.get("train_test"):
    print(f"  skipped {d.get('skipped_count', 0)} file(s); duplicates: {dup.get('within_split', 0)} within a split, "
          f"{dup.get('train_test', 0)} across train and test (removed from test)", file=sys.stderr)
    for skipped in d.get("skipped", [])[:5]:
        print(f"    {skipped['path']}: {skipped['reason']}", file=sys.stderr)
PY

# 4. Train on it and wait for the job.
body=$(python3 -c '
import json, sys
model, dataset, epochs, batch, lr, seed, size, train, test, name = sys.argv[1:]
body = {"model": model, "dataset": dataset, "epochs": int(epochs), "batch_size": int(batch),
        "learning_rate": float(lr), "seed": int(seed), "name": name[:64] or None,
        "train_samples": int(train) if train else None, "test_samples": int(test) if test else None}
if model == "transfer":
    body["image_size"] = int(size)
print(json.dumps(body))
' "${MODEL:-transfer}" "$dataset_id" "${EPOCHS:-3}" "${BATCH_SIZE:-32}" "${LEARNING_RATE:-0.001}" "${SEED:-42}" \
  "${IMAGE_SIZE:-96}" "${TRAIN_SAMPLES:-}" "${TEST_SAMPLES:-}" "$name")
job_id=$(submit_job "$body" | field id)
echo "job $job_id queued on dataset $dataset_id" >&2
job=$(wait_job "$job_id")
if [ "$(field status <<<"$job")" != "succeeded" ]; then
    python3 - "$job" <<'PY'
import json, sys

job = json.loads(sys.argv[1])
error = job.get("error") or {}
print(f"job {job['id']} {job['status']}: {error.get('type', '')}: {error.get('message', '')}", file=sys.stderr)
PY
    exit 1
fi
model_id=$(field model_id <<<"$job")
LC_ALL=C printf 'job %s succeeded: model %s, test accuracy %.4f\n' "$job_id" "$model_id" \
    "$(field metrics.test_accuracy <<<"$job")" >&2

# 5. Classify one image of the folder with the new model.
# (hidden files and folders are pruned; sed, unlike head, reads to the end so that sort never sees a broken pipe)
image=$(find "$dir" -mindepth 1 -name '.*' -prune -o -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \
    -o -iname '*.bmp' -o -iname '*.gif' -o -iname '*.webp' \) -print | LC_ALL=C sort | sed -n 1p)
if [ -z "$image" ]; then echo "$0: no image file under $dir to classify" >&2; exit 1; fi
prediction=$(api -X POST "$BASE_URL/v1/models/$model_id/predict?top_k=${TOP_K:-3}" -F "file=@$image")

model=$(api "$BASE_URL/v1/models/$model_id")

python3 - "$dataset_id" "$job" "$model" "$image" "$prediction" <<'PY'
import json, os, sys

dataset_id, image = sys.argv[1], sys.argv[4]
job, model, response = (json.loads(text) for text in (sys.argv[2], sys.argv[3], sys.argv[5]))
best = response["predictions"][0]
folder = os.path.basename(os.path.dirname(image))
print(f"{image} (in folder {folder!r}): {best['label']} ({best['probability']:.2f})", file=sys.stderr)
print(json.dumps({"dataset_id": dataset_id, "job_id": job["id"], "model_id": model["id"], "classes": model["classes"],
                  "test_accuracy": job["metrics"]["test_accuracy"], "image": image, "prediction": best}, indent=2))
PY
