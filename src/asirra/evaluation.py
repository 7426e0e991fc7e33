"""How good a classifier is, from its predictions: metrics, CAPTCHA solve rate, calibration, the report.

A binary model (asirra.labels.is_binary: two classes) is scored on two arrays, `y_true` (0 or 1)
and `p_dog` (the predicted probability of class 1, DOG for the cat/dog model), so the figures are
independent of how the predictions were made: accuracy, log loss, AUC, Brier, ROC and reliability;
the cat/dog model adds the CAPTCHA's challenge solve rate. A model of N >= 3 classes is scored by
asirra.metrics on (n, N) probabilities: top-1/top-k accuracy, per-class precision/recall/F1,
macro-F1, log loss, reliability. The generic metrics live there; this module adds the binary
figures and writes the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from asirra import plots
from asirra.calibration import THRESHOLD, InvalidPredictions, as_1d, check_labels, predicted_index, predicted_labels
from asirra.captcha.challenge import CHALLENGE_SIZE, SIMULATED_CHALLENGES
from asirra.fileio import write_json_atomic
from asirra.labels import CAT, CLASS_NAMES, DOG, is_binary, is_cat_dog
from asirra.metrics import log_loss, mistake_order, multiclass_metrics  # log_loss: one home, re-exported here
from asirra.stats import sample_subsets, wilson_interval

# ---- inputs ---------------------------------------------------------------------------------


def check_predictions(y_true, p_dog) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: labels -> int array of 0/1, probabilities -> float64 array in [0, 1]."""
    y = check_labels(y_true)
    p = as_1d(p_dog, "p_dog").astype(np.float64)
    if len(y) != len(p):
        raise InvalidPredictions(f"y_true has {len(y)} labels but p_dog has {len(p)} probabilities")
    if not np.isfinite(p).all():
        raise InvalidPredictions(f"p_dog has {int((~np.isfinite(p)).sum())} non-finite values (NaN or inf)")
    if p.min() < 0 or p.max() > 1:
        raise InvalidPredictions(f"p_dog must be probabilities in [0, 1]; found range [{p.min():g}, {p.max():g}]")
    return y, p


# ---- metrics --------------------------------------------------------------------------------


def classification_metrics(y_true, p_dog, threshold: float = THRESHOLD, classes=CLASS_NAMES) -> dict:
    """Accuracy, log loss, AUC, Brier score, confusion matrix and per-class accuracy of a binary model.

    `confusion` is [[cat->cat, cat->dog], [dog->cat, dog->dog]] (rows true, columns predicted; any
    binary model's `classes` in their place). `auc` is None, and a per-class accuracy is None, when
    that class is absent from y_true.
    """
    y, p = check_predictions(y_true, p_dog)
    if not 0.0 <= threshold <= 1.0:
        raise InvalidPredictions(f"threshold must be in [0, 1], got {threshold}")
    predicted = predicted_labels(p, threshold)
    cm = confusion_matrix(y, predicted, labels=[CAT, DOG])
    per_class = {
        name: (float(cm[label, label] / cm[label].sum()) if cm[label].sum() else None)
        for label, name in ((CAT, str(classes[CAT])), (DOG, str(classes[DOG])))
    }
    return {
        "n": int(len(y)),
        "threshold": float(threshold),
        "accuracy": float(np.mean(predicted == y)),
        "log_loss": log_loss(y, p),
        "auc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None,
        "brier": float(np.mean((p - y) ** 2)),
        "confusion": cm.tolist(),
        "per_class_accuracy": per_class,
    }


