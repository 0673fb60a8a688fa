"""Figures as PNG files: small functions, one per plot, drawn with matplotlib's Agg canvas.

Owns turning numbers into images. Uses ``matplotlib.figure.Figure`` with an Agg canvas directly
(no ``pyplot``), so it never opens a window or changes the caller's matplotlib backend. Does not
compute the numbers it draws: callers pass them in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MAX_ANNOTATED_CLASSES = 30  # above this, cell values are unreadable and left out
LOG_AXIS_SPAN = 10.0

# Panels of the training-curves figure: (title, y-axis scale, [(metrics.jsonl key, legend label)]).
# A panel is drawn when at least one of its keys is in the records; ``eval/*`` keys join the last panel.
# A "log" axis is used only when the values span at least LOG_AXIS_SPAN (a learned temperature can).
RUN_PANELS = (
    ("loss", "linear", [("loss", "train loss"), ("val/loss", "val loss (held-out pairs)")]),
    ("temperature", "log", [("temperature", "1 / logit_scale")]),
    ("learning rate", "linear", [("lr", "lr")]),
    ("throughput (samples/s)", "linear", [("samples_per_s", "samples/s")]),
    ("alignment / uniformity", "linear", [("health/alignment", "alignment (↓)"), ("health/uniformity", "uniformity (↓)")]),
    ("effective rank", "linear", [("health/effective_rank", "pooled"), ("health/image_effective_rank", "image"),
                                  ("health/text_effective_rank", "text")]),
    ("embedding std (healthy ≈ 1/√d)", "linear", [("embedding_std", "step batch"), ("health/embedding_std", "fixed batch"),
                                                   ("health/image_embedding_std", "image"), ("health/text_embedding_std", "text")]),
    ("modality gap", "linear", [("health/modality_gap", "‖mean image − mean text‖")]),
    ("positive accuracy", "linear", [("positive_accuracy", "step batch"), ("health/positive_accuracy", "fixed batch")]),
    ("validation retrieval", "linear", [("val/image_to_text_R@1", "image→text R@1"), ("val/text_to_image_R@1", "text→image R@1"),
                                        ("val/image_to_text_R@5", "image→text R@5"), ("val/text_to_image_R@5", "text→image R@5"),
                                        ("val/view1_to_view2_R@1", "view→view R@1")]),
    ("eval accuracy", "linear", []),
)
# Reference levels drawn as dashed lines: panel → [(metrics.jsonl key, label)]. Guessing's loss and positive
# accuracy: a run at chance plots a loss that, auto-scaled, seems to fall; beside this line it does not.
PANEL_REFERENCES = {
    "loss": [("health/chance_loss", "chance (guessing)")],
    "positive accuracy": [("health/chance_positive_accuracy", "chance")],
    "effective rank": [("health/collapse_rank", "collapse threshold")],
}


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` at ``path`` (parent folders made): PNG, or the format its suffix names (.svg, .pdf). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower().lstrip(".")
    fig.savefig(path, format=suffix if suffix in fig.canvas.get_supported_filetypes() else "png")
    return path


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
    return _save(fig, path)


def _series(records: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that have a finite number under ``key``."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r and np.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def run_curves_png(records: Sequence[Mapping], path: str | Path, title: str | None = None) -> Path:
    """Write one PNG of a run's metrics (``metrics.jsonl`` rows, each with ``step``) against step.

    One panel per entry of ``RUN_PANELS`` whose keys appear; ``eval/*`` keys go to the eval panel.
    Returns the path. Raises ValueError when no panel has data.
    """
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/")})
    panels = []
    for name, scale, lines in RUN_PANELS:
        lines = list(lines) + ([(k, k.removeprefix("eval/")) for k in eval_keys] if name == "eval accuracy" else [])
        series = [(label, *_series(records, key)) for key, label in lines]
        series = [s for s in series if s[1]]
        if series:
            panels.append((name, scale, series))
    if not panels:
        raise ValueError("no plottable metrics in the records")
    cols = min(4 if len(panels) > 9 else 3, len(panels))
    rows = -(-len(panels) // cols)
    fig = _new_figure(3.6 * cols, 2.5 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, scale, series) in zip(axes, panels):
        for label, steps, values in series:
            ax.plot(steps, values, label=label, marker="o" if len(steps) < 30 else None, markersize=3)
        references = [(label, *_series(records, key)) for key, label in PANEL_REFERENCES.get(name, [])]
        for label, steps, values in (r for r in references if r[1]):
            ax.plot(steps, values, label=label, linestyle="--", color="0.4", linewidth=1)
            series = [*series, (label, steps, values)]
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        values = [v for _, _, vs in series for v in vs]
        if scale == "log" and min(values) > 0 and max(values) >= LOG_AXIS_SPAN * min(values):
            ax.set_yscale("log")
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


# Label-efficiency curves: the checkpoint's probe first and in colour, baselines after it.
FEW_SHOT_LABELS = {
    "checkpoint": "checkpoint, logistic probe", "checkpoint_ncm": "checkpoint, nearest class mean",
    "text_init": "checkpoint, text-initialised head", "random_init": "same architecture, random init",
    "pixels": "raw pixels",
}


def few_shot_png(curves: Mapping[str, Sequence[Mapping]], path: str | Path, chance: float | None = None,
                 title: str | None = None) -> Path:
    """Accuracy against labelled images per class (log x axis), a line and a ±1 std band per curve.

    ``curves`` as ``fewshot.label_efficiency`` returns them; a ``zero_shot`` curve (k = 0) is drawn as a
    horizontal dashed line, and ``chance`` as a dotted one. Returns the path.
    """
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    shots = sorted({p["shots"] for points in curves.values() for p in points if p["shots"] > 0})
    for name, points in curves.items():
        points = [p for p in points if p["shots"] > 0]
        if not points:
            continue
        x = np.array([p["shots"] for p in points])
        mean, std = np.array([p["mean"] for p in points]), np.array([p["std"] for p in points])
        dashed = name in ("random_init", "pixels")
        line = ax.plot(x, mean, marker="o", markersize=4, linestyle="--" if dashed else "-", label=FEW_SHOT_LABELS.get(name, name))
        ax.fill_between(x, mean - std, mean + std, alpha=0.15, color=line[0].get_color())
    for point in curves.get("zero_shot", []):
        ax.axhline(point["mean"], linestyle="--", color="0.3", linewidth=1, label=f"zero-shot ({point['mean']:.1%})")
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="0.5", linewidth=1, label=f"chance ({chance:.1%})")
    ax.set_xscale("log")
    ax.set_xticks(shots, labels=[str(k) for k in shots])
    _finish_axes(ax, "labelled images per class", "test accuracy", title or "label efficiency", legend_size=8, legend_loc="lower right")
    return _save(fig, path)


def _finish_axes(ax, xlabel: str, ylabel: str, title: str, legend_size: int, legend_loc: str) -> None:
    """Labels, a light grid, the legend and the title of a one-panel figure."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size, loc=legend_loc)
    ax.set_title(title, fontsize=11)


def _sweep_series(rows: Sequence[Mapping]) -> dict[str, list[float]]:
    """Each evaluation of a WiSE-FT sweep as one number per alpha: zero-shot top-1, retrieval's mean R@1 of both
    directions; then the mean zero-shot top-1 when there is one."""
    series: dict[str, list[float]] = {}
    for key in [k for k in rows[0] if "=" in k]:
        kind, _, target = key.partition("=")
        label = f"{kind} {'/'.join(Path(target).parts[-2:])}"  # the folder and its parent name a data set well enough
        if "top1" in rows[0][key]:
            series[f"{label} top-1"] = [row[key]["top1"] for row in rows]
        else:
            series[f"{label} R@1"] = [(row[key]["image_to_text"]["R@1"] + row[key]["text_to_image"]["R@1"]) / 2 for row in rows]
    if "mean_zero_shot_top1" in rows[0]:
        series["mean zero-shot top-1"] = [row["mean_zero_shot_top1"] for row in rows]
    return series


def wise_ft_png(rows: Sequence[Mapping], path: str | Path, title: str | None = None) -> Path:
    """A WiSE-FT sweep (``wiseft.sweep``'s rows): each evaluation against the mixing coefficient alpha (0: the
    zero-shot model, 1: the fine-tuned one), the mean zero-shot top-1 in bold with its best alpha marked. Returns
    the path."""
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot()
    alphas = [row["alpha"] for row in rows]
    for label, values in _sweep_series(rows).items():
        mean = label == "mean zero-shot top-1"
        line = ax.plot(alphas, values, marker="o", markersize=4, linewidth=2.5 if mean else 1.2, color="black" if mean else None,
                       label=label)
        if mean:
            best = int(np.argmax(values))
            ax.axvline(alphas[best], linestyle=":", color=line[0].get_color(), linewidth=1)
            ax.annotate(f"best α = {alphas[best]:g}: {values[best]:.1%}", (alphas[best], values[best]), textcoords="offset points",
                        xytext=(6, 6), fontsize=8)
    _finish_axes(ax, "α   (0: zero-shot model, 1: fine-tuned model)", "accuracy / recall", title or "WiSE-FT: (1 − α)·θ₀ + α·θ₁",
                 legend_size=7, legend_loc="best")
    return _save(fig, path)
