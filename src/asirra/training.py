"""Training: one loop, three ways to feed it.

`fit` is the only training loop (nanoGPT-style: read it top to bottom). What differs between
strategies is a Task (asirra.tasks): how a batch is drawn and pushed through the trainable part
of the model. What a run is made of is a TrainConfig (asirra.config); which images train and
which validate is asirra.splits.

Any labelled data set with N >= 2 classes trains (asirra.data.class_names): two classes keep one
logit and binary cross-entropy (the cat/dog model, unchanged); N >= 3 train N logits with softmax
cross-entropy. Both take --label-smoothing; the names are recorded in model.json ("classes").

A run folder holds everything needed to trust or continue the run: config.json, env.json
(versions, threads), split.json, metrics.csv, curves.png, checkpoint.pt (last epoch, for
--resume), model/ (best epoch, safetensors + JSON), metrics.json (final validation) and
timings.json.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from asirra.calibration import apply_temperature, fit_temperature, predicted_index, predicted_labels, probabilities
from asirra.config import RESUMABLE_CHANGES, Schedule, TrainConfig
from asirra.distributed import (
    agree,
    average_buffers,
    average_gradients,
    broadcast_parameters,
    launch,
    leave,
    main_first,
    main_only,
    sum_over_ranks,
    threads_per_process,
    world,
)
from asirra.errors import ConfigError, DataError, ModelError
from asirra.fileio import atomic_path, write_json_atomic
from asirra.labels import CLASS_NAMES, is_binary
from asirra.models import ModelConfig, available_models, input_size, save_model
from asirra.runs import RunFolderError, check_stamp, stamped
from asirra.splits import drop_duplicate_content, load_split, save_split, stratified_split
from asirra.stats import stratified_subset
from asirra.tasks import Task, make_task

log = logging.getLogger(__name__)
CONFIG_FILE = "config.json"  # the run folder's stamp: `asirra train --config` reruns it


# ---- the loop ----------------------------------------------------------------------------


def fit(task: Task, config: TrainConfig, run: Path, resume: bool = False,
        on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train until early stopping or the epoch budget; keep the best model by validation loss.

    `on_epoch(row)` sees each epoch's metrics row after its checkpoint is written: a tuner reports
    it and may raise to prune the run (the run folder then stays resumable).
    """
    torch.manual_seed(config.seed)
    optimizer = _make_optimizer(task.parameter_groups(config), config)
    steps_per_epoch = max(1, math.ceil(task.n_train() / config.batch_size))
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0}

    checkpoint = run / "checkpoint.pt"
    # Rank 0 reads it for every rank: the run folder need only exist on rank 0's machine.
    saved = main_only(_read_checkpoint, checkpoint) if resume else None
    if saved is not None:
        try:
            task.model.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise RunFolderError(f"{checkpoint} does not fit {config.model} ({str(exc).splitlines()[0]})") from None
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        log.info(f"resuming {run} after epoch {state['epoch']}")
    if resume and world().is_main:
        # Also without a checkpoint: a first epoch can be logged and killed before its checkpoint lands.
        _truncate_metrics(run / "metrics.csv", state["epoch"])
    broadcast_parameters(task.model)

    stopped_early = state["bad_epochs"] >= config.patience
    if stopped_early:
        log.info(f"run {run} had already stopped early after epoch {state['epoch']}")
    for epoch in range(state["epoch"], state["epoch"] if stopped_early else config.epochs):
        started = time.perf_counter()
        train_loss, train_acc = _train_one_epoch(task, optimizer, scheduler, config, epoch)
        average_buffers(task.model)
        # Rank 0 validates and every rank acts on its figures: one early-stopping and LR decision per run.
        val_loss, val_acc = main_only(lambda: loss_and_accuracy(*task.val_logits()))
        lr = optimizer.param_groups[0]["lr"]  # the head's (or the only) group
        if config.schedule == Schedule.plateau:
            scheduler.step(val_acc)

        improved = val_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            if world().is_main:
                save_model(task.model, ModelConfig(config.model, input_size(config), options=config.model_options,
                                                   classes=list(task_classes(task))), run / "model")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        row = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                   lr=lr, seconds=round(time.perf_counter() - started, 2))
        if world().is_main:
            _append_metrics(run / "metrics.csv", row)
            _save_checkpoint(checkpoint, task, optimizer, scheduler, state)
        log.info(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2e}{'  *' if improved else ''}")
        if on_epoch is not None:
            on_epoch(row)
        if state["bad_epochs"] >= config.patience:
            log.info(f"early stopping: validation loss has not improved for {config.patience} epochs")
            break
    return state