def challenge_solve_rate(
    y_true, p_dog, n_challenges: int = 1000, size: int = CHALLENGE_SIZE, seed: int = 0, threshold: float = THRESHOLD
) -> dict:
    """How often the classifier would pass random Asirra challenges drawn from the evaluated images.

    A challenge is `size` distinct images; it is solved iff the predicted cat set equals the true
    cat set, i.e. every image in it is classified correctly. Returns the empirical rate with its
    Wilson 95% interval, the independent-images approximation accuracy**size (`p12`), and the exact
    rate for draws from this finite pool (`exact_solve_rate`), which the simulation estimates.
    """
    y, p = check_predictions(y_true, p_dog)
    if size < 1 or size > len(y):
        raise InvalidPredictions(f"challenge size must be between 1 and the {len(y)} evaluated images, got {size}")
    if n_challenges < 1:
        raise InvalidPredictions(f"n_challenges must be at least 1, got {n_challenges}")
    correct = predicted_labels(p, threshold) == y
    indices = sample_subsets(np.random.default_rng(seed), len(y), size, n_challenges)
    solved = int(correct[indices].all(axis=1).sum())
    low, high = wilson_interval(solved, n_challenges)
    n_correct = int(correct.sum())
    return {
        "challenge_solve_rate": solved / n_challenges,
        "challenges": n_challenges,
        "challenges_solved": solved,
        "challenge_size": size,
        "ci_low": low,
        "ci_high": high,
        "p12": float(correct.mean()) ** size,
        "exact_solve_rate": math.comb(n_correct, size) / math.comb(len(y), size),
    }


def worst_mistakes(y_true, p_dog, k: int = 24, threshold: float = THRESHOLD) -> np.ndarray:
    """Indices of up to `k` misclassified images, most confidently wrong first: metrics.mistake_order
    on P(dog), with the calls made at `threshold`."""
    y, p = check_predictions(y_true, p_dog)
    return mistake_order(y, p, k, predicted=predicted_labels(p, threshold))


# ---- reports --------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """Everything `asirra evaluate` reports. `info` holds context such as the model name and data."""

    metrics: dict
    challenge: dict
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """One flat, JSON-serialisable dict: info, then classification metrics, then challenge results."""
        return {**self.info, **self.metrics, **self.challenge}


def evaluate_predictions(
    y_true, p_dog, threshold: float = THRESHOLD, n_challenges: int = SIMULATED_CHALLENGES, seed: int = 0, info: dict | None = None,
    classes: Sequence[str] = CLASS_NAMES,
) -> EvaluationReport:
    """Classification metrics of one set of binary predictions, and for the cat/dog model the challenge solve rate.

    With fewer images than one challenge holds there is nothing to draw challenges from: the solve
    rate is then None, while `p12` (accuracy**12) still estimates it.
    """
    metrics = classification_metrics(y_true, p_dog, threshold, classes=classes)
    if not is_cat_dog(classes):
        challenge = {}  # a CAPTCHA asks about one class of a cat/dog pool (see `asirra attack --target`)
    elif metrics["n"] >= CHALLENGE_SIZE:
        challenge = challenge_solve_rate(y_true, p_dog, n_challenges=n_challenges, seed=seed, threshold=threshold)
    else:
        challenge = {"challenge_solve_rate": None, "challenges": 0, "ci_low": None, "ci_high": None,
                     "p12": metrics["accuracy"] ** CHALLENGE_SIZE}
    return EvaluationReport(metrics=metrics, challenge=challenge, info=dict(info or {}))


def write_evaluation(
    report: EvaluationReport,
    y_true,
    p_dog,
    images_for_mistakes: Callable[[list[int]], list[np.ndarray]],
    names: Sequence[str],
    out_dir: Path,
    k_mistakes: int = 24,
    p_dog_calibrated=None,
    mistakes_note: str = "",
    classes: Sequence[str] = CLASS_NAMES,
) -> dict[str, Path]:
    """Write metrics.json, confusion.png, roc.png, reliability.png and mistakes.png of a binary model into `out_dir`.

    `images_for_mistakes(indices)` returns the pictures of those evaluated images (only the worst
    mistakes are ever loaded); `names[i]` is image i's file name. `p_dog_calibrated`, if given, is
    drawn as a second series on the reliability diagram.
    """
    y, p = check_predictions(y_true, p_dog)
    if len(names) != len(y):
        raise InvalidPredictions(f"{len(names)} names for {len(y)} predictions")
    out_dir = Path(out_dir)
    threshold = report.metrics.get("threshold", THRESHOLD)
    mistakes = worst_mistakes(y, p, k=k_mistakes, threshold=threshold).tolist()
    return {
        "metrics": write_json_atomic(out_dir / "metrics.json", report.to_json()),
        "confusion": plots.plot_confusion(np.array(report.metrics["confusion"]), out_dir / "confusion.png",
                                          class_names=tuple(classes)),
        "roc": plots.plot_roc(y, p, out_dir / "roc.png", classes=classes),
        "reliability": plots.plot_reliability(y, p, out_dir / "reliability.png", p_dog_after=p_dog_calibrated,
                                              classes=classes),
        "mistakes": plots.plot_image_grid(
            images_for_mistakes(mistakes),
            [f"{names[i]}  P({classes[1]})={p[i]:.2f}" for i in mistakes],
            out_dir / "mistakes.png",
            colors=["red"] * len(mistakes),
            title=(f"{len(mistakes)} most confident mistakes" if mistakes else "no mistakes") + mistakes_note,
        ),
    }


