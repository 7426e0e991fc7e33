"""Training: one loop, three ways to feed it.

`fit` is the only training loop (nanoGPT-style: read it top to bottom). What differs between
strategies is a `Task`: how a batch is drawn and pushed through the trainable part of the model.

- scratch: a network trained on augmented pixels (seed-cnn, or a pretrained one with every block unfrozen);
- linear / finetune (transfer.py): an ImageNet backbone whose frozen part runs once, its outputs
  cached, so an epoch costs only the trainable top.

A run folder holds everything needed to trust or continue the run: config.json, env.json
(versions, threads), split.json, metrics.csv, curves.png, checkpoint.pt (last epoch, for
--resume), model/ (best epoch, safetensors + JSON) and metrics.json (final validation).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import queue
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from asirra.augment import AugmentConfig, random_affine, to_float_batch
from asirra.fileio import atomic_path, write_json_atomic
from asirra.models import ModelConfig, image_size_of, save_model


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "seed-cnn"
    strategy: str = "scratch"  # scratch | linear | finetune
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # finetune: backbone learns at lr * this
    weight_decay: float = 0.0  # L2 on the weights (AdamW's decoupled form)
    label_smoothing: float = 0.0
    schedule: str = "plateau"  # plateau | cosine | onecycle
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 10  # early stopping on validation loss
    lr_patience: int = 2  # plateau of validation accuracy
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation
    unfreeze: int = 1  # finetune: how many top blocks of the backbone train (all: 16 for lite0, 21 for lite2)
    views: int = 2  # transfer: cached views per image (original, mirror, then random augmentations)
    tta: bool = False  # validate (and predict) on the mean of original and mirrored logits
    limit: int | None = None  # stratified subset of the data, for quick runs
    channels_last: bool = True
    bf16: bool = True  # autocast matmuls and convs to bfloat16 (AVX-512-BF16 CPUs)
    compile: bool = False
    workers: int = 2
    cache_dir: str | None = None

    def __post_init__(self):
        # Fail in a second, before the data is decoded or the backbone runs, not after.
        from asirra.models import available_models

        checks = [
            (self.model in available_models(), f"unknown model {self.model!r}; available: {', '.join(available_models())}"),
            (self.strategy in ("scratch", "linear", "finetune"), f"unknown strategy {self.strategy!r}; choose scratch, linear or finetune"),
            (self.schedule in ("plateau", "cosine", "onecycle"), f"unknown schedule {self.schedule!r}; choose plateau, cosine or onecycle"),
            (0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (not (self.tta and self.strategy != "scratch" and self.views < 2), "--tta needs --views 2 or more (the mirror view)"),
            (self.epochs >= 1 and self.batch_size >= 2, "epochs must be >= 1 and batch size >= 2"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["augment"] = AugmentConfig(**d["augment"]) if d.get("augment") is not None else None
        return cls(**d)


class Task(Protocol):
    """What `fit` needs from a strategy."""

    model: nn.Module  # the full model (saved as the checkpoint and the best model)

    def set_train_mode(self) -> None: ...

    def parameter_groups(self, config: TrainConfig) -> list[dict]: ...

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # (logits, labels) over the validation split

    def train_step_logits(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def n_train(self) -> int: ...


# ---- the loop ----------------------------------------------------------------------------


def fit(task: Task, config: TrainConfig, run: Path, resume: bool = False) -> dict:
    """Train until early stopping or the epoch budget; keep the best model by validation loss."""
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(task.parameter_groups(config), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(task.n_train() / config.batch_size))
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    state = {"epoch": 0, "best_val_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0}

    checkpoint = run / "checkpoint.pt"
    if resume and checkpoint.exists():
        # weights_only: a checkpoint is tensors and plain containers; nothing executable is unpickled.
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        try:
            task.model.load_state_dict(saved["model"])
        except RuntimeError as exc:
            raise ValueError(f"{checkpoint} does not fit {config.model} ({str(exc).splitlines()[0]})") from None
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = saved["state"]
        print(f"resuming {run} after epoch {state['epoch']}")
    if resume:
        # Also without a checkpoint: a first epoch can be logged and killed before its checkpoint lands.
        _truncate_metrics(run / "metrics.csv", state["epoch"])

    stopped_early = state["bad_epochs"] >= config.patience
    if stopped_early:
        print(f"run {run} had already stopped early after epoch {state['epoch']}")
    for epoch in range(state["epoch"], state["epoch"] if stopped_early else config.epochs):
        started = time.perf_counter()
        train_loss, train_acc = _train_one_epoch(task, optimizer, scheduler, config, epoch)
        val_logits, val_labels = task.val_logits()
        val_loss = F.binary_cross_entropy_with_logits(val_logits, val_labels.float()).item()
        val_acc = ((val_logits > 0).long() == val_labels).float().mean().item()
        lr = optimizer.param_groups[0]["lr"]  # the head's (or the only) group
        if config.schedule == "plateau":
            scheduler.step(val_acc)

        improved = val_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            save_model(task.model, ModelConfig(config.model, image_size_of(config.model)), run / "model")
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        _append_metrics(
            run / "metrics.csv",
            dict(epoch=epoch + 1, train_loss=train_loss, train_acc=train_acc, val_loss=val_loss, val_acc=val_acc,
                 lr=lr, seconds=round(time.perf_counter() - started, 2)),
        )
        _save_checkpoint(checkpoint, task, optimizer, scheduler, state)
        print(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
              f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2e}{'  *' if improved else ''}")
        if state["bad_epochs"] >= config.patience:
            print(f"early stopping: validation loss has not improved for {config.patience} epochs")
            break
    return state


def _train_one_epoch(task, optimizer, scheduler, config, epoch) -> tuple[float, float]:
    task.set_train_mode()
    total_loss = total_correct = seen = 0
    bar = tqdm(task.train_batches(epoch), total=math.ceil(task.n_train() / config.batch_size),
               desc=f"epoch {epoch + 1}", unit="batch", leave=False)
    for inputs, targets in bar:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            logits = task.train_step_logits(inputs)
        logits = logits.float()
        soft = targets.float() * (1 - config.label_smoothing) + 0.5 * config.label_smoothing
        loss = F.binary_cross_entropy_with_logits(logits, soft)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.schedule != "plateau":
            scheduler.step()
        total_loss += loss.item() * len(targets)
        total_correct += ((logits.detach() > 0).long() == targets).sum().item()
        seen += len(targets)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{total_correct / seen:.3f}")
    return total_loss / max(seen, 1), total_correct / max(seen, 1)


def _make_scheduler(optimizer, config: TrainConfig, steps_per_epoch: int):
    if config.schedule == "plateau":
        # Keras counts patience as the bad epochs that trigger a cut; PyTorch cuts one epoch later.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.lr_factor, patience=max(0, config.lr_patience - 1), min_lr=config.min_lr)
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=config.min_lr)
    if config.schedule == "onecycle":
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total)
    raise ValueError(f"unknown schedule {config.schedule!r}; choose plateau, cosine or onecycle")


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
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def prepare_run(config: TrainConfig, resume: bool) -> Path:
    run = Path(config.out)
    config_path = run / "config.json"
    if resume:
        if not config_path.exists():
            raise ValueError(f"nothing to resume at {run} (no config.json)")
        saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
        if saved.model != config.model or saved.strategy != config.strategy:
            raise ValueError(f"{run} was a {saved.model}/{saved.strategy} run; resume it with the same model")
    elif (run / "checkpoint.pt").exists():
        raise ValueError(f"{run} already holds a training run; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    write_json_atomic(config_path, asdict(config))
    write_json_atomic(run / "env.json", environment())
    return run


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    train_idx, val_idx = train_test_split(index, test_size=val_fraction, stratify=labels, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def stratified_subset(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(keep)


def load_split(run: Path, cached) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the train and validation images of a run, matched by content key."""
    split = json.loads((run / "split.json").read_text())
    where = {key: i for i, key in enumerate(cached.keys)}

    def positions(keys):
        return np.array([where[k] for k in keys if k in where], dtype=np.int64)

    return positions(split["train"]), positions(split["val"])