def use_bf16(setting: bool | None) -> bool:
    """TrainConfig.bf16 resolved: None means autocast only where the CPU computes bfloat16 natively."""
    return torch.ops.mkldnn._is_mkldnn_bf16_supported() if setting is None else bool(setting)


def _train_one_epoch(task, optimizer, scheduler, config, epoch) -> tuple[float, float]:
    task.set_train_mode()
    total_loss = total_correct = seen = 0
    bar = tqdm(task.train_batches(epoch), total=math.ceil(task.n_train() / config.batch_size),
               desc=f"epoch {epoch + 1}", unit="batch", leave=False)
    for inputs, targets in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16(config.bf16)):
            logits = task.train_step_logits(inputs)
        logits = logits.float()
        loss = training_loss(logits, targets, config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(p for group in optimizer.param_groups for p in group["params"])
        optimizer.step()
        if config.schedule != Schedule.plateau:
            scheduler.step()
        total_loss += loss.item() * len(targets)
        total_correct += _n_correct(logits.detach(), targets)
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{total_correct / seen:.3f}")
    total_loss, total_correct, seen = sum_over_ranks([total_loss, total_correct, seen])
    return total_loss / max(seen, 1), total_correct / max(seen, 1)


def task_classes(task) -> tuple[str, ...]:
    """The class names a task trains, in label order; a task that names none is cat/dog."""
    return tuple(getattr(task, "classes", CLASS_NAMES))


def training_loss(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Binary cross-entropy on one logit (cat/dog, unchanged), softmax cross-entropy on N logits;
    both with label smoothing (targets pulled towards the uniform distribution by `smoothing`)."""
    if logits.ndim == 1:
        return F.binary_cross_entropy_with_logits(logits, smoothed_targets(targets, smoothing))
    return F.cross_entropy(logits, targets.long(), label_smoothing=smoothing)


def smoothed_targets(targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing for one logit: 0/1 targets pulled towards 0.5 by `smoothing`."""
    return targets.float() * (1 - smoothing) + 0.5 * smoothing


def _n_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    if logits.ndim == 1:
        return int((torch.from_numpy(predicted_labels(torch.sigmoid(logits).numpy())) == labels).sum())
    return int((torch.from_numpy(predicted_index(probabilities(logits.numpy()))) == labels).sum())


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Unsmoothed log loss and accuracy of fp32 logits: what validation and early stopping watch."""
    logits = logits.float()
    if logits.ndim == 1:
        loss = F.binary_cross_entropy_with_logits(logits, labels.float()).item()
    else:
        loss = F.cross_entropy(logits, labels.long()).item()
    return loss, _n_correct(logits, labels) / max(1, len(labels))


def _make_optimizer(groups: list[dict], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=config.lr, alpha=0.9, eps=1e-7, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    if config.schedule == Schedule.plateau:
        # Keras counts patience as the bad epochs that trigger a cut; PyTorch cuts one epoch later.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.lr_factor, patience=max(0, config.lr_patience - 1), min_lr=config.min_lr)
    total = config.epochs * steps_per_epoch
    if config.schedule == Schedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.min_lr)
    max_lrs = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total)


# ---- run folder ----------------------------------------------------------------------------


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop rows of an epoch that was logged but whose checkpoint never landed."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if int(r["epoch"]) <= epochs_done]
    if not rows:
        path.unlink()  # so the next epoch starts a new file, header included
        return
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _read_checkpoint(path: Path) -> dict | None:
    # weights_only: a checkpoint is tensors and plain containers; nothing executable is unpickled.
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _save_checkpoint(path: Path, task, optimizer, scheduler, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "state": state}, tmp)


def environment() -> dict:
    import PIL

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "processes": world().size,  # data-parallel ranks (torch.distributed)
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run(config: TrainConfig, resume: bool) -> Path:
    """The run folder for `config`: new (or started over), or with `resume` the same run continued.

    A resumed run may train longer or faster (RESUMABLE_CHANGES), never on other data or otherwise.
    """
    if config.model not in available_models():
        raise ModelError(f"unknown model {config.model!r}; available: {', '.join(available_models())}")
    run = Path(config.out)
    settings = config.to_dict()
    if resume:
        if stamped(run, CONFIG_FILE) is None:
            raise RunFolderError(f"nothing to resume at {run} (no {CONFIG_FILE})")
        check_stamp(run, settings, CONFIG_FILE, "training run", keys=[k for k in settings if k not in RESUMABLE_CHANGES])
    elif (run / "checkpoint.pt").exists():
        raise RunFolderError(f"{run} already holds a training run; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run / CONFIG_FILE, settings)
    write_json_atomic(run / "env.json", environment())
    return run


def train_on_processes(config: TrainConfig, resume: bool, nproc: int) -> int:
    """`train` on `nproc` local processes under torchrun (`asirra train --nproc N`); torchrun's exit code.

    The run folder is checked and its config.json written here, so bad input fails once, before N
    processes start; the ranks then train from that config.json (rank 0 rewrites it unchanged).
    """
    from asirra.distributed import local_batch_size

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc starts its own processes; leave it out under torchrun")
    local_batch_size(config.batch_size, nproc)
    run = prepare_run(config, resume)
    code = launch(nproc, ["--config", str(run / CONFIG_FILE), *(["--resume"] if resume else [])])
    if code:
        log.error(f"distributed training failed (torchrun exit code {code})")
    return code


# ---- entry point -----------------------------------------------------------------------------


def reuse_freed_memory(enabled: bool = True) -> None:
    """Keep the memory freed tensors leave in the process's heap instead of handing it to the OS.

    glibc gives every block over 32 MB (one layer's activations for a batch) back to the kernel
    when it is freed, so each training step page-faults about a gigabyte of fresh zeroed pages:
    some 15% of a seed-cnn step's CPU time on 2 cores (benchmarks/bench_train.py). The next step
    needs the same blocks again, so keeping them costs no memory beyond the peak of one step.
    A no-op where the C library is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters, from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0 if enabled else 65536)
    libc.mallopt(m_trim_threshold, 2**30 if enabled else 128 * 1024)


def train(config: TrainConfig, resume: bool = False) -> Path:
    """Build the run folder, the data and its split; fit; calibrate; write final metrics and plots."""
    classes = dataset_classes(config)  # before anything is decoded: a bad layout fails in a second
    run = main_only(prepare_run, config, resume)
    timings = Timings()
    cached = main_first(load_pixels, config, run)  # one process per machine decodes into the cache, then the others
    agree(cached.keys, "images under --data")  # the split's positions must mean the same images on every rank
    train_idx, val_idx = main_only(_split, run, cached, config, resume, classes)
    log.info(f"{len(train_idx)} training and {len(val_idx)} validation images of {len(classes)} classes "
             f"({len(cached.unusable)} unusable skipped); run folder {run}")
    timings.lap("decode_and_cache_pixels")
    train_on(cached, train_idx, val_idx, config, run, resume=resume, timings=timings, classes=classes)
    leave()  # a data-parallel run's ranks part together; a no-op in one process
    return run


def dataset_classes(config: TrainConfig) -> tuple[str, ...]:
    """The class names of the config's data, in label order (asirra.data.class_names); two or more."""
    from asirra.data import class_names

    classes = class_names(config.data)
    if len(classes) < 2:
        raise DataError(f"no labelled images in {config.data}: expected cat.N.jpg/dog.N.jpg names or one "
                        f"folder per class (two or more)")
    return classes


def _split(run: Path, cached, config: TrainConfig, resume: bool,
           classes: Sequence[str] = CLASS_NAMES) -> tuple[np.ndarray, np.ndarray]:
    if resume and (run / "split.json").exists():
        return load_split(run, cached)
    train_idx, val_idx = stratified_split(cached.labels, config.val_fraction, config.seed, classes)
    save_split(run, cached, train_idx, val_idx)
    return train_idx, val_idx


def load_pixels(config: TrainConfig, run: Path):
    """The config's images decoded once into the pixel cache; unusable and duplicate files reported in `run`."""
    from asirra.cache import PixelCache
    from asirra.data import scan

    torch.set_num_threads(threads_per_process())
    reuse_freed_memory()
    refs = scan(config.data, labelled=True)
    refs = [refs[i] for i in stratified_subset(np.array([r.label for r in refs]), config.limit, config.seed)]
    cached = PixelCache(input_size(config), Path(config.cache_dir) if config.cache_dir else None).build(
        refs, workers=config.workers)
    _report_unusable(run, cached.unusable)
    return drop_duplicate_content(cached)


def train_on(cached, train_idx, val_idx, config: TrainConfig, run: Path, resume: bool = False,
             timings: "Timings | None" = None, on_epoch: Callable[[dict], None] | None = None,
             classes: Sequence[str] | None = None) -> dict:
    """Fit a fresh task on given train/validation positions of `cached`; calibrate; return final metrics.

    The piece `train`, cross-validation and tuning share: each fold or trial is one call. `classes`
    (default: the config's data's class names) sizes the head and is recorded in model.json.
    """
    timings = timings or Timings()
    classes = tuple(classes) if classes is not None else dataset_classes(config)
    torch.manual_seed(config.seed)  # the initial weights (and a transfer head) are part of what the seed fixes
    # an activation cache is filled once per machine
    task = main_first(make_task, cached, train_idx, val_idx, config, classes)
    timings.lap("backbone_features")
    fit(task, config, run, resume=resume, on_epoch=on_epoch)
    timings.lap("training")
    return main_only(_conclude, run, task, cached, val_idx, config, timings)


def _conclude(run: Path, task, cached, val_idx, config: TrainConfig, timings: "Timings") -> dict:
    """Curves, calibration and the final metrics and predictions of a fitted task, into its run folder."""
    from asirra.plots import plot_curves

    plot_curves(run / "metrics.csv", run / "curves.png")
    metrics, proba = finalize(run, task, config)
    write_val_predictions(run, cached, val_idx, proba, task_classes(task))
    timings.lap("calibration_and_evaluation")
    write_json_atomic(run / "timings.json", timings.seconds)
    return metrics


class Timings:
    """Wall seconds per stage of a run, for timings.json."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + round(now - self._clock, 1)
        self._clock = now


def finalize(run: Path, task, config: TrainConfig) -> tuple[dict, np.ndarray]:
    """Reload the best epoch, fit its temperature on validation, save it with its figures.

    Returns the metrics and the calibrated probabilities of each validation image, in validation
    order: P(dog) (1-D) for a one-logit model, (n, N) class probabilities for N classes.
    """
    from asirra.models import load_model

    best, model_config = load_model(run / "model")
    task.model.load_state_dict(best.state_dict())
    logits, labels = task.val_logits()
    logits, labels = logits.numpy().astype(np.float64), labels.numpy()
    temperature = float(fit_temperature(logits, labels))
    classes = task_classes(task)
    before = validation_metrics(labels, logits, 1.0, classes)
    after = validation_metrics(labels, logits, temperature, classes)
    model_config.temperature = temperature
    model_config.tta = config.tta
    model_config.extra = {"train_config": config.to_dict(),
                          "val": {k: after[k] for k in ("n", "accuracy", "log_loss", "auc", "macro_f1") if k in after},
                          "val_log_loss_uncalibrated": before["log_loss"]}
    save_model(task.model, model_config, run / "model")
    metrics = {"val": after, "val_uncalibrated": before, "temperature": temperature}
    write_json_atomic(run / "metrics.json", metrics)
    log.info(f"best model: val accuracy {after['accuracy']:.4f}, log loss {after['log_loss']:.4f} "
          f"(uncalibrated {before['log_loss']:.4f}, temperature {temperature:.3f}) -> {run / 'model'}")
    return metrics, apply_temperature(logits, temperature)


def validation_metrics(labels: np.ndarray, logits: np.ndarray, temperature: float,
                       classes: Sequence[str] = CLASS_NAMES) -> dict:
    """The run's validation figures at `temperature`: evaluate.classification_metrics (accuracy, log
    loss, AUC, ...) for a binary model; for N classes asirra.metrics.multiclass_metrics (accuracy,
    top-k, macro-F1, log loss, per-class, confusion), with auc None."""
    if is_binary(classes):
        from asirra.evaluation import classification_metrics

        return classification_metrics(labels, apply_temperature(logits, temperature), classes=classes)
    from asirra.metrics import multiclass_metrics

    return {**multiclass_metrics(labels, probabilities(logits, temperature), classes), "auc": None}


def write_val_predictions(run: Path, cached, val_idx, proba: np.ndarray,
                          classes: Sequence[str] = CLASS_NAMES) -> Path:
    """val_predictions.csv: content key, file name, label and calibrated probabilities of every validation image.

    Binary models write P(class 1) as `p_<class 1>` (`p_dog` for cat/dog); N-class models one column
    `p_<class>` per class.
    Cross-validation stitches these into out-of-fold predictions; anyone can look for label noise in them.
    """
    path = Path(run) / "val_predictions.csv"
    proba = np.asarray(proba)
    columns = [f"p_{classes[1]}"] if is_binary(classes) else [f"p_{name}" for name in classes]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "name", "label", *columns])
        for i, p in zip(val_idx, proba):
            writer.writerow([cached.keys[i], cached.refs[i].name, int(cached.labels[i]),
                             *(f"{x:.6g}" for x in np.atleast_1d(p))])
    return path


def _report_unusable(run: Path, unusable: list[dict]) -> None:
    if not world().is_main:
        return  # every rank finds the same files; rank 0 reports them
    write_json_atomic(run / "unusable.json", unusable)
    for item in unusable[:10]:
        log.warning(f"skipped {item['path']}: {item['reason']}")
    if len(unusable) > 10:
        log.warning(f"... and {len(unusable) - 10} more (see {run / 'unusable.json'})")
