"""Ablations: named variants of a baseline, each cross-validated on the same folds, compared with it.

An ablation file (TOML) names a baseline TrainConfig (partial settings; the rest are defaults),
the cross-validation, and variants as overrides of the baseline:

    [baseline]
    model = "seed-cnn"
    image_size = 64
    limit = 2400          # the images cross-validated, shared by every variant
    [cv]
    folds = 3
    [variants.no-batch-norm]
    model_options = { batch_norm = false }   # merged into the baseline's model_options
    [variants.half-data]
    train_fraction = 0.5  # each fold trains on half its training images; validation folds unchanged
    [variants.cleaned]
    drop_from_training = "suspects.csv"   # never train on these content keys (path relative to this file)

Every variant is scored on exactly the baseline's validation folds (folds.json at the top of the
output folder), so differences are paired per fold and compared with the corrected resampled
t-test (`corrected_paired_ttest`). Each variant is a cross-validation folder (asirra.crossval),
each fold a run folder: a killed ablation continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from asirra.config import AugmentConfig, TrainConfig
from asirra.crossval import FOLDS_FILE, HAMMING_THRESHOLD, Folds, cross_validate, draw_folds
from asirra.errors import ConfigError
from asirra.fileio import write_json_atomic, write_text_atomic
from asirra.stats import t_interval

log = logging.getLogger(__name__)

BASELINE = "baseline"
# Overrides that would change which images are validated, breaking the pairing of folds.
FIXED_BY_BASELINE = {"data": "the data", "out": "the output folder", "limit": "the images (use train_fraction)",
                     "seed": "the folds", "val_fraction": "the folds"}
METRICS = ("accuracy", "log_loss")


@dataclass
class Ablation:
    baseline: dict
    variants: dict[str, dict] = field(default_factory=dict)
    folds: int = 3
    hamming: int = HAMMING_THRESHOLD
    home: Path = Path(".")  # the file's folder: relative paths in it start here


@dataclass
class Arm:
    config: TrainConfig
    train_fraction: float = 1.0
    drop_from_training: frozenset[str] = frozenset()


def read_ablation(path: Path) -> Ablation:
    """Parse and check an ablation file; every variant's config is built once here so errors come first."""
    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read the ablation file {path} ({exc})") from None
    unknown = set(doc) - {"baseline", "cv", "variants"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {', '.join(sorted(unknown))} (expected baseline, cv, variants)")
    cv = doc.get("cv", {})
    if set(cv) - {"folds", "hamming"}:
        raise ConfigError(f"{path}: [cv] takes folds and hamming, not {', '.join(sorted(set(cv) - {'folds', 'hamming'}))}")
    ablation = Ablation(doc.get("baseline", {}), doc.get("variants", {}), int(cv.get("folds", 3)),
                        int(cv.get("hamming", HAMMING_THRESHOLD)), Path(path).parent)
    for name, overrides in ablation.variants.items():
        if name == BASELINE or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ConfigError(f"{path}: variant name {name!r} must be a simple folder name other than {BASELINE!r}")
        if not isinstance(overrides, dict):
            raise ConfigError(f"{path}: [variants.{name}] must be a table of overrides")
        fixed = sorted(set(overrides) & set(FIXED_BY_BASELINE))
        if fixed:
            raise ConfigError(f"{path}: variant {name} may not override {', '.join(fixed)} "
                             f"(it fixes {', '.join(FIXED_BY_BASELINE[k] for k in fixed)} for every variant)")
    for name in arms(ablation):
        arm_config(ablation, name, data=".", out=".")  # raises on an unknown or invalid setting
    return ablation


def arms(ablation: Ablation) -> list[str]:
    return [BASELINE, *ablation.variants]


def arm_config(ablation: Ablation, name: str, data: str, out: str) -> Arm:
    """One arm: its TrainConfig, the share of each training fold it trains on, the images it never trains on."""
    from asirra.crossval import read_image_keys

    settings = copy.deepcopy(ablation.baseline)
    overrides = copy.deepcopy(ablation.variants.get(name, {}))
    train_fraction = float(overrides.pop("train_fraction", 1.0))
    if not 0 < train_fraction <= 1:
        raise ConfigError(f"variant {name}: train_fraction must be in (0, 1], got {train_fraction}")
    drop_file = overrides.pop("drop_from_training", None)
    drop = read_image_keys(ablation.home / drop_file) if drop_file else frozenset()
    options = {**settings.get("model_options", {}), **overrides.pop("model_options", {})}
    settings.update(overrides)
    settings.update(model_options=options, data=data, out=out, augment=_augment(settings.get("augment", True), name))
    try:
        return Arm(TrainConfig.from_dict(settings), train_fraction, drop)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _augment(value, name: str):
    """augment = true / false, or a table of AugmentConfig fields (the rest default)."""
    if value is True:
        return asdict(AugmentConfig())
    if value is False or value is None:
        return None
    if isinstance(value, dict):
        return {**asdict(AugmentConfig()), **value}
    raise ConfigError(f"{name}: augment must be true, false or a table, got {value!r}")


# ---- the comparison ----------------------------------------------------------------------------


def corrected_paired_ttest(baseline, variant, test_train_ratio: float) -> dict:
    """Corrected resampled t-test of variant - baseline, paired over the same k folds.

    Nadeau & Bengio (2003), "Inference for the generalization error", Machine Learning 52:239-281:
    the variance of the mean difference is (1/k + n_test/n_train) s^2 rather than s^2/k, because
    the folds' training sets overlap; as in scikit-learn's "Statistical comparison of models".
    The naive figures (ratio 0) are returned beside them for comparison.
    """
    from scipy import stats

    d = np.asarray(variant, np.float64) - np.asarray(baseline, np.float64)
    k = len(d)

    def test(ratio: float) -> tuple[list, float]:
        interval = t_interval(d, ratio)
        se = math.sqrt((1 / k + ratio) * d.var(ddof=1)) if k > 1 else 0.0
        if se == 0:
            return interval["ci95"], 1.0 if d.mean() == 0 else 0.0
        return interval["ci95"], float(2 * stats.t.sf(abs(d.mean() / se), k - 1))

    ci, p = test(test_train_ratio)
    naive_ci, naive_p = test(0.0)
    return {"difference": float(d.mean()), "ci95": ci, "p": p, "naive_ci95": naive_ci, "naive_p": naive_p}


def compare(results: dict[str, dict]) -> dict[str, dict]:
    """Each variant against the baseline on each metric, paired by fold."""
    base = results[BASELINE]["per_fold"]
    out = {}
    for name, summary in results.items():
        if name == BASELINE:
            continue
        folds = summary["per_fold"]
        # The smaller of the two training sets: the larger correction, a conservative choice when they differ.
        ratio = float(np.mean([f["n_val"] / min(f["n_train"], b["n_train"]) for f, b in zip(folds, base)]))
        out[name] = {m: corrected_paired_ttest([b[m] for b in base], [f[m] for f in folds], ratio) for m in METRICS}
    return out


# ---- the run -----------------------------------------------------------------------------------


def run_ablation(ablation: Ablation, data: str, out: Path, train: bool = True) -> dict:
    """Cross-validate every arm on the same folds into out/ARM; report.md, ablation.json and ablation.png
    are rewritten after each arm, so a long ablation can be read while it runs.

    With train=False nothing trains: the report covers the arms finished so far (the others are listed as pending).
    """
    from asirra.training import load_pixels

    out = Path(out)
    names = arms(ablation)
    base_config = arm_config(ablation, BASELINE, data, str(out / BASELINE)).config
    folds_path = out / FOLDS_FILE
    if folds_path.exists():
        plan = Folds.load(folds_path)
    elif train:
        plan = draw_folds(load_pixels(base_config, out), ablation.folds, base_config.seed, ablation.hamming,
                          base_config.cache_dir, base_config.workers)
        plan.save(folds_path)
    results: dict[str, dict] = {}
    for i, name in enumerate(names):
        if train:
            arm = arm_config(ablation, name, data, str(out / name))
            log.info(f"== arm {i + 1} of {len(names)}: {name} {describe(ablation.variants.get(name, {}))}")
            results[name] = cross_validate(arm.config, ablation.folds, arm.train_fraction, plan.threshold, n_suspects=12,
                                           shared_folds=plan, drop_from_training=arm.drop_from_training)
        elif (out / name / "cv.json").exists():
            results[name] = json.loads((out / name / "cv.json").read_text())
        if BASELINE in results:
            write_outputs(out, ablation, results, pending=[n for n in names if n not in results])
    if BASELINE not in results:
        raise ConfigError(f"nothing to report in {out}: the baseline's cross-validation has not finished")
    log.info(f"report: {out / 'report.md'}; plot: {out / 'ablation.png'}")
    return {"results": results, "comparison": compare(results)}


def write_outputs(out: Path, ablation: Ablation, results: dict, pending: list[str]) -> None:
    comparison = compare(results)
    write_json_atomic(out / "ablation.json", {"arms": {n: {k: r[k] for k in ("per_fold", "summary", "train_fraction")}
                                                       for n, r in results.items()},
                                              "comparison": comparison, "pending": pending, "folds": ablation.folds,
                                              "overrides": ablation.variants, "baseline": ablation.baseline})
    write_report(out / "report.md", ablation, results, comparison, pending)
    if comparison:
        plot_comparison(comparison, out / "ablation.png")


def describe(overrides: dict) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in overrides.items()) or "(the baseline)"


