"""Encoding a batch's probabilities as predictions: ranked labels, in request order."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def rank_predictions(probs: np.ndarray, classes: list[str], k: int, with_probabilities: bool) -> list[dict[str, Any]]:
    """Predictions in request order: label, class_index, probability, top_k (and all probabilities)."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out: list[dict[str, Any]] = []
    for row, indices in zip(probs, order, strict=True):
        ranked = [{"label": _label(classes, int(i)), "class_index": int(i), "probability": round(float(row[i]), 6)}
                  for i in indices]
        prediction: dict[str, Any] = {**ranked[0], "top_k": ranked}
        if with_probabilities:
            prediction["probabilities"] = [round(float(p), 6) for p in row]
        out.append(prediction)
    return out


def _label(classes: list[str], index: int) -> str:
    return classes[index] if index < len(classes) else str(index)


def predict_body(model_id: str, predictions: list[dict[str, Any]]) -> bytes:
    """The JSON of `/v1` predict's answer (`service.schemas.PredictResponse`) for `rank_predictions`' output."""
    return json.dumps({"model_id": model_id, "predictions": predictions}, ensure_ascii=False,
                      separators=(",", ":"), allow_nan=False).encode()
