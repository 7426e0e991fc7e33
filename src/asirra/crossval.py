"""Cross-validation: k stratified folds in which copies of one photo never straddle folds.

A fold is an ordinary run folder (DIR/fold-K, made by asirra.training.prepare_run + train_on), so a
killed cross-validation continues at the fold and epoch where it stopped and finished folds are
skipped. Beside them DIR holds:

- folds.json: which images (content keys) validate in each fold, and how the groups were made;
- oof.csv: every image's out-of-fold P(dog) (or, for N classes, its p_<class> columns), predicted by
  the one fold that did not train on it;
- suspects.csv / suspects.png: the most confident disagreements between OOF predictions and labels
  (label noise, placeholders, photos of both animals), for a person to look at;
- cv.json / cv.png: per-fold metrics, mean, std and 95% intervals.

Groups: byte-identical files share a content key (asirra.cache); near-identical ones (re-encoded,
resized, lightly retouched) share a 64-bit difference hash within HAMMING_THRESHOLD bits. Pairs
are joined by union-find, so a chain of near-copies is one group, and StratifiedGroupKFold keeps
each group inside one fold: no fold validates on a photo another fold trained on.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from asirra.config import TrainConfig
from asirra.errors import ConfigError, DataError
from asirra.fileio import atomic_path, write_json_atomic
from asirra.labels import is_binary
from asirra.runs import RunFolderError, claim
from asirra.stats import t_interval

# The hash is computed from the pixel cache at this size, whatever the model's input size, so
# every variant of an ablation (64 to 160 px) gets the same groups and hence the same folds.
HASH_SIDE = 32
# Two images are near-identical when their 64-bit dHashes differ in at most HAMMING_THRESHOLD bits
# (candidates) AND their thumbnails correlate at MIN_CORRELATION or more (confirmation). Measured
# on the 19,000 training images (docs/results/next-steps.md): distinct photos differ by
# 31.8 bits on average (sd 5.2), but with 180 million pairs the tail is long: 65 pairs are within
# 5 bits and only 20 of them are the same photo; those 20 correlate >= 0.99, the next pair 0.85
# (two different animals in similar frames), and no pair 6-10 bits apart reaches 0.9. Over 200 of
# the photos, re-encoding at JPEG quality 40 moved at most 3 bits and resizing to 70% at most 5,
# their thumbnails still correlating >= 0.988. So 8 bits leave room for heavier edits, and the
# correlation keeps look-alike framings apart.
HAMMING_THRESHOLD = 8
MIN_CORRELATION = 0.9
FOLDS_FILE, SETTINGS_FILE = "folds.json", "cv-settings.json"
log = logging.getLogger(__name__)


# ---- groups: content keys and perceptual hashes ---------------------------------------------


def dhash(pixels: np.ndarray) -> np.ndarray:
    """64-bit difference hash of each (n, S, S, 3) uint8 image: is each of 8x9 grey cells brighter than its right neighbour."""
    from PIL import Image

    grey = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    hashes = np.zeros(len(pixels), np.uint64)
    for i, g in enumerate(grey):
        small = np.asarray(Image.fromarray(g).resize((9, 8), Image.Resampling.BOX))
        bits = (small[:, :-1] > small[:, 1:]).ravel()
        hashes[i] = np.packbits(bits).view(">u8")[0]
    return hashes


def near_pairs(hashes: np.ndarray, threshold: int, chunk: int = 512) -> np.ndarray:
    """(m, 2) index pairs i < j whose hashes differ in at most `threshold` bits (all pairs, chunked)."""
    hashes = np.asarray(hashes, np.uint64)
    found = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk, None] ^ hashes[None, :]
        i, j = np.nonzero(np.bitwise_count(block) <= threshold)
        i = i + start
        keep = i < j
        found.append(np.stack([i[keep], j[keep]], 1))
    return np.concatenate(found) if found else np.zeros((0, 2), np.int64)


def connected_groups(n: int, pairs) -> np.ndarray:
    """Group id (0..g-1, in order of first member) of each of n items, items of a pair joined (union-find)."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(i) for i in range(n)])
    _, ids = np.unique(roots, return_inverse=True)
    return ids