def write_report(path: Path, ablation: Ablation, results: dict, comparison: dict, pending: list[str] = ()) -> Path:
    base = results[BASELINE]
    n_images = sum(f["n_val"] for f in base["per_fold"])
    lines = [
        "# Ablation report",
        "",
        f"{ablation.folds}-fold cross-validation of {n_images} images; every variant on the same folds "
        f"(near-identical images kept in one fold). Baseline: {describe(ablation.baseline)}.",
        "",
        "Intervals are 95%. A variant's own ± is the plain t-interval over folds; its difference from the "
        "baseline is paired per fold and tested with the corrected resampled t-test (Nadeau & Bengio 2003: "
        "variance x (1/k + n_test/n_train)), p two-sided. Accuracy up is better, log loss down is better.",
        "",
        "| variant | overrides | accuracy | Δ accuracy [95% CI] | p | log loss | Δ log loss [95% CI] | p | "
        "best epoch | train s/fold |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        cells = [name, describe(ablation.variants.get(name, {})).replace("|", "\\|")]
        for metric, digits in (("accuracy", 4), ("log_loss", 4)):
            s = r["summary"][metric]
            cells.append(f"{s['mean']:.{digits}f} ± {_half(s):.{digits}f}")
            if name == BASELINE:
                cells += ["—", "—"]
            else:
                c = comparison[name][metric]
                cells += [f"{c['difference']:+.{digits}f} [{c['ci95'][0]:+.{digits}f}, {c['ci95'][1]:+.{digits}f}]",
                          f"{c['p']:.3f}"]
        folds = r["per_fold"]
        cells.append("/".join(str(f["best_epoch"]) for f in folds))
        cells.append(f"{np.mean([f['train_seconds'] for f in folds]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if pending:
        lines += ["", f"Not finished yet (rerun the ablation to continue): {', '.join(pending)}."]
    lines += ["", "Verdicts (corrected test, p < 0.05):", ""]
    for name, c in comparison.items():
        lines.append(f"- **{name}**: {verdict(c)}")
    lines.append("")
    return write_text_atomic(path, "\n".join(lines))


def verdict(c: dict) -> str:
    acc, loss = c["accuracy"], c["log_loss"]
    parts = []
    for what, m, better_sign in (("accuracy", acc, 1), ("log loss", loss, -1)):
        if m["p"] < 0.05:
            parts.append(f"{what} {'better' if m['difference'] * better_sign > 0 else 'worse'} "
                         f"({m['difference']:+.4f}, p = {m['p']:.3f})")
        else:
            parts.append(f"no detectable change in {what} ({m['difference']:+.4f}, p = {m['p']:.2f})")
    return "; ".join(parts)


def _half(s: dict) -> float:
    return (s["ci95"][1] - s["ci95"][0]) / 2 if s["std"] is not None else float("nan")


def plot_comparison(comparison: dict, out: Path) -> Path:
    """Each variant's difference from the baseline, with its corrected 95% interval, per metric."""
    from matplotlib.figure import Figure

    from asirra.plots import save_figure

    names = list(comparison)
    fig = Figure(figsize=(10, 0.45 * len(names) + 1.6), layout="constrained")
    fig.suptitle("variant - baseline, paired over the same folds (95% corrected resampled t-intervals)")
    for ax, metric in zip(fig.subplots(1, 2, sharey=True), METRICS):
        y = np.arange(len(names))
        mean = np.array([comparison[n][metric]["difference"] for n in names])
        low = np.array([comparison[n][metric]["ci95"][0] for n in names])
        high = np.array([comparison[n][metric]["ci95"][1] for n in names])
        ax.errorbar(mean, y, xerr=[mean - low, high - mean], fmt="o", color="#2b6a99", capsize=3)
        ax.axvline(0, color="black", lw=1)
        ax.set_yticks(y, names)
        ax.invert_yaxis()
        ax.set_xlabel(f"Δ {metric.replace('_', ' ')} ({'higher' if metric == 'accuracy' else 'lower'} is better)")
    return save_figure(fig, out)
