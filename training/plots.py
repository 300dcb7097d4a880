"""PNG plots written by training: learning curves, the confusion matrix and the drift calibration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or in CI

import matplotlib.pyplot as plt
import numpy as np

from model.calibration import Calibration


def learning_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation loss/accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["val_accuracy"] for h in history], "o-", color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Validation accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path, title: str) -> np.ndarray:
    """Plot and return the confusion matrix (rows: true class, columns: predicted)."""
    k = len(classes)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    shown = np.log1p(cm)  # log colour scale so the few errors are visible beside the diagonal
    im = ax.imshow(shown, cmap="Blues")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                colour = "white" if shown[i, j] > shown.max() / 2 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=colour)
    ax.set(xticks=range(k), yticks=range(k), xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return cm


def calibration_plot(cal: Calibration, path: Path) -> None:
    """Per-layer thresholds and null medians against window size (log-log), and the whole-model threshold."""
    fig, (ax_l, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    ws = np.asarray(cal.window_sizes)
    for i, (name, thr) in enumerate(cal.layer_thresholds.items()):
        colour = f"C{i}"
        ax_l.plot(ws, thr, "o-", color=colour, label=f"{name} (q{cal.quantile:.2f})")
        if name in cal.null_score_median:
            ax_l.plot(ws, cal.null_score_median[name], "--", color=colour, alpha=0.6)
    ax_l.set(xscale="log", yscale="log", xlabel="window size W (images)", ylabel="drift score (mean KL)")
    ax_l.set_title("Layer thresholds (solid) and clean medians (dashed)")
    ax_l.legend(fontsize=7)
    ax_m.plot(ws, cal.model_thresholds, "o-", color="black")
    ax_m.axhline(1.0, color="grey", lw=0.8)
    ax_m.set(xscale="log", xlabel="window size W (images)", ylabel="max over layers of score / threshold")
    ax_m.set_title(f"Whole-model threshold (false alarms {100 * (1 - cal.quantile):.0f}%)")
    for ax in (ax_l, ax_m):
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