def top_ks(n_classes: int) -> tuple[int, ...]:
    """The top-k accuracies reported for N classes: top-1, top-3 and top-5 (ImageNet's), each capped at
    k = N - 1 (k = N is 1.0 by definition and tells nothing): 10 classes get 1, 3, 5; 3 classes 1, 2."""
    return (1,) if n_classes < 3 else tuple(sorted({1, min(3, n_classes - 1), min(5, n_classes - 1)}))


def evaluate_classes(y_true, proba, classes: Sequence[str], info: dict | None = None) -> EvaluationReport:
    """The report of any model other than cat/dog: asirra.metrics.multiclass_metrics on (n, N) probabilities.

    There is no challenge solve rate: a CAPTCHA asks about one class (see `asirra attack --target`).
    """
    metrics = multiclass_metrics(y_true, proba, classes, top_k=top_ks(len(classes)))
    return EvaluationReport(metrics=metrics, challenge={}, info=dict(info or {}))


def write_class_evaluation(
    report: EvaluationReport,
    y_true,
    proba,
    classes: Sequence[str],
    images_for_mistakes: Callable[[list[int]], list[np.ndarray]],
    names: Sequence[str],
    out_dir: Path,
    k_mistakes: int = 24,
    mistakes_note: str = "",
) -> dict[str, Path]:
    """metrics.json, confusion.png (N x N), reliability.png (top-1 confidence) and mistakes.png (each titled
    with its true and predicted class) into `out_dir`; the arguments are write_evaluation's."""
    from asirra.metrics import check_multiclass

    y, p = check_multiclass(y_true, proba, classes)
    if len(names) != len(y):
        raise InvalidPredictions(f"{len(names)} names for {len(y)} predictions")
    out_dir = Path(out_dir)
    mistakes = mistake_order(y, p, k=k_mistakes).tolist()
    return {
        "metrics": write_json_atomic(out_dir / "metrics.json", report.to_json()),
        "confusion": plots.plot_confusion_matrix(np.array(report.metrics["confusion"]), out_dir / "confusion.png",
                                                 list(classes)),
        "reliability": plots.plot_confidence_reliability(report.metrics["reliability_bins"], out_dir / "reliability.png"),
        "mistakes": plots.plot_image_grid(
            images_for_mistakes(mistakes),
            plots.mistake_titles(y, p, classes, mistakes, names=names),
            out_dir / "mistakes.png",
            colors=["red"] * len(mistakes),
            title=(f"{len(mistakes)} most confident mistakes" if mistakes else "no mistakes") + mistakes_note,
        ),
    }


# ---- the pipeline ---------------------------------------------------------------------------


@dataclass
class Evaluation:
    report: EvaluationReport
    predictions: object  # asirra.predict.Predictions: the scored refs, P(dog), logits and the unusable files
    files: dict[str, Path]


