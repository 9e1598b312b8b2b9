"""curves.png: accuracy and loss per epoch, train vs test, titled with the model kind and final test accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from worker.jobstore import EpochRecord


def plot_curves(history: Sequence[EpochRecord], kind: str, test_accuracy: float, path: Path,
                fine_tune_from: int | None = None) -> None:
    """Write a two-panel PNG; `fine_tune_from` (first fine-tuning epoch) draws a marker line."""
    # The object-oriented API with the Agg canvas: no pyplot global state, safe in any thread or process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r.epoch for r in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, train_key, test_key, label in ((ax_acc, "accuracy", "val_accuracy", "accuracy"),
                                           (ax_loss, "loss", "val_loss", "loss")):
        ax.plot(epochs, [getattr(r, train_key) for r in history], marker="o", label="train")
        ax.plot(epochs, [getattr(r, test_key) for r in history], marker="o", label="test")
        if fine_tune_from is not None:
            ax.axvline(fine_tune_from - 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{kind} model: final test accuracy {test_accuracy:.3f}")
    fig.tight_layout()
    fig.savefig(path, format="png")