def drop_duplicate_content(cached):
    """Keep the first of byte-identical images, so no photo sits in both training and validation."""
    first = {}
    for i, key in enumerate(cached.keys):
        first.setdefault(key, i)
    keep = np.array(sorted(first.values()), dtype=np.int64)
    if len(keep) == len(cached):
        return cached
    dropped = [{"path": cached.refs[i].source, "reason": f"same content as {cached.refs[first[k]].name}"}
               for i, k in enumerate(cached.keys) if first[k] != i]
    print(f"{len(dropped)} images duplicate another image's content and were dropped")
    return replace(cached, refs=[cached.refs[i] for i in keep], rows=cached.rows[keep],
                   keys=[cached.keys[i] for i in keep], unusable=cached.unusable + dropped)


def validation_refs(refs, split_file: Path) -> list:
    """The refs whose content is in a run's validation split (content keys survive renames)."""
    from asirra.cache import content_key
    from asirra.images import UnusableImage

    if not Path(split_file).is_file():
        raise ValueError(f"no split.json at {split_file}: pass a training run folder")
    keys = set(json.loads(Path(split_file).read_text())["val"])
    kept = []
    for ref in refs:
        try:
            if content_key(ref.read_bytes()) in keys:
                kept.append(ref)
        except (OSError, UnusableImage):
            continue  # unreadable now: evaluation would skip it anyway
    return kept