def summary_lines(metrics: dict, files: dict[str, Path]) -> list[str]:
    """An evaluation in a few lines of text (what `asirra evaluate` prints): the headline figures of its
    flat metrics (`EvaluationReport.to_json()`), then the files written."""
    r = metrics
    if "top_k_accuracy" in r:  # N classes
        top = "  ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in r["top_k_accuracy"].items())
        lines = [f"{r['n']} images, {len(r['classes'])} classes  {top}  macro-F1 {r['macro_f1']:.4f}  "
                 f"log loss {r['log_loss']:.4f}  ECE {r['ece']:.4f}"]
    else:
        auc = "n/a (one class)" if r["auc"] is None else f"{r['auc']:.4f}"
        lines = [f"{r['n']} images  accuracy {r['accuracy']:.4f}  log loss {r['log_loss']:.4f}  AUC {auc}"]
        if r.get("challenge_solve_rate") is not None:
            lines.append(f"12-image challenges solved: {r['challenge_solve_rate']:.4f} "
                         f"(95% CI {r['ci_low']:.4f}-{r['ci_high']:.4f}; p^12 = {r['p12']:.4f})")
    return lines + [f"{name}: {file}" for name, file in files.items()]


def evaluate_data(classifier, data: str | Path | None, out_dir: Path, *, split: str | Path | None = None,
                  limit: int | None = None, seed: int = 0, n_challenges: int = SIMULATED_CHALLENGES, explain: bool = False,
                  progress: bool = True) -> Evaluation:
    """`evaluate_model` on the labelled images under `data` (the --data lookup when None): a run's
    validation images with `split` (its folder), then a stratified `limit` of them; labels follow the
    model's class order by name."""
    from asirra.data import align_labels, class_names, labelled_split_dirs, resolve_data_root, scan
    from asirra.splits import evaluation_sample

    root = resolve_data_root(data)
    labelled = labelled_split_dirs(root)[0] or root
    refs = evaluation_sample(scan(labelled, labelled=True), Path(split) / "split.json" if split is not None else None,
                             limit, seed)
    refs = align_labels(refs, class_names(labelled), classifier.classes)  # the data's class order -> the model's
    return evaluate_model(classifier, refs, out_dir, n_challenges=n_challenges, seed=seed, info={"data": str(root)},
                          progress=progress, explain=explain)


def evaluate_model(classifier, refs: Sequence, out_dir: Path, n_challenges: int = SIMULATED_CHALLENGES, seed: int = 0,
                   info: dict | None = None, progress: bool = True, explain: bool = False) -> Evaluation:
    """Classify labelled refs, score them and write the report and plots into `out_dir`.

    The one evaluation pipeline: `asirra evaluate`, the demo and the experiment commands call it.
    Unreadable images are skipped and listed in `predictions.unusable`, never fatal. With `explain`,
    mistakes.png shows each mistake under its Grad-CAM map of the (wrongly) predicted class.
    """
    from asirra.images import read_pixels
    from asirra.predict import predict_refs

    preds = predict_refs(classifier, refs, progress=progress)
    if not preds.refs:
        raise InvalidPredictions("no readable images to evaluate")
    context = {"model": classifier.name, "backend": classifier.backend, "engine": classifier.engine,
               "unusable": len(preds.unusable), **(info or {})}

    def pictures(idx: list[int]) -> list[np.ndarray]:
        if not explain:
            return [read_pixels(preds.refs[i].read_bytes(), 160) for i in idx]
        from asirra.gradcam import gradcam_overlays

        # The torch module explains the call the scoring backend made: that call is the target.
        return gradcam_overlays(classifier.model, classifier.image_size, [preds.refs[i].read_bytes() for i in idx],
                                targets=predicted_index(preds.proba[idx]), tta=classifier.tta)

    names = [r.name for r in preds.refs]
    note = " (Grad-CAM of the predicted class)" if explain else ""
    if is_binary(preds.classes):
        report = evaluate_predictions(preds.labels, preds.p_dog, n_challenges=n_challenges, seed=seed, info=context,
                                      classes=preds.classes)
        files = write_evaluation(report, preds.labels, preds.p_dog, pictures, names, out_dir, mistakes_note=note,
                                 classes=preds.classes)
    else:
        report = evaluate_classes(preds.labels, preds.proba, preds.classes, info=context)
        files = write_class_evaluation(report, preds.labels, preds.proba, preds.classes, pictures, names, out_dir,
                                       mistakes_note=note)
    return Evaluation(report, preds, files)
