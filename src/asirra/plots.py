"""The project's figures: training curves, confusion matrix, ROC, calibration and image grids.

Every function takes plain arrays or a file, writes one PNG and returns its path. Figures are built
with `matplotlib.figure.Figure` rather than pyplot, so no global figure state leaks between calls
(or threads), nothing needs closing, and no backend is chosen: a notebook keeps its inline plots.
Each PNG is written atomically: a half-written file is never left where a previous good one was.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score, roc_curve

from asirra.errors import DataError
from asirra.fileio import atomic_path
from asirra.labels import CLASS_NAMES

CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
DPI = 100


class MetricsFileError(DataError):
    """A metrics.csv that cannot be plotted (missing, empty, or without the expected columns)."""


def save_figure(fig: Figure, out: Path) -> Path:
    """Write `fig` as a PNG to `out` atomically."""
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(out)


# ---- training curves ------------------------------------------------------------------------


def read_metrics_csv(metrics_csv: Path) -> dict[str, np.ndarray]:
    """The curve columns of a metrics.csv as float arrays; empty cells become NaN."""
    path = Path(metrics_csv)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise MetricsFileError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MetricsFileError(f"{path}: cannot read ({exc})") from None
    if not rows:
        raise MetricsFileError(f"{path}: no rows (has training run at least one epoch?)")
    if "epoch" not in rows[0]:
        raise MetricsFileError(f"{path}: no 'epoch' column (found: {', '.join(rows[0])})")
    return {name: np.array([_to_float(row.get(name), path) for row in rows]) for name in CURVE_COLUMNS}


def _to_float(cell: str | None, path: Path) -> float:
    if cell is None or cell.strip() == "":
        return math.nan  # e.g. no validation split, or a column added in a later run
    try:
        return float(cell)
    except ValueError:
        raise MetricsFileError(f"{path}: not a number: {cell!r}") from None


def plot_curves(metrics_csv: Path, out: Path) -> Path:
    """Loss and accuracy per epoch, train vs validation, with the best validation-loss epoch marked."""
    columns = read_metrics_csv(metrics_csv)
    epoch = columns["epoch"]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, kind, label in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = columns[f"{split}_{kind}"]
            if np.isfinite(values).any():
                name = "train" if split == "train" else "validation"
                ax.plot(epoch, values, style, markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    val_loss = columns["val_loss"]
    if np.isfinite(val_loss).any():
        best = int(np.nanargmin(val_loss))
        for ax in (loss_ax, acc_ax):
            ax.axvline(epoch[best], color="grey", linestyle="--", linewidth=1,
                       label=f"best val loss (epoch {epoch[best]:g})")
        loss_ax.plot(epoch[best], val_loss[best], "*", color="black", markersize=12)
    for ax in (loss_ax, acc_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    loss_ax.set_title("loss")
    acc_ax.set_title("accuracy")
    return save_figure(fig, out)


# ---- classifier quality ---------------------------------------------------------------------


def plot_confusion(cm: np.ndarray, out: Path, class_names: Sequence[str] = CLASS_NAMES) -> Path:
    """A 2x2 confusion matrix (rows = true class, columns = predicted) with counts and row percentages."""
    cm = np.asarray(cm)
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix must be {len(class_names)}x{len(class_names)}, got shape {cm.shape}")
    row_totals = cm.sum(axis=1, keepdims=True)
    # Row percentages = per-class recall; a class absent from the data shows 0% rather than NaN.
    percent = np.divide(100.0 * cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    fig = Figure(figsize=(4.8, 4.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of true class")
    for (row, col), count in np.ndenumerate(cm):
        colour = "white" if percent[row, col] > 60 else "black"
        ax.text(col, row, f"{count:,}\n{percent[row, col]:.1f}%", ha="center", va="center", color=colour)
    ticks = range(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix (n={int(cm.sum()):,})")
    return save_figure(fig, out)


def plot_confusion_matrix(cm: np.ndarray, out: Path, class_names: Sequence[str]) -> Path:
    """An N x N confusion matrix (rows = true class, columns = predicted): counts, and row-normalised %.

    Two panels because they answer different questions: counts show where the images are, row
    percentages (per-class recall) show which classes are confused regardless of class size.
    """
    cm = np.asarray(cm)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix must be {n}x{n}, got shape {cm.shape}")
    row_totals = cm.sum(axis=1, keepdims=True)
    percent = np.divide(100.0 * cm, row_totals, out=np.zeros(cm.shape), where=row_totals > 0)
    side = max(4.0, 0.55 * n + 2.0)
    fig = Figure(figsize=(2 * side + 1.0, side), layout="constrained")
    count_ax, percent_ax = fig.subplots(1, 2)
    fontsize = 9 if n <= 10 else 6
    for ax, values, cmap, label, fmt, vmax in (
        (count_ax, cm, "Greens", "images", "{:,.0f}", max(1, int(cm.max()))),
        (percent_ax, percent, "Blues", "% of true class", "{:.0f}", 100),
    ):
        image = ax.imshow(values, cmap=cmap, vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, label=label, shrink=0.8)
        for (row, col), value in np.ndenumerate(values):
            if value:  # zeros left blank: a 10x10 grid of "0" hides the few cells that matter
                colour = "white" if value > 0.6 * vmax else "black"
                ax.text(col, row, fmt.format(value), ha="center", va="center", color=colour, fontsize=fontsize)
        ticks = range(n)
        ax.set_xticks(ticks, labels=class_names, rotation=90 if n > 6 else 0)
        ax.set_yticks(ticks, labels=class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    count_ax.set_title(f"counts (n={int(cm.sum()):,})")
    percent_ax.set_title("row-normalised (recall %)")
    return save_figure(fig, out)


def plot_roc(y_true, p_dog, out: Path, classes: Sequence[str] = CLASS_NAMES) -> Path:
    """ROC curve for class 1 ('dog') as the positive class, AUC in the legend.

    With only one class present the curve is undefined; the figure then says so instead of failing,
    so an evaluation of an all-cat folder still produces its full set of plots.
    """
    y_true, p_dog = np.asarray(y_true), np.asarray(p_dog, dtype=float)
    fig = Figure(figsize=(4.8, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="chance")
    if len(np.unique(y_true)) == 2:
        fpr, tpr, _ = roc_curve(y_true, p_dog)
        ax.plot(fpr, tpr, linewidth=2, label=f"model (AUC = {roc_auc_score(y_true, p_dog):.4f})")
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class present", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    negatives, positives = (_plural(c) for c in classes)
    ax.set_xlabel(f"false positive rate ({negatives} called {classes[1]})")
    ax.set_ylabel(f"true positive rate ({positives} called {classes[1]})")
    ax.set_title("ROC")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, out)


def plot_reliability(
    y_true,
    p_dog,
    out: Path,
    n_bins: int = 10,
    p_dog_after=None,
    labels: tuple[str, str] = ("model", "temperature-scaled"),
    classes: Sequence[str] = CLASS_NAMES,
) -> Path:
    """Calibration diagram: observed dog frequency vs mean predicted P(dog), per probability bin.

    `p_dog_after` adds a second series (e.g. after temperature scaling) for a before/after view. The
    lower panel shows how many images fall in each bin, since sparse bins make noisy points.
    """
    y_true = np.asarray(y_true)
    series = [(labels[0], np.asarray(p_dog, dtype=float))]
    if p_dog_after is not None:
        series.append((labels[1], np.asarray(p_dog_after, dtype=float)))
    fig, curve_ax, count_ax = _reliability_figure()
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for name, probs in series:
        observed, predicted = calibration_curve(y_true, probs, n_bins=n_bins, strategy="uniform")
        curve_ax.plot(predicted, observed, "-o", markersize=4, label=name)
        count_ax.hist(probs, bins=edges, histtype="step", linewidth=1.5, label=name)
    _finish_reliability_curve(curve_ax, f"observed fraction of {_plural(classes[1])}", "reliability diagram")
    count_ax.set_yscale("log")
    count_ax.set_xlabel(f"predicted P({classes[1]})")
    count_ax.set_ylabel("images")
    return save_figure(fig, out)


def _plural(name: str) -> str:
    """"cats" for the cat/dog classes; any other class named as itself ("class '7'")."""
    return f"{name}s" if name in CLASS_NAMES else f"class {name!r}"


def _reliability_figure():
    """(figure, curve axes with the diagonal drawn, count axes below): the layout both diagrams share."""
    fig = Figure(figsize=(5, 6), layout="constrained")
    curve_ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    curve_ax.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
    return fig, curve_ax, count_ax


def _finish_reliability_curve(ax, ylabel: str, title: str) -> None:
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def plot_confidence_reliability(bins: Sequence[dict], out: Path) -> Path:
    """Reliability of the top-1 call for N classes: accuracy vs mean confidence per bin, with image counts.

    `bins` are asirra.metrics.reliability's ({"low", "high", "count", "confidence", "accuracy"}); the
    diagram only draws them, so the plotted points are exactly the ECE's terms.
    """
    filled = [b for b in bins if b["count"]]
    fig, curve_ax, count_ax = _reliability_figure()
    curve_ax.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "-o", markersize=4,
                  label="model")
    count_ax.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["count"] for b in bins],
                 width=[b["high"] - b["low"] for b in bins], fill=False, edgecolor="C0")
    _finish_reliability_curve(curve_ax, "accuracy of the top-1 call", "reliability diagram (top-1 confidence)")
    if any(b["count"] for b in bins):
        count_ax.set_yscale("log")
    count_ax.set_xlabel("confidence (probability of the predicted class)")
    count_ax.set_ylabel("images")
    return save_figure(fig, out)


# ---- image grids ----------------------------------------------------------------------------


def mistake_titles(y_true, proba, classes: Sequence[str], indices: Sequence[int],
                   names: Sequence[str] | None = None) -> list[str]:
    """Captions for plot_image_grid naming both classes: "true: 7 / pred: 1 (0.93)".

    The number is the predicted class's probability; `names[i]`, if given, is a first line
    (e.g. the file name). The predicted class is the package's top-1 call (asirra.metrics.predictions).
    """
    from asirra.metrics import predictions

    proba = np.asarray(proba, dtype=float)
    y_true = np.asarray(y_true)
    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise ValueError(f"proba must be (n, {len(classes)}) for {len(classes)} classes, got shape {proba.shape}")
    titles = []
    calls = predictions(proba[list(indices)]) if len(indices) else []
    for i, predicted in zip(indices, calls):
        predicted = int(predicted)
        caption = f"true: {classes[int(y_true[i])]} / pred: {classes[predicted]} ({proba[i, predicted]:.2f})"
        titles.append(f"{names[i]}\n{caption}" if names is not None else caption)
    return titles


def plot_image_grid(
    images: Sequence[np.ndarray | Image.Image],
    titles: Sequence[str],
    out: Path,
    ncols: int = 6,
    title: str | None = None,
    colors: Sequence[str] | None = None,
) -> Path:
    """Images in a grid, each with its own (optionally coloured) caption.

    Used for worst mistakes, prediction sheets and data samples. An empty list gives a figure that
    says so, so "no mistakes" is a picture rather than a missing file.
    """
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles")
    if colors is not None and len(colors) != len(images):
        raise ValueError(f"{len(images)} images but {len(colors)} colours")
    if ncols < 1:
        raise ValueError(f"ncols must be at least 1, got {ncols}")
    ncols = max(1, min(ncols, len(images)))
    nrows = max(1, math.ceil(len(images) / ncols))
    fig = Figure(figsize=(2.3 * ncols, 2.5 * nrows + (0.4 if title else 0)), layout="constrained")
    if title:
        fig.suptitle(title)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if not images:
        axes[0].text(0.5, 0.5, "(no images)", ha="center", va="center", fontsize=14)
    for i, (ax, image, caption) in enumerate(zip(axes, images, titles)):
        ax.imshow(np.asarray(image))
        ax.set_title(caption, fontsize=8, color=colors[i] if colors is not None else "black")
    return save_figure(fig, out)
