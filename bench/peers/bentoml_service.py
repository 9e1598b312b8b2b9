"""The BentoML peer: the same `.tflite` under the same LiteRT, as a BentoML service (bench/side_by_side.py).

    cd bench/peers && .venvs/bentoml/bin/bentoml serve bentoml_service:Classifier --host 127.0.0.1 --port 8002

`POST /v1/models/latest/predict` takes the service's single-image upload (multipart part `file`; BentoML
decodes it to a `PIL.Image`, its own image type) and answers in the service's shape (`_peer.Model.answer`);
`/healthz` is BentoML's. `PEER_WORKERS` BentoML worker processes each hold the model; a sync API runs in
BentoML's thread pool, each thread with its own interpreter. With `PEER_MAX_BATCH` > 1 the API is batchable:
BentoML's adaptive batching (its CorkDispatcher) merges concurrent requests into one call of at most that
many images, within a `PEER_BATCH_WAIT_MS` latency budget; each request then gets the list of its own
predictions back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from PIL.Image import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _peer  # noqa: E402  (beside this file)

BATCHED = _peer.MAX_BATCH > 1


# No access log (a production setting, and the peer's cheaper choice: the service's uvicorn does log each request).
@bentoml.service(name="tl_peer", workers=_peer.WORKERS, traffic={"timeout": 60},
                 logging={"access": {"enabled": False}})
class Classifier:
    def __init__(self) -> None:
        self.model = _peer.Model()

    if BATCHED:
        @bentoml.api(route=_peer.PREDICT_PATH, batchable=True, max_batch_size=_peer.MAX_BATCH,
                     max_latency_ms=max(1, int(_peer.BATCH_WAIT_MS)))
        def predict(self, file: list[Image]) -> list[dict[str, Any]]:
            probs = self.model.run(np.stack([self.model.pixels(image) for image in file]))
            return self.model.rank(probs)
    else:
        @bentoml.api(route=_peer.PREDICT_PATH)
        def predict(self, file: Image) -> dict[str, Any]:
            return self.model.answer(self.model.run(self.model.pixels(file)[None]))
