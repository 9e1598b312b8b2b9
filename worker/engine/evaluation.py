"""Evaluation on the test subset, for every job: per-class precision, recall, F1 and support, macro F1, the
confusion matrix, and `confusion.png`.

The figures are computed with NumPy from the predicted classes (the same predictions the test accuracy
comes from); only the plot needs matplotlib.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.jobstore import ClassMetrics

#: Up to this many classes the whole matrix is drawn; beyond, the most-confused classes only.
FULL_MATRIX_MAX_CLASSES = 50
#: How many classes the reduced plot shows.
MOST_CONFUSED_CLASSES = 30


@dataclass(frozen=True)
class Evaluation:
    """Scores of one model on its test subset."""

    per_class: list[ClassMetrics]
    macro_f1: float
    confusion_matrix: list[list[int]]


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, row = true class, column = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> Evaluation:
    """Per-class precision/recall/F1 (0 where undefined, as scikit-learn's `zero_division=0`) and macro F1."""
    matrix = confusion_matrix(y_true, y_pred, len(classes))
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    support = matrix.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positive / predicted, 0.0)
        recall = np.where(support > 0, true_positive / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = [ClassMetrics(class_=name, precision=round(float(p), 6), recall=round(float(r), 6),
                              f1=round(float(f), 6), support=int(s))
                 for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)]
    present = support > 0  # a class with no test image has no F1 to average
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    return Evaluation(per_class=per_class, macro_f1=round(macro_f1, 6), confusion_matrix=matrix.tolist())


def most_confused(matrix: np.ndarray, count: int) -> list[int]:
    """Indices of the `count` classes most involved in errors (off-diagonal counts as true or predicted class)."""
    errors = matrix - np.diag(np.diag(matrix))
    involvement = errors.sum(axis=0) + errors.sum(axis=1)
    order = np.argsort(-involvement, kind="stable")[:count]
    return sorted(int(i) for i in order)


def plot_confusion(evaluation: Evaluation, classes: Sequence[str], path: Path, title: str) -> None:
    """Write the confusion matrix as a labelled heat map (row-normalised colours, counts written in cells)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = np.asarray(evaluation.confusion_matrix)
    shown = list(range(len(classes)))
    note = ""
    if len(classes) > FULL_MATRIX_MAX_CLASSES:
        shown = most_confused(matrix, MOST_CONFUSED_CLASSES)
        note = f" ({len(shown)} most-confused of {len(classes)} classes)"
    sub = matrix[np.ix_(shown, shown)]
    labels = [str(classes[i]) for i in shown]
    n = len(shown)
    side = min(max(4.0, 0.45 * n + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.5, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    rows = sub.sum(axis=1, keepdims=True)
    normalised = np.divide(sub, rows, out=np.zeros(sub.shape, dtype=np.float64), where=rows > 0)
    image = ax.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=labels, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center",
                  fontsize=max(5, 10 - n // 10))
    ax.set_yticks(range(n), labels=labels, fontsize=max(5, 10 - n // 10))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if sub[i, j]:
                    ax.text(j, i, str(sub[i, j]), ha="center", va="center", fontsize=max(5, 9 - n // 6),
                            color="white" if normalised[i, j] > 0.5 else "black")
    ax.set_title(f"{title}: macro F1 {evaluation.macro_f1:.3f}{note}")
    fig.tight_layout()
    fig.savefig(path, format="png")