def save_split(run: Path, cached, train_idx, val_idx) -> None:
    write_json_atomic(run / "split.json", {
        "train": [cached.keys[i] for i in train_idx],
        "val": [cached.keys[i] for i in val_idx],
        "val_names": [cached.refs[i].name for i in val_idx],
    })


def head_and_backbone_groups(params, head: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimizer groups for fine-tuning: the new head learns at lr, the pretrained backbone more gently."""
    head_ids = {id(p) for p in head.parameters()}
    groups = [{"params": [p for p in params if id(p) in head_ids], "lr": config.lr}]
    backbone = [p for p in params if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    return groups


# ---- scratch: augmented pixels -------------------------------------------------------------


def prefetch(iterator, depth: int = 3):
    """Run `iterator` in a thread so reading the next batch overlaps the current step."""
    q: queue.Queue = queue.Queue(depth)
    done = object()

    def worker():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as exc:  # handed to the consumer: an epoch must not end quietly short
            q.put(exc)
        finally:
            q.put(done)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class PixelTask:
    """Train a whole network on augmented pixels read from the memory-mapped cache."""

    def __init__(self, model: nn.Module, cached, train_idx, val_idx, config: TrainConfig):
        self.model, self.cached, self.config = model, cached, config
        self.train_idx, self.val_idx = train_idx, val_idx
        self.labels = torch.as_tensor(cached.labels)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = torch.compile(self.model) if config.compile else self.model

    def n_train(self) -> int:
        return len(self.train_idx)

    def set_train_mode(self) -> None:
        self.model.train()

    def parameter_groups(self, config):
        params = [p for p in self.model.parameters() if p.requires_grad]
        head = getattr(self.model, "head", None)
        if config.strategy != "finetune" or head is None:
            return [{"params": params}]
        return head_and_backbone_groups(params, head, config)

    def _batches(self, order: np.ndarray):
        for start in range(0, len(order), self.config.batch_size):
            chunk = order[start : start + self.config.batch_size]
            chunk = np.sort(chunk)  # ascending rows read the memmap sequentially
            yield self.cached.pixels(chunk), self.labels[chunk]

    def train_batches(self, epoch):
        rng = np.random.default_rng([self.config.seed, epoch])
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = rng.permutation(self.train_idx)
        if len(order) % self.config.batch_size == 1:
            order = order[:-1]  # a batch of one breaks batch norm
        for pixels, targets in prefetch(self._batches(order)):
            x = to_float_batch(pixels, self.config.channels_last)
            if self.config.augment:
                x = random_affine(x, self.config.augment, generator)
            yield x, targets

    def train_step_logits(self, inputs):
        return self._forward(inputs)

    @torch.no_grad()
    def val_logits(self):
        self.model.eval()
        logits = []
        for pixels, _ in prefetch(self._batches(self.val_idx)):
            x = to_float_batch(pixels, self.config.channels_last)
            # fp32, as served: the temperature and the recorded figures come from these logits.
            z = self._forward(x).float()
            if self.config.tta:
                z = (z + self._forward(x.flip(3)).float()) / 2
            logits.append(z)
        return torch.cat(logits), self.labels[self.val_idx]


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
    """Build the data, the task and the run folder; fit; calibrate; write final metrics and plots."""
    from asirra.cache import PixelCache
    from asirra.data import scan
    from asirra.models import create_model
    from asirra.plots import plot_curves

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    reuse_freed_memory()
    run = prepare_run(config, resume)
    timings, clock = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    refs = scan(config.data, labelled=True)
    refs = [refs[i] for i in stratified_subset(np.array([r.label for r in refs]), config.limit, config.seed)]
    cached = PixelCache(image_size_of(config.model), Path(config.cache_dir) if config.cache_dir else None).build(
        refs, workers=config.workers)
    _report_unusable(run, cached.unusable)
    cached = drop_duplicate_content(cached)
    if resume and (run / "split.json").exists():
        train_idx, val_idx = load_split(run, cached)
    else:
        train_idx, val_idx = stratified_split(cached.labels, config.val_fraction, config.seed)
        save_split(run, cached, train_idx, val_idx)
    print(f"{len(train_idx)} training and {len(val_idx)} validation images "
          f"({len(cached.unusable)} unusable skipped); run folder {run}")

    lap("decode_and_cache_pixels")
    torch.manual_seed(config.seed)  # the initial weights (and a transfer head) are part of what the seed fixes
    if config.strategy == "scratch":
        task = PixelTask(create_model(config.model), cached, train_idx, val_idx, config)
    else:
        from asirra.transfer import make_transfer_task

        task = make_transfer_task(cached, train_idx, val_idx, config)
        lap("backbone_features")
    fit(task, config, run, resume=resume)
    lap("training")
    plot_curves(run / "metrics.csv", run / "curves.png")
    finalize(run, task, config)
    lap("calibration_and_evaluation")
    write_json_atomic(run / "timings.json", timings)
    return run


def finalize(run: Path, task, config: TrainConfig) -> dict:
    """Reload the best epoch, fit its temperature on validation, save it with its figures."""
    from asirra.evaluate import classification_metrics, fit_temperature
    from asirra.models import load_model

    best, model_config = load_model(run / "model")
    task.model.load_state_dict(best.state_dict())
    logits, labels = task.val_logits()
    logits, labels = logits.numpy().astype(np.float64), labels.numpy()
    temperature = float(fit_temperature(logits, labels))
    before = classification_metrics(labels, _sigmoid(logits))
    after = classification_metrics(labels, _sigmoid(logits / temperature))
    model_config.temperature = temperature
    model_config.tta = config.tta
    model_config.extra = {"train_config": asdict(config), "val": {k: after[k] for k in ("n", "accuracy", "log_loss", "auc")},
                          "val_log_loss_uncalibrated": before["log_loss"]}
    save_model(task.model, model_config, run / "model")
    metrics = {"val": after, "val_uncalibrated": before, "temperature": temperature}
    write_json_atomic(run / "metrics.json", metrics)
    print(f"best model: val accuracy {after['accuracy']:.4f}, log loss {after['log_loss']:.4f} "
          f"(uncalibrated {before['log_loss']:.4f}, temperature {temperature:.3f}) -> {run / 'model'}")
    return metrics


def _sigmoid(z: np.ndarray) -> np.ndarray:
    from scipy.special import expit

    return expit(z)


def _report_unusable(run: Path, unusable: list[dict]) -> None:
    write_json_atomic(run / "unusable.json", unusable)
    for item in unusable[:10]:
        print(f"skipped {item['path']}: {item['reason']}")
    if len(unusable) > 10:
        print(f"... and {len(unusable) - 10} more (see {run / 'unusable.json'})")