def duplicate_groups(cached, threshold: int = HAMMING_THRESHOLD, cache_dir: str | None = None,
                     workers: int = 2, min_correlation: float = MIN_CORRELATION) -> np.ndarray:
    """Group id per image of `cached`: same content key, or near-identical (dHash within `threshold`
    bits and thumbnails correlating at `min_correlation` or more)."""
    from asirra.cache import PixelCache

    thumbs = PixelCache(HASH_SIDE, Path(cache_dir) if cache_dir else None).build(cached.refs, workers=workers)
    row_of = dict(zip(thumbs.keys, range(len(thumbs))))
    first_with_key: dict[str, int] = {}
    pairs = []
    for i, key in enumerate(cached.keys):
        if first_with_key.setdefault(key, i) != i:
            pairs.append((first_with_key[key], i))
    hashed = np.array([i for i, key in enumerate(cached.keys) if key in row_of], np.int64)
    if len(hashed):
        pixels = thumbs.pixels([row_of[cached.keys[i]] for i in hashed])
        candidates = near_pairs(dhash(pixels), threshold)
        r = thumbnail_correlation(pixels, candidates)
        pairs += [(hashed[a], hashed[b]) for a, b in candidates[r >= min_correlation]]
    return connected_groups(len(cached), pairs)


def thumbnail_correlation(pixels: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Pearson correlation of the two thumbnails of each pair (over all pixels and channels)."""
    if not len(pairs):
        return np.zeros(0)
    x = pixels.reshape(len(pixels), -1).astype(np.float32)
    x -= x.mean(1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-6
    return np.einsum("ij,ij->i", x[pairs[:, 0]], x[pairs[:, 1]])


# ---- folds ----------------------------------------------------------------------------------


def make_folds(labels, groups, k: int, seed: int) -> list[np.ndarray]:
    """Sorted validation positions of each of k folds: stratified by label, no group split."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    smallest = int(np.bincount(labels, minlength=2).min())
    if not 2 <= k <= smallest:
        raise ConfigError(f"--folds must be between 2 and {smallest} (the smallest class's size), got {k}")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [np.sort(val) for _, val in splitter.split(np.zeros(len(labels)), labels, groups)]


@dataclass
class Folds:
    """What folds.json records: validation content keys per fold, and how they were drawn."""

    k: int
    seed: int
    threshold: int
    val_keys: list[list[str]]
    n_groups: int
    largest_group: int
    min_correlation: float | None = MIN_CORRELATION  # None: folds drawn on dHash alone (before it was added)

    def positions(self, cached) -> list[np.ndarray]:
        """Validation positions in `cached` (images matched by content key, so any input size fits)."""
        where = {key: i for i, key in enumerate(cached.keys)}
        missing = sum(key not in where for keys in self.val_keys for key in keys)
        if missing or sum(map(len, self.val_keys)) != len(cached):
            raise RunFolderError(f"these folds were drawn for other images ({missing} of their images are missing, "
                             f"{len(cached)} images now vs {sum(map(len, self.val_keys))}); use another --out")
        return [np.sort(np.array([where[key] for key in keys], np.int64)) for keys in self.val_keys]

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"k": self.k, "seed": self.seed, "hash": f"dhash64 on {HASH_SIDE}px grey",
                                 "hamming_threshold": self.threshold, "min_correlation": self.min_correlation,
                                 "n_groups": self.n_groups,
                                 "largest_group": self.largest_group, "val_keys": self.val_keys})

    @classmethod
    def load(cls, path: Path) -> "Folds":
        d = json.loads(Path(path).read_text())
        return cls(d["k"], d["seed"], d["hamming_threshold"], d["val_keys"], d["n_groups"], d["largest_group"],
                   d.get("min_correlation"))


def draw_folds(cached, k: int, seed: int, threshold: int = HAMMING_THRESHOLD, cache_dir: str | None = None,
               workers: int = 2) -> Folds:
    groups = duplicate_groups(cached, threshold, cache_dir, workers)
    sizes = np.bincount(groups)
    folds = make_folds(cached.labels, groups, k, seed)
    log.info(f"{len(cached)} images in {len(sizes)} groups ({int((sizes > 1).sum())} of near-identical images, "
             f"largest {int(sizes.max())}); {k} folds of {', '.join(str(len(f)) for f in folds)}")
    return Folds(k, seed, threshold, [[cached.keys[i] for i in f] for f in folds], len(sizes), int(sizes.max()))


