"""The LitServe peer: the same `.tflite` under the same LiteRT, behind LitServe (bench/side_by_side.py).

    bench/peers/.venvs/litserve/bin/python bench/peers/litserve_server.py --port 8001

`POST /v1/models/latest/predict` takes the service's single-image upload (multipart part `file`) and answers
in the service's shape (`_peer.Model.answer`); `/healthz` is LitServe's health check. LitServe's own
architecture: an API server process (uvicorn + FastAPI) reads the form and hands it through a queue to
`PEER_WORKERS` inference worker processes, each with its own interpreter, which run decode_request, predict
and encode_response. With `PEER_MAX_BATCH` > 1 a worker gathers up to that many requests, waiting at most
`PEER_BATCH_WAIT_MS`, and runs them as one batch (LitServe's `max_batch_size` / `batch_timeout`).
`PEER_FAST_QUEUE=1` is LitServe's `fast_queue` (ZeroMQ instead of multiprocessing queues).
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation as a class (a string
# `Request` makes it queue the whole request object, which cannot be pickled).
import argparse
import sys
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi import Request

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402  (beside this file)


class Classifier(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = _peer.Model()

    def decode_request(self, request: Request) -> np.ndarray:
        return self.model.decode(request["file"].file.read())  # the form LitServe read: an UploadFile

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.run(x if x.ndim == 4 else x[None])

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output[:, None])

    def encode_response(self, output: np.ndarray) -> dict[str, Any]:
        return self.model.answer(output)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    batching: dict[str, Any] = {}
    if _peer.MAX_BATCH > 1:
        batching = {"max_batch_size": _peer.MAX_BATCH, "batch_timeout": _peer.BATCH_WAIT_MS / 1000}
    api = Classifier(api_path=_peer.PREDICT_PATH, **batching)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=_peer.WORKERS,
                          healthcheck_path="/healthz", timeout=60,
                          fast_queue=_peer.FAST_QUEUE)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
