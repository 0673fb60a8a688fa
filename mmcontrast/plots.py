"""Figures as PNG files: small functions, one per plot, drawn with matplotlib's Agg canvas.

Owns turning numbers into images. Uses ``matplotlib.figure.Figure`` with an Agg canvas directly
(no ``pyplot``), so it never opens a window or changes the caller's matplotlib backend. Does not
compute the numbers it draws: callers pass them in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MAX_ANNOTATED_CLASSES = 30  # above this, cell values are unreadable and left out


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def confusion_matrix_png(true_labels: Sequence[int], predicted: Sequence[int], classnames: Sequence[str],
                         path: str | Path, normalize: bool = True, title: str | None = None) -> Path:
    """Write the confusion matrix (rows: true class, columns: predicted) of integer labels as a PNG.

    With ``normalize`` each row is divided by its count (per-class recall on the diagonal). Returns the path.
    """
    n = len(classnames)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (np.asarray(true_labels, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    values = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1) if normalize else counts
    side = min(4 + 0.35 * n, 30)
    fig = _new_figure(side + 1.5, side)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), labels=classnames, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center")
    ax.set_yticks(range(n), labels=classnames)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or ("confusion matrix (row-normalised)" if normalize else "confusion matrix"))
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = values.max() / 2 if values.size else 0
        for (row, col), value in np.ndenumerate(values):
            text = f"{value:.2f}" if normalize else str(value)
            ax.text(col, row, text, ha="center", va="center", fontsize=8, color="white" if value > threshold else "black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