def training_positions(cached, val_idx: np.ndarray, train_fraction: float, seed: int,
                       drop: frozenset[str] = frozenset()) -> np.ndarray:
    """Every image outside the fold, or a stratified `train_fraction` of them, less the content keys in
    `drop` (e.g. suspected label errors); the fold itself is never touched."""
    from asirra.stats import stratified_subset

    train_idx = np.setdiff1d(np.arange(len(cached)), val_idx)
    if drop:
        train_idx = np.array([i for i in train_idx if cached.keys[i] not in drop], np.int64)
    if not 0 < train_fraction <= 1:
        raise ConfigError(f"train_fraction must be in (0, 1], got {train_fraction}")
    if train_fraction < 1:
        keep = stratified_subset(cached.labels[train_idx], max(2, round(train_fraction * len(train_idx))), seed)
        train_idx = train_idx[keep]
    return train_idx


# ---- the run ----------------------------------------------------------------------------------


def cross_validate(config: TrainConfig, folds: int = 5, train_fraction: float = 1.0,
                   threshold: int = HAMMING_THRESHOLD, n_suspects: int = 24, shared_folds: Folds | None = None,
                   drop_from_training: frozenset[str] = frozenset()) -> dict:
    """k-fold cross-validation of `config` into config.out; resumable. Returns what cv.json holds.

    `drop_from_training` (content keys) are never trained on but still validated in their fold, so
    a run without them is scored on exactly the same images as one with them.

    `shared_folds` (an ablation's) replaces drawing folds here, so several configs are scored on
    exactly the same validation images.
    """
    from asirra.splits import check_class_counts
    from asirra.training import dataset_classes, load_pixels

    out = Path(config.out)
    _check_settings(out, config, folds, train_fraction, threshold, drop_from_training)
    classes = dataset_classes(config)
    cached = load_pixels(config, out)
    check_class_counts(cached.labels, classes, 2, "for stratified folds")  # make_folds then checks --folds
    if shared_folds is not None:
        shared_folds.save(out / FOLDS_FILE)
    plan = shared_folds or _folds_for(out, cached, folds, config, threshold)
    fold_val = plan.positions(cached)
    per_fold = []
    for f, val_idx in enumerate(fold_val):
        train_idx = training_positions(cached, val_idx, train_fraction, config.seed + f, drop_from_training)
        per_fold.append(_run_fold(cached, train_idx, val_idx, config, out, f, len(fold_val), classes))
    oof = write_oof(out, len(fold_val), classes)
    if len(oof["key"]) != len(cached) or set(oof["key"]) != set(cached.keys):
        raise RuntimeError(f"out-of-fold predictions cover {len(set(oof['key']))} of {len(cached)} images")
    suspects = write_suspects(out, oof, cached, n_suspects)
    summary = summarize(per_fold, oof)
    summary.update(config=config.to_dict(), folds=len(fold_val), train_fraction=train_fraction,
                   dropped_from_training=sorted(drop_from_training),
                   hamming_threshold=plan.threshold, suspects=suspects)
    write_json_atomic(out / "cv.json", summary)
    plot_folds(per_fold, summary, out / "cv.png", title=f"{config.model}: {len(fold_val)}-fold cross-validation")
    _print_summary(summary, out)
    return summary


def _check_settings(out: Path, config: TrainConfig, folds: int, train_fraction: float, threshold: int,
                    drop: frozenset[str]) -> None:
    """A folder holds one cross-validation: continuing it with other settings would mix two experiments."""
    # workers only changes speed; out is the folder itself
    settings = {"train": {k: v for k, v in config.to_dict().items() if k not in ("out", "workers")}, "folds": folds,
                "train_fraction": train_fraction, "hamming_threshold": threshold, "dropped": sorted(drop)}
    if claim(out, settings, SETTINGS_FILE, "cross-validation", restamp=True):
        log.info(f"continuing the cross-validation in {out}")


def _folds_for(out: Path, cached, k: int, config: TrainConfig, threshold: int) -> Folds:
    path = out / FOLDS_FILE
    if path.exists():
        return Folds.load(path)
    plan = draw_folds(cached, k, config.seed, threshold, config.cache_dir, config.workers)
    plan.save(path)
    return plan


def read_image_keys(path: Path) -> frozenset[str]:
    """The `key` column of a CSV (suspects.csv, oof.csv, or a hand-made list of content keys)."""
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc})") from None
    if "key" not in (reader.fieldnames or ()):
        raise DataError(f"{path} has no key column (content keys, as in suspects.csv)")
    return frozenset(row["key"] for row in rows)


