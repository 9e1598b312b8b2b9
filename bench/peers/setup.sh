#!/usr/bin/env bash
# One virtual environment per peer server for bench/side_by_side.py, under bench/peers/.venvs/ (git-ignored):
#
#     bench/peers/setup.sh            # both: .venvs/bentoml and .venvs/litserve
#     bench/peers/setup.sh litserve   # one of them
#
# Each venv gets its framework (BENTOML_VERSION / LITSERVE_VERSION, pinned below) plus exactly the
# ai-edge-litert, numpy and pillow versions installed in the service's own .venv (read from it), so every
# server runs the same LiteRT over the same .tflite and decodes with the same Pillow. The venvs use the
# service's Python interpreter and the uv that `make install` puts into .venv. Re-running reinstalls the pins
# (a no-op when they are already there).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=$root/.venv/bin/python
uv=$root/.venv/bin/uv
BENTOML_VERSION=${BENTOML_VERSION:-1.4.40}
LITSERVE_VERSION=${LITSERVE_VERSION:-0.2.19}

if [[ ! -x $python || ! -x $uv ]]; then
    echo "setup.sh: $root/.venv (with uv) is missing: run 'make install' first" >&2
    exit 1
fi
# The service's own versions of what both sides share (the runtime, the arrays, the decoder).
shared_pins=$("$python" - <<'PY'
import importlib.metadata as metadata

print(" ".join(f"{name}=={metadata.version(name)}" for name in ("ai-edge-litert", "numpy", "pillow")))
PY
)

peers=("$@")
[[ ${#peers[@]} -gt 0 ]] || peers=(bentoml litserve)
for peer in "${peers[@]}"; do
    case $peer in
        bentoml) framework="bentoml==$BENTOML_VERSION" ;;
        # python-multipart: FastAPI's form parser, which LitServe's multipart uploads need.
        litserve) framework="litserve==$LITSERVE_VERSION python-multipart" ;;
        *) echo "setup.sh: unknown peer '$peer' (bentoml or litserve)" >&2; exit 2 ;;
    esac
    venv=$here/.venvs/$peer
    echo "== $peer: $venv ($framework $shared_pins)"
    [[ -x $venv/bin/python ]] || "$uv" venv --quiet --python "$python" "$venv"
    # shellcheck disable=SC2086  # the pin lists are meant to split into arguments
    "$uv" pip install --quiet --python "$venv/bin/python" $framework $shared_pins
    "$venv/bin/python" - "$peer" <<'PY'
import importlib.metadata as metadata
import sys

names = (sys.argv[1], "ai-edge-litert", "numpy", "pillow")
print("   installed:", ", ".join(f"{name} {metadata.version(name)}" for name in names))
PY
done
