"""`asirra tune`: an Optuna study over training configs; each trial is one `asirra train` run folder.

- Sampler: TPE with a fixed seed; pruner: median pruning on each epoch's validation loss
  (reported through `train_on`'s `on_epoch`). A trial whose loss turns NaN is recorded as FAIL.
- Search spaces: seed-cnn gets the notebook's "next steps" list (epochs, dropout, learning rate,
  weight decay, optimiser, input size, depth, width, hidden units, batch size, augmentation
  strength); the transfer models get what trains on cached backbone activations (head only or
  the top 1-2 blocks, 1-2 cached views, learning rates, weight decay, label smoothing).
- Storage: a journal file in the output folder by default (several processes on one machine may
  share it); `sqlite:///...`, any SQLAlchemy URL, or `redis://HOST:PORT/DB` (a journal in Redis)
  so several machines search one study. A study resumes from its storage: `--trials N` is the
  study's total, so rerunning the same command after a kill finishes the remaining trials.
- Data: trials train and validate on a stratified tuning subset (`limit`) split as `asirra train`
  splits it, so the best trial's config.json, run through `asirra train --config`, is that trial.
  The tuned validation loss is optimistic (the configs were chosen on it); the best trial's model
  is therefore also scored on held-out images outside the tuning subset, which no trial saw.

Heavy imports (optuna, torch) happen inside functions: the CLI reads the defaults from here.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from asirra.config import AugmentConfig, TrainConfig
from asirra.errors import ConfigError, ModelError, require
from asirra.runs import check_stamp, differences, refuse

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 20
DEFAULT_LIMIT = 3000  # images in the tuning subset (0: all); the rest is where the held-out sample comes from
DEFAULT_HELDOUT = 2000  # held-out images the best trial's model is scored on (0: skip)
DEFAULT_EPOCHS = {"seed-cnn": 8}  # the most epochs a trial may draw; transfer models below
DEFAULT_TRANSFER_EPOCHS = 6
SEED_CNN_SIZES = (64, 160, 32)  # input size: low, high, step (each divisible by 2 ** 5, the deepest network)


@dataclass
class TuneSettings:
    model: str
    data: str
    out: str
    trials: int = DEFAULT_TRIALS  # the study's total, across resumes and processes
    storage: str | None = None  # None: a journal file out/study.log
    study: str | None = None  # None: asirra-<model>
    timeout: float | None = None  # seconds this process may spend; a running trial stops at its next epoch
    limit: int | None = DEFAULT_LIMIT
    epochs: int | None = None  # the most epochs a trial may draw; None: the model's default
    seed: int = 0  # the sampler's seed and every trial's split / initialisation seed
    heldout: int = DEFAULT_HELDOUT
    fixed: dict = field(default_factory=dict)  # TrainConfig settings every trial shares (e.g. cache_dir, workers)

    def __post_init__(self):
        if self.trials < 1:
            raise ConfigError(f"--trials must be at least 1, got {self.trials}")
        if self.timeout is not None and self.timeout <= 0:
            raise ConfigError(f"--timeout must be positive, got {self.timeout}")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
        if self.heldout < 0:
            raise ConfigError(f"--heldout must be >= 0, got {self.heldout}")

    @property
    def max_epochs(self) -> int:
        return self.epochs or DEFAULT_EPOCHS.get(self.model, DEFAULT_TRANSFER_EPOCHS)

    @property
    def study_name(self) -> str:
        return self.study or f"asirra-{self.model}"

    def identity(self) -> dict:
        """What makes trials comparable: a study resumed or shared with other settings is refused."""
        return {"model": self.model, "data": str(self.data), "limit": self.limit or None, "seed": self.seed,
                "max_epochs": self.max_epochs}


# ---- search spaces -----------------------------------------------------------------------------


def _epochs(trial, max_epochs: int) -> int:
    return trial.suggest_int("epochs", max(1, math.ceil(max_epochs / 3)), max_epochs)


def seed_cnn_space(trial, max_epochs: int) -> dict:
    """The notebook's list, as TrainConfig settings."""
    from asirra.config import OPTIMIZERS

    size = trial.suggest_int("image_size", *SEED_CNN_SIZES[:2], step=SEED_CNN_SIZES[2])
    depth = trial.suggest_int("depth", 2, 5)
    if size % 2 ** depth:  # cannot happen with the sizes above; a guard for whoever widens them
        raise ConfigError(f"input size {size} is not divisible by 2 ** depth ({2 ** depth})")
    width = trial.suggest_categorical("width", [16, 32, 48])
    strength = trial.suggest_float("augment_strength", 0.0, 1.5)
    base = AugmentConfig()
    augment = AugmentConfig(rotation_deg=base.rotation_deg * strength, shear=base.shear * strength,
                            zoom=base.zoom * strength, shift=base.shift * strength, hflip=base.hflip)
    return {
        "image_size": size,
        "model_options": {
            "widths": [width * 2 ** i for i in range(depth)],
            "dense": trial.suggest_categorical("dense", [64, 128, 256, 512]),
            "dropout_conv": trial.suggest_float("dropout_conv", 0.0, 0.5),
            "dropout_dense": trial.suggest_float("dropout_dense", 0.0, 0.7),
            "batch_norm": True,
        },
        "epochs": _epochs(trial, max_epochs),
        "optimizer": trial.suggest_categorical("optimizer", list(OPTIMIZERS)),
        "lr": trial.suggest_float("lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1, log=True),
        "batch_size": trial.suggest_categorical("batch_size", [32, 64, 128]),
        "augment": asdict(augment),
    }


def transfer_space(trial, max_epochs: int) -> dict:
    """Settings that train on cached activations: a trial costs seconds to a minute once the cache exists.

    Every (strategy, unfreeze, views) pair is its own activation cache, built by the first trial that draws it.
    """
    strategy = trial.suggest_categorical("strategy", ["linear", "finetune"])
    settings = {
        "strategy": strategy,
        "views": trial.suggest_int("views", 1, 2),
        "epochs": _epochs(trial, max_epochs),
        "schedule": "cosine",
        "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        # With at most 2 views the cache holds the image and its mirror: no random warps to configure.
        "augment": None,
    }
    if strategy == "finetune":
        settings["unfreeze"] = trial.suggest_int("unfreeze", 1, 2)
        settings["backbone_lr_scale"] = trial.suggest_float("backbone_lr_scale", 0.03, 1.0, log=True)
    return settings


def baseline_params(model: str, max_epochs: int) -> dict:
    """The untuned defaults as a point of the search space: the notebook's network, or `make model`'s recipe.

    Enqueued as a new study's first trial, so the study measures what tuning bought on its own budget.
    """
    from asirra.models import pretrained_models

    if model in pretrained_models():
        return {"strategy": "finetune", "unfreeze": 1, "views": 2, "epochs": min(5, max_epochs), "lr": 1e-3,
                "weight_decay": 1e-4, "label_smoothing": 0.1, "backbone_lr_scale": 0.1}
    # weight_decay: the search range's floor stands in for the default 0 (a log range cannot hold 0).
    return {"image_size": 128, "depth": 3, "width": 32, "dense": 512, "dropout_conv": 0.25, "dropout_dense": 0.5,
            "augment_strength": 1.0, "epochs": max_epochs, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 1e-6,
            "batch_size": 64}


def search_space(model: str) -> Callable:
    from asirra.models import available_models, pretrained_models

    if model not in available_models():
        raise ModelError(f"unknown model {model!r}; available: {', '.join(available_models())}")
    return transfer_space if model in pretrained_models() else seed_cnn_space


def trial_config(settings: TuneSettings, trial, run: Path, space: Callable | None = None) -> TrainConfig:
    """The TrainConfig of one trial: the tuner's fixed settings plus what the trial drew from `space`."""
    drawn = (space or search_space(settings.model))(trial, settings.max_epochs)
    return TrainConfig.from_dict({**settings.fixed, "data": str(settings.data), "out": str(run), "model": settings.model,
                                  "limit": settings.limit or None, "seed": settings.seed, **drawn})


# ---- storage ----------------------------------------------------------------------------------


def open_storage(url: str | None, out: Path):
    """A journal file by default; an RDB for SQLAlchemy URLs; a journal in Redis for redis:// URLs."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or "://" not in url:
        path = Path(url) if url else out / "study.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("redis://", "rediss://", "unix://")):
        import warnings

        from optuna.exceptions import ExperimentalWarning
        from optuna.storages.journal import JournalRedisBackend

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                return JournalStorage(JournalRedisBackend(url))
        except Exception as exc:  # redis' errors have no common public base across versions
            raise ConfigError(f"cannot open the Redis study storage {describe_storage(url)} ({exc})") from None
    from optuna.storages import RDBStorage

    try:
        return RDBStorage(url)
    except Exception as exc:  # SQLAlchemy raises its own errors for bad URLs and unreachable servers
        raise ConfigError(f"cannot open the study storage {describe_storage(url)} ({str(exc).splitlines()[0]})") from None


def describe_storage(url: str | None) -> str:
    """The storage URL without its password, for logs and tune.json."""
    if not url or "://" not in url:
        return url or "study.log"
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def open_study(settings: TuneSettings, pruner=None):
    """Create or load the study (load_if_exists), refusing one made with other settings."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(settings.out)
    storage = open_storage(settings.storage, out)
    study = optuna.create_study(study_name=settings.study_name, storage=storage, direction="minimize",
                                load_if_exists=True)
    saved = study.user_attrs.get("settings")
    if saved is None:
        study.set_user_attr("settings", settings.identity())
    elif differences(saved, settings.identity()):
        raise refuse(f"study {settings.study_name!r} in {describe_storage(settings.storage)}", "study",
                     differences(saved, settings.identity()), instead="--study")
    # Seeded by the trials already there, so a resumed or second process does not repeat the first proposals.
    study.sampler = optuna.samplers.TPESampler(seed=settings.seed + len(study.trials), constant_liar=True,
                                               n_startup_trials=max(3, min(10, settings.trials // 3)))
    study.pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    return study


def spent_trials(study) -> int:
    """Trials that count towards --trials: finished or in flight, not those a killed process left (they rerun)."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state != TrialState.WAITING and not t.user_attrs.get("interrupted"))


def recover_interrupted(study) -> list[int]:
    """RUNNING trials of this machine whose process is gone: mark them FAIL and queue them to resume.

    Their run folder keeps its checkpoint, so the queued trial continues it from its last epoch.
    Trials of other machines cannot be told apart from live ones and are left alone.
    """
    from optuna.trial import TrialState

    host, queued = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        pid = t.user_attrs.get("pid")
        if t.user_attrs.get("host") != host or pid is None or _alive(pid):
            continue
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"resume_of": t.user_attrs.get("resume_of", t.number)},
                            skip_if_exists=False)
        queued.append(t.number)
    return queued


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---- the objective -----------------------------------------------------------------------------


class _Diverged(Exception):
    pass


class Objective:
    """One trial: draw a config, train it in out/trials/trial-N, report each epoch's validation loss."""

    def __init__(self, settings: TuneSettings, deadline: float | None, clock: Callable[[], float],
                 space: Callable | None = None):
        self.settings, self.deadline, self.clock, self.space = settings, deadline, clock, space
        self._pixels: dict[int, object] = {}  # decoded tuning subset per input size, shared by trials

    def __call__(self, trial) -> float:
        import optuna

        folder = trial.user_attrs.get("resume_of", trial.number)
        run = Path(self.settings.out) / "trials" / f"trial-{folder}"
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("run", str(run))
        config = trial_config(self.settings, trial, run, self.space)
        cached, train_idx, val_idx, resume = self._prepare(config, run)

        def on_epoch(row: dict) -> None:
            self._report(trial, row, last=int(row["epoch"]) >= config.epochs)

        try:
            from asirra.training import train_on

            for row in _logged_epochs(run) if resume else []:
                self._report(trial, row, last=True)  # a resumed trial's earlier epochs, for the pruner
            metrics = train_on(cached, train_idx, val_idx, config, run, resume=resume, on_epoch=on_epoch)
        except _Diverged as exc:
            trial.set_user_attr("note", str(exc))
            trial.set_user_attr("epochs_run", len(_logged_epochs(run)))
            return float("nan")  # Optuna records a NaN objective as FAIL
        except optuna.TrialPruned:
            trial.set_user_attr("epochs_run", len(_logged_epochs(run)))
            raise
        rows = _logged_epochs(run)
        trial.set_user_attr("epochs_run", len(rows))
        trial.set_user_attr("val_accuracy", metrics["val"]["accuracy"])
        trial.set_user_attr("first_epoch_train_loss", rows[0]["train_loss"] if rows else None)
        # The calibrated loss of the kept (best) epoch, as the model ships: label smoothing raises the
        # uncalibrated loss, and the temperature undoes exactly that, so ranking by it would punish smoothing.
        return float(metrics["val"]["log_loss"])

    def _report(self, trial, row: dict, last: bool) -> None:
        import optuna

        val_loss, epoch = float(row["val_loss"]), int(row["epoch"])
        if not (math.isfinite(val_loss) and math.isfinite(float(row["train_loss"]))):
            raise _Diverged(f"loss is not finite at epoch {epoch}")
        trial.report(val_loss, step=epoch)
        if trial.should_prune():
            trial.set_user_attr("note", f"pruned after epoch {epoch} (val loss {val_loss:.4f})")
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")
        if not last and self.deadline is not None and self.clock() > self.deadline:
            # Recorded as pruned (stopped on an intermediate value), with the reason beside it.
            trial.set_user_attr("note", f"stopped by --timeout after epoch {epoch}")
            raise optuna.TrialPruned(f"timeout after epoch {epoch}")

    def _prepare(self, config: TrainConfig, run: Path):
        from asirra.fileio import write_json_atomic
        from asirra.models import input_size
        from asirra.splits import load_split, save_split, stratified_split
        from asirra.training import dataset_classes, load_pixels, prepare_run

        resume = (run / "checkpoint.pt").exists() and (run / "split.json").exists()
        if resume:
            check_stamp(run, config.to_dict(), "config.json", "trial")
        prepare_run(config, resume=resume)
        size = input_size(config)
        if size not in self._pixels:
            self._pixels[size] = load_pixels(config, run)
        cached = self._pixels[size]
        write_json_atomic(run / "unusable.json", cached.unusable)
        if resume:
            train_idx, val_idx = load_split(run, cached)
        else:
            # Exactly as `asirra train` splits: the best config reproduces its trial.
            train_idx, val_idx = stratified_split(cached.labels, config.val_fraction, config.seed,
                                                  dataset_classes(config))
            save_split(run, cached, train_idx, val_idx)
        return cached, train_idx, val_idx, resume


def _logged_epochs(run: Path) -> list[dict]:
    path = Path(run) / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# ---- the study ---------------------------------------------------------------------------------


def tune(settings: TuneSettings, pruner=None, clock: Callable[[], float] = time.monotonic,
         space: Callable | None = None) -> dict:
    """Run (or resume, or join) the study until it holds settings.trials trials; write the outputs.

    `space(trial, max_epochs) -> TrainConfig settings` replaces the model's search space (tests use a tiny one).
    """
    import warnings

    optuna = require("optuna", "tune")
    search_space(settings.model)  # an unknown model fails here, before a study is made
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    study = open_study(settings, pruner)
    if space is None and not study.trials:
        study.enqueue_trial(baseline_params(settings.model, settings.max_epochs), user_attrs={"baseline": True})
    requeued = recover_interrupted(study)
    if requeued:
        log.info(f"trials {', '.join(map(str, requeued))} were interrupted; they resume from their last epoch")
    started = clock()
    deadline = None if settings.timeout is None else started + settings.timeout
    remaining = settings.trials - spent_trials(study)
    log.info(f"study {settings.study_name} ({describe_storage(settings.storage)}): {spent_trials(study)} of "
          f"{settings.trials} trials done; running up to {max(0, remaining)} more")

    def after_trial(study, trial) -> None:
        _print_trial(study, trial, settings.trials)
        if spent_trials(study) >= settings.trials or (deadline is not None and clock() > deadline):
            study.stop()

    if remaining > 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(Objective(settings, deadline, clock, space), n_trials=remaining, callbacks=[after_trial],
                           gc_after_trial=True)
    return write_outputs(study, settings, seconds=clock() - started)


def _print_trial(study, trial, total: int) -> None:
    value = "" if trial.value is None else f" val loss {trial.value:.4f}"
    note = trial.user_attrs.get("note", "")
    try:
        best = f"; best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = ""
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    log.info(f"[tune] trial {trial.number} ({spent_trials(study)}/{total}) {trial.state.name}{value} "
          f"in {seconds:.0f} s{' - ' + note if note else ''}{best}")


# ---- outputs -----------------------------------------------------------------------------------


def write_outputs(study, settings: TuneSettings, seconds: float) -> dict:
    """trials.csv, best_config.json, the plots, the held-out score and tune.json in settings.out."""
    from optuna.trial import TrialState

    from asirra.fileio import write_json_atomic

    out = Path(settings.out)
    trials = study.get_trials(deepcopy=False)
    write_trials_csv(trials, out / "trials.csv")
    counts = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState if s != TrialState.WAITING}
    summary = {
        "study": settings.study_name, "storage": describe_storage(settings.storage), "settings": settings.identity(),
        "trials": len([t for t in trials if t.state != TrialState.WAITING]), "states": counts,
        "seconds_this_process": round(seconds, 1),
        "sampler": "TPE", "pruner": type(study.pruner).__name__,
        "objective": "validation log loss (calibrated, best epoch) on the trials' validation split of the tuning subset",
    }
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    summary["plots"] = write_plots(study, out, len(complete))
    ours = [t for t in complete if "run" in t.user_attrs]  # trials added by other tools have no run folder
    if ours:
        best = min(ours, key=lambda t: t.value)
        best_run = Path(best.user_attrs["run"])
        config = TrainConfig.from_dict(json.loads((best_run / "config.json").read_text()))
        config.out = str(out / "best")  # where `asirra train --config best_config.json` puts its run unless --out
        write_json_atomic(out / "best_config.json", config.to_dict())
        summary["best"] = {"trial": best.number, "run": str(best_run), "val_log_loss": best.value,
                           "val_accuracy": best.user_attrs.get("val_accuracy"), "params": best.params,
                           "first_epoch_train_loss": best.user_attrs.get("first_epoch_train_loss")}
        baseline = [t for t in trials if t.user_attrs.get("baseline")]
        if baseline:
            t = baseline[0]
            summary["baseline"] = {"trial": t.number, "state": t.state.name, "val_log_loss": t.value,
                                   "val_accuracy": t.user_attrs.get("val_accuracy")}
        summary["heldout"] = evaluate_heldout(config, best_run, out / "heldout", settings.heldout)
    write_json_atomic(out / "tune.json", summary)
    _print_summary(summary, out)
    return summary


def write_trials_csv(trials, path: Path) -> Path:
    from optuna.trial import TrialState

    from asirra.fileio import atomic_path

    names = sorted({name for t in trials for name in t.params})
    header = ["number", "state", "value", "seconds", "val_accuracy", "epochs_run", "note", *names]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in trials:
            if t.state == TrialState.WAITING:
                continue
            seconds = f"{t.duration.total_seconds():.1f}" if t.duration else ""
            writer.writerow([t.number, t.state.name, "" if t.value is None else f"{t.value:.6g}", seconds,
                             t.user_attrs.get("val_accuracy", ""), t.user_attrs.get("epochs_run", ""),
                             _note(t), *[t.params.get(n, "") for n in names]])
    return path


def _note(trial) -> str:
    notes = ["baseline (the untuned defaults)"] if trial.user_attrs.get("baseline") else []
    if trial.user_attrs.get("interrupted"):
        notes.append("interrupted (its process died); a later trial resumed its run folder")
    return "; ".join(notes + ([trial.user_attrs["note"]] if "note" in trial.user_attrs else []))


def write_plots(study, out: Path, n_complete: int) -> dict:
    """Optuna's matplotlib plots; what cannot be drawn yet is named with the reason instead."""
    import warnings

    # No backend is chosen here: that would switch a notebook's inline plots off for the rest of its session.
    # Optuna draws with pyplot; each figure is closed once saved, so none is shown or kept.
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    from asirra.plots import save_figure

    wanted = {"history": (vis.plot_optimization_history, 1), "intermediate": (vis.plot_intermediate_values, 1),
              "importances": (vis.plot_param_importances, 2)}
    written = {}
    for name, (plot, needs) in wanted.items():
        if n_complete < needs:
            written[name] = f"skipped: needs {needs} complete trial(s), the study has {n_complete}"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            written[name] = str(save_figure(fig, out / f"{name}.png"))
            plt.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:  # e.g. importances of params that never vary
            written[name] = f"skipped: {exc}"
    return written


def evaluate_heldout(config: TrainConfig, best_run: Path, out: Path, n: int) -> dict:
    """Score the best trial's model on images outside the tuning subset (none of them trained or chose anything).

    The sample is a stratified `n` of the images `limit` left out, minus any whose bytes equal a tuning image's.
    """
    if n == 0:
        return {"skipped": "--heldout 0"}
    import numpy as np

    from asirra.cache import content_key
    from asirra.data import scan
    from asirra.evaluation import evaluate_model
    from asirra.predict import load_classifier
    from asirra.stats import stratified_subset

    refs = scan(config.data, labelled=True)
    labels = np.array([r.label for r in refs])
    inside = set(stratified_subset(labels, config.limit, config.seed).tolist())
    outside = np.array([i for i in range(len(refs)) if i not in inside], dtype=np.int64)
    if len(outside) < 2:
        return {"skipped": "the tuning subset holds all the data (pass --limit below the number of images)"}
    split = json.loads((best_run / "split.json").read_text())
    tuning_keys = set(split["train"]) | set(split["val"])
    sample = [refs[i] for i in outside[stratified_subset(labels[outside], n, config.seed + 1)]]
    kept = []
    for ref in sample:
        try:
            if content_key(ref.read_bytes()) not in tuning_keys:
                kept.append(ref)
        except OSError:
            kept.append(ref)  # unreadable: evaluation lists it as skipped
    evaluation = evaluate_model(load_classifier(best_run), kept, out, seed=config.seed,
                                info={"what": "best trial's model on held-out images outside the tuning subset"})
    r = evaluation.report.to_json()
    return {"n": r["n"], "accuracy": r["accuracy"], "log_loss": r["log_loss"], "auc": r.get("auc"),
            "challenge_solve_rate": r.get("challenge_solve_rate"), "dropped_duplicates": len(sample) - len(kept),
            "folder": str(out)}


def _print_summary(summary: dict, out: Path) -> None:
    states = ", ".join(f"{v} {k.lower()}" for k, v in summary["states"].items() if v)
    log.info(f"study {summary['study']}: {summary['trials']} trials ({states})")
    best = summary.get("best")
    if best is None:
        log.info("no trial completed yet: no best config")
        return
    log.info(f"best trial {best['trial']}: val log loss {best['val_log_loss']:.4f}, accuracy {best['val_accuracy']:.4f} "
          f"(optimistic: chosen on this split)")
    if summary.get("baseline", {}).get("val_log_loss") is not None:
        base = summary["baseline"]
        log.info(f"baseline (untuned defaults, trial {base['trial']}): val log loss {base['val_log_loss']:.4f}, "
              f"accuracy {base['val_accuracy']:.4f}")
    held = summary.get("heldout", {})
    if "accuracy" in held:
        log.info(f"held-out ({held['n']} images outside the tuning subset): accuracy {held['accuracy']:.4f}, "
              f"log loss {held['log_loss']:.4f}")
    log.info(f"best config: {out / 'best_config.json'} (asirra train --config {out / 'best_config.json'} --out RUN)")
