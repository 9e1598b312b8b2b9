"""The KServe SDK's own REST client (`kserve.InferenceRESTClient`) against this service, in a venv of its own.

    python3.11 -m venv /tmp/kserve-venv && /tmp/kserve-venv/bin/pip install kserve==0.21.0
    .venv/bin/python bench/kserve_sdk.py --venv /tmp/kserve-venv [--model-dir artifacts/models/m_...]

kserve pins protobuf < 7 and psutil < 6, which the project's lock (TensorFlow's protobuf) does not allow, so
the SDK cannot live in `.venv` and this check is not part of `make test`. It starts the real stack with a
trained model and has the SDK ask, with protocol "v2" (the Open Inference Protocol): server live and ready,
model ready, infer with a binary UINT8 tensor, with a JSON tensor and with a plain dict; then with protocol
"v1" (TF Serving's `:predict`) on the same 8 CIFAR-10 test images. Every answer is compared with `/v1` predict.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import numpy as np
from _common import ensure_model, png, print_table, start_stack, test_images

CLIENT = Path(__file__).resolve().parent / "kserve_sdk" / "client.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", required=True, help="a virtual environment with kserve installed")
    parser.add_argument("--model-dir", help="a trained model directory (else one is trained now)")
    args = parser.parse_args()
    from tests.integration.harness import API_KEY

    with tempfile.TemporaryDirectory(prefix="tl-kserve-") as tmp:
        model = ensure_model(args.model_dir, Path(tmp))
        images, _ = test_images(8, seed=11)
        np.save(Path(tmp) / "images.npy", images)
        stack = start_stack(models=[model])
        try:
            with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=60) as client:
                v1 = client.post(f"/v1/models/{model.name}/predict", params={"probabilities": "true"},
                                 files=[("file", (f"{i}.png", png(x), "image/png")) for i, x in enumerate(images)])
                v1.raise_for_status()
            run = subprocess.run([str(Path(args.venv) / "bin" / "python"), str(CLIENT), stack.base_url, model.name,
                                  API_KEY, str(Path(tmp) / "images.npy")], capture_output=True, text=True, timeout=120)
        finally:
            stack.stop()
    if run.returncode != 0:
        sys.exit(f"the KServe client failed:\n{run.stderr[-3000:]}")
    out = json.loads(run.stdout)
    probs = np.array([p["probabilities"] for p in v1.json()["predictions"]])
    labels = [p["label"] for p in v1.json()["predictions"]]
    rows = [["server live / ready, model ready", f"{out['server_live']} / {out['server_ready']} / {out['model_ready']}",
             ""]]
    for name in ("v2_binary", "v2_json"):
        got = np.array(out[name]["probabilities"])
        rows.append([f"v2 infer ({name[3:]} tensor)", f"max |p - /v1 p| {np.abs(got - probs).max():.1e}",
                     "labels equal" if out[name]["label"] == labels else f"labels differ: {out[name]['label']}"])
    rows.append(["v2 infer (dict request)", f"first output {out['v2_dict']}", ""])
    got = np.array(out["v1_predictions"])
    rows.append(["v1 (TF Serving :predict)", f"max |p - /v1 p| {np.abs(got - probs).max():.1e}", ""])
    print_table("KServe SDK InferenceRESTClient against this service", ["call", "result", ""], rows)


if __name__ == "__main__":
    main()
