#!/usr/bin/env bash
# Classify an image file (PNG, JPEG, BMP, GIF or WebP, any size) with a model; prints the predictions (JSON).
#   examples/predict.sh cat.png              # the model with alias `default`, else the newest one
#   examples/predict.sh cat.png latest       # MODEL_REF: a model id, an alias or `latest`
# Env: TOP_K (3)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
if [ $# -lt 1 ] || [ $# -gt 2 ]; then echo "usage: $0 IMAGE [MODEL_REF]" >&2; exit 2; fi
if [ ! -f "$1" ]; then echo "$0: no such file: $1" >&2; exit 2; fi

if [ $# -eq 2 ]; then url="$BASE_URL/v1/models/$2/predict"; else url="$BASE_URL/v1/predict"; fi
api -X POST "$url?top_k=${TOP_K:-3}" -F "file=@$1" | pretty
