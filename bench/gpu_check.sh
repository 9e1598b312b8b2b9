#!/usr/bin/env bash
# GPU check: on a machine with an NVIDIA GPU, build a fresh venv with tensorflow[and-cuda], then run both
# reference jobs (seed 42, 5000 train / 1000 test, 10 epochs, 96px) with the command line on the GPU, a second
# transfer job with the feature cache warm, and print wall times and test accuracies.
#
#   bench/gpu_check.sh                  # venv in .venv-gpu, data/weights from TL_DATA_DIR / TL_WEIGHTS_DIR or ../shared
#   VENV=/opt/venv SKIP_INSTALL=1 bench/gpu_check.sh   # reuse an existing environment
#
# Needs a network (or a pip mirror/wheelhouse via PIP_FIND_LINKS) for the install step; needs nvidia-smi.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv-gpu}"
PYTHON_BIN="${PYTHON_BIN:-python3}"
DATA_DIR="${TL_DATA_DIR:-$ROOT/../shared/data}"
WEIGHTS_DIR="${TL_WEIGHTS_DIR:-$ROOT/../shared/weights}"
OUT="${OUT:-$(mktemp -d -t tl-gpu-check-XXXXXX)}"
COMMON=(--train-samples 5000 --test-samples 1000 --epochs 10 --seed 42)

command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this check needs an NVIDIA GPU" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  "$PYTHON_BIN" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  # The project with its training extra, and TensorFlow's CUDA wheels (same version range as pyproject.toml).
  "$VENV/bin/pip" install --quiet -e "$ROOT[train]" "tensorflow[and-cuda]>=2.16,<2.22"
fi

"$VENV/bin/python" - <<'PY'
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("tensorflow", tf.__version__, "GPUs:", [g.name for g in gpus])
if not gpus:
    raise SystemExit("TensorFlow sees no GPU (driver / CUDA wheels?): not running the jobs")
PY

export TL_DATA_DIR="$DATA_DIR" TL_WEIGHTS_DIR="$WEIGHTS_DIR" TL_ALLOW_DOWNLOAD=false
cd "$ROOT"
run_job() {  # name, then worker.cli flags
  local name="$1"; shift
  local start end
  start=$(date +%s.%N)
  if ! "$VENV/bin/python" -m worker.cli "$@" "${COMMON[@]}" --output "$OUT/artifacts" \
      >"$OUT/$name.stdout" 2>"$OUT/$name.log"; then
    echo "$name failed; last lines of $OUT/$name.log:" >&2
    tail -n 30 "$OUT/$name.log" >&2
    exit 1
  fi
  end=$(date +%s.%N)
  tail -n 1 "$OUT/$name.stdout" >"$OUT/$name.json"
  "$VENV/bin/python" - "$name" "$OUT/$name.json" "$start" "$end" <<'PY'
import json, sys
name, path, start, end = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
m = json.load(open(path))
print(f"{name:<18} wall {end - start:7.1f} s  job {m['train_seconds']:7.1f} s  test accuracy {m['test_accuracy']:.4f}"
      f"  params {m['params_total']:,}  -> {m['model_dir']}")
PY
}

echo "results in $OUT"
run_job baseline --model baseline
run_job transfer_cold --model transfer
run_job transfer_warm --model transfer

"$VENV/bin/python" - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {name: json.loads((out / f"{name}.json").read_text()) for name in ("baseline", "transfer_cold", "transfer_warm")}
for name, row in rows.items():
    meta = json.loads((pathlib.Path(row["model_dir"]) / "metadata.json").read_text())
    row["timings"] = meta["timings"]
    row["gpus"] = meta["runtime"]["gpus"]
    row["tflite"] = meta["export"].get("passed")
    print(f"{name}: stages " + ", ".join(f"{k} {v:.1f}s" for k, v in meta["timings"].items())
          + f"; gpus used {row['gpus']}; tflite shipped {row['tflite']}")
gap = rows["transfer_cold"]["test_accuracy"] - rows["baseline"]["test_accuracy"]
print(f"transfer - baseline: {100 * gap:+.1f} points")
print(json.dumps(rows))
PY