def fold_done(run: Path) -> bool:
    return (run / "metrics.json").exists() and (run / "val_predictions.csv").exists() and (run / "timings.json").exists()


def _run_fold(cached, train_idx, val_idx, config: TrainConfig, out: Path, f: int, k: int, classes=None) -> dict:
    from asirra.splits import save_split
    from asirra.training import prepare_run, train_on

    run = out / f"fold-{f + 1}"
    what = f"fold {f + 1} of {k}: {len(train_idx)} training, {len(val_idx)} validation images"
    if fold_done(run):
        log.info(f"{what} (done)")
        metrics = json.loads((run / "metrics.json").read_text())
    else:
        resume = (run / "config.json").exists()
        log.info(f"{what}{' (resuming)' if resume else ''}")
        fold_config = replace(config, out=str(run))
        prepare_run(fold_config, resume)
        save_split(run, cached, train_idx, val_idx)
        metrics = train_on(cached, train_idx, val_idx, fold_config, run, resume=resume, classes=classes)
    val = metrics["val"]
    return {"fold": f + 1, "n_train": int(len(train_idx)), "n_val": int(len(val_idx)), "accuracy": val["accuracy"],
            "log_loss": val["log_loss"], "auc": val.get("auc"), "temperature": metrics["temperature"],
            **_epochs(run / "metrics.csv")}


