"""Per-class evaluation and confusion.png: the figures agree with scikit-learn's, the plot reads for 2..1000 classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import precision_recall_fscore_support

from worker.engine.evaluation import evaluate, most_confused, plot_confusion


@pytest.mark.parametrize("n_classes", [2, 3, 10, 57])
def test_scores_match_scikit_learn(n_classes: int) -> None:
    rng = np.random.default_rng(n_classes)
    y_true = rng.integers(0, n_classes, 400)
    y_pred = np.where(rng.random(400) < 0.6, y_true, rng.integers(0, n_classes, 400))
    classes = [f"c{i}" for i in range(n_classes)]
    result = evaluate(y_true, y_pred, classes)
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [c.class_ for c in result.per_class] == classes
    np.testing.assert_allclose([c.precision for c in result.per_class], precision, atol=1e-6)
    np.testing.assert_allclose([c.recall for c in result.per_class], recall, atol=1e-6)
    np.testing.assert_allclose([c.f1 for c in result.per_class], f1, atol=1e-6)
    assert [c.support for c in result.per_class] == support.tolist()
    present = support > 0
    assert result.macro_f1 == pytest.approx(float(f1[present].mean()), abs=1e-6)
    assert result.confusion_matrix == sk_confusion(y_true, y_pred, labels=labels).tolist()


def test_a_class_never_predicted_scores_zero_not_nan() -> None:
    result = evaluate(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), ["a", "b"])
    b = result.per_class[1]
    assert (b.precision, b.recall, b.f1, b.support) == (0.0, 0.0, 0.0, 2)
    assert result.macro_f1 == pytest.approx((2 * 0.5 * 1 / 1.5) / 2, abs=1e-6)


def test_the_metrics_serialise_with_the_api_field_name_class() -> None:
    result = evaluate(np.array([0, 1]), np.array([0, 1]), ["cat", "dog"])
    assert result.per_class[0].model_dump(mode="json") == {"class": "cat", "precision": 1.0, "recall": 1.0,
                                                           "f1": 1.0, "support": 1}


def test_most_confused_picks_the_classes_in_errors() -> None:
    matrix = np.diag([10] * 6)
    matrix[4, 2] = 7
    matrix[1, 4] = 3
    assert most_confused(matrix, 3) == [1, 2, 4]


@pytest.mark.parametrize("n_classes", [2, 10, 50, 300])
def test_confusion_png_is_written_for_any_class_count(tmp_path: Path, n_classes: int) -> None:
    rng = np.random.default_rng(1)
    y_true = rng.integers(0, n_classes, 2000)
    y_pred = np.where(rng.random(2000) < 0.5, y_true, rng.integers(0, n_classes, 2000))
    classes = [f"class-{i}" for i in range(n_classes)]
    path = tmp_path / "confusion.png"
    plot_confusion(evaluate(y_true, y_pred, classes), classes, path, "transfer")
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= 300