def _epochs(metrics_csv: Path) -> dict:
    with open(metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    best = min(rows, key=lambda r: float(r["val_loss"]))
    return {"epochs": len(rows), "best_epoch": int(best["epoch"]),
            "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1)}


def write_oof(out: Path, k: int, classes) -> dict[str, list]:
    """oof.csv: each fold's val_predictions.csv with its fold number; returns its columns.

    A binary run has one probability column, P(class 1) (`p_dog` for cat/dog), returned as "p_dog"
    (1-D); an N-class run its `p_<class>` columns, returned as "proba" (n, N). "classes" names them.
    """
    rows, columns = [], None
    for f in range(k):
        with open(out / f"fold-{f + 1}" / "val_predictions.csv", newline="") as fh:
            reader = csv.DictReader(fh)
            rows += [{**row, "fold": f + 1} for row in reader]
            columns = [c for c in reader.fieldnames if c.startswith("p_")]
    with atomic_path(out / "oof.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["key", "name", "label", *columns, "fold"])
        writer.writeheader()
        writer.writerows(rows)
    oof = {"key": [r["key"] for r in rows], "name": [r["name"] for r in rows],
           "label": np.array([int(r["label"]) for r in rows]), "fold": np.array([r["fold"] for r in rows])}
    oof["classes"] = list(classes)
    if is_binary(classes):
        oof["p_dog"] = np.array([float(r[columns[0]]) for r in rows])
    else:
        oof["proba"] = np.array([[float(r[c]) for c in columns] for r in rows]).reshape(len(rows), len(columns))
    return oof


def write_suspects(out: Path, oof: dict, cached, n: int) -> list[dict]:
    """suspects.csv and suspects.png: OOF predictions that most confidently contradict their labels."""
    from asirra.plots import plot_image_grid

    suspects = _binary_suspects(oof, n) if is_binary(oof["classes"]) else _multiclass_suspects(oof, n)
    with atomic_path(out / "suspects.csv") as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(suspects[0]) if suspects else ["rank", "name", "key", "label", "fold"])
        writer.writeheader()
        writer.writerows(suspects)
    ref_of = dict(zip(cached.keys, cached.refs))
    captions = [f"{s['name']} ({s['label']})\n" + (f"P(dog)={s['p_dog']:.3f}" if "p_dog" in s else
                                                     f"called {s['predicted']} {s['p_predicted']:.3f}") for s in suspects]
    plot_image_grid([_thumbnail(ref_of[s["key"]]) for s in suspects], captions, out / "suspects.png",
                    title="out-of-fold predictions most confidently contradicting the label")
    return suspects


def _binary_suspects(oof: dict, n: int) -> list[dict]:
    from asirra.evaluation import worst_mistakes
    from asirra.labels import CLASS_NAMES

    order = worst_mistakes(oof["label"], oof["p_dog"], k=n) if n else np.zeros(0, int)
    return [{"rank": r + 1, "name": oof["name"][i], "key": oof["key"][i], "label": CLASS_NAMES[oof["label"][i]],
             "p_dog": float(oof["p_dog"][i]), "fold": int(oof["fold"][i])} for r, i in enumerate(order)]


def _multiclass_suspects(oof: dict, n: int) -> list[dict]:
    from asirra.metrics import mistake_order, predictions

    classes, proba = oof["classes"], oof["proba"]
    order = mistake_order(oof["label"], proba, k=n) if n else np.zeros(0, int)
    called = predictions(proba)
    return [{"rank": r + 1, "name": oof["name"][i], "key": oof["key"][i], "label": classes[oof["label"][i]],
             "predicted": classes[called[i]], "p_predicted": float(proba[i, called[i]]), "fold": int(oof["fold"][i])}
            for r, i in enumerate(order)]


def _thumbnail(ref, side: int = 256) -> np.ndarray:
    from asirra.images import load_image

    image = load_image(ref.read_bytes(), draft_size=side)
    image.thumbnail((side, side))  # aspect kept: a person judges the photo, not the network's squashed input
    return np.asarray(image)


def summarize(per_fold: list[dict], oof: dict) -> dict:
    ratio = float(np.mean([f["n_val"] / f["n_train"] for f in per_fold]))
    if is_binary(oof["classes"]):
        from asirra.evaluation import classification_metrics

        pooled = classification_metrics(oof["label"], oof["p_dog"], classes=oof["classes"])
    else:
        from asirra.metrics import multiclass_metrics

        pooled = {**multiclass_metrics(oof["label"], oof["proba"], oof["classes"]), "auc": None}
    # AUC is a two-class figure: N-class folds have none.
    metrics = ("accuracy", "log_loss", "auc") if all(f.get("auc") is not None for f in per_fold) else ("accuracy", "log_loss")
    return {
        "per_fold": per_fold,
        # The plain t-interval over folds, as usually reported, and the corrected one (t_interval).
        "summary": {m: t_interval([f[m] for f in per_fold]) for m in metrics},
        "summary_corrected": {m: t_interval([f[m] for f in per_fold], ratio) for m in ("accuracy", "log_loss")},
        "oof": {k: pooled[k] for k in ("n", "accuracy", "log_loss", "auc")},
    }


def plot_folds(per_fold: list[dict], summary: dict, out: Path, title: str) -> Path:
    """Per-fold accuracy and log loss, with the mean and its 95% t-interval."""
    from matplotlib.figure import Figure

    from asirra.plots import save_figure

    fig = Figure(figsize=(8, 3.2), layout="constrained")
    fig.suptitle(title)
    folds = [f["fold"] for f in per_fold]
    for ax, metric in zip(fig.subplots(1, 2), ("accuracy", "log_loss")):
        s = summary["summary"][metric]
        ax.bar(folds, [f[metric] for f in per_fold], color="#7aa6c2")
        ax.axhline(s["mean"], color="black", lw=1, label=f"mean {s['mean']:.4f}")
        if s["std"] is not None:
            ax.axhspan(*s["ci95"], color="grey", alpha=0.25, label="95% t-interval")
        values = [f[metric] for f in per_fold]
        spread = max(values) - min(values) or abs(s["mean"]) * 0.05 or 0.01
        ax.set_ylim(max(0.0, min(values) - 2 * spread), max(values) + 2 * spread)
        ax.set_xticks(folds)
        ax.set_xlabel("fold")
        ax.set_title(metric.replace("_", " "))
        ax.legend(fontsize=8)
    return save_figure(fig, out)


def _print_summary(summary: dict, out: Path) -> None:
    for metric, s in summary["summary"].items():
        if s["std"] is None:
            continue
        line = f"{metric}: {s['mean']:.4f} ± {s['std']:.4f} (95% t-interval {s['ci95'][0]:.4f}-{s['ci95'][1]:.4f}"
        corrected = summary["summary_corrected"].get(metric)
        if corrected:
            line += f"; corrected for overlapping training sets {corrected['ci95'][0]:.4f}-{corrected['ci95'][1]:.4f}"
        log.info(line + ")")
    log.info(f"out-of-fold: accuracy {summary['oof']['accuracy']:.4f}, log loss {summary['oof']['log_loss']:.4f}; "
          f"{out / 'oof.csv'}, suspects {out / 'suspects.png'}, {out / 'cv.json'}")
