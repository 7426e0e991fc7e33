"""What `asirra.training.fit` trains: a Task says how a batch is drawn and pushed through the trainable part.

- PixelTask: a whole network on augmented pixels read from the memory-mapped pixel cache
  (seed-cnn, or a pretrained network with every block unfrozen);
- CachedActivationTask: the top blocks and head of an ImageNet backbone on cached activations of
  its frozen part (asirra.transfer computes and caches them), so an epoch costs only the top.

`make_task` picks one from a TrainConfig. New strategies are a new Task, not a new loop.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from asirra.augment import random_affine, to_float_batch
from asirra.config import Strategy, TrainConfig
from asirra.distributed import local_batch_size, rank_seed, shard
from asirra.errors import ConfigError
from asirra.labels import CLASS_NAMES
from asirra.models import PretrainedClassifier, model_for, pretrained_models
from asirra.transfer import cached_activations


class Task(Protocol):
    """What `fit` needs from a strategy."""

    model: nn.Module  # the full model (saved as the checkpoint and the best model)
    classes: tuple[str, ...]  # the class names in label order (recorded in model.json); cat/dog if absent

    def set_train_mode(self) -> None: ...

    def parameter_groups(self, config: TrainConfig) -> list[dict]: ...

    def train_batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def val_logits(self) -> tuple[torch.Tensor, torch.Tensor]: ...  # (logits, labels) over the validation split

    def train_step_logits(self, inputs: torch.Tensor) -> torch.Tensor: ...

    def n_train(self) -> int: ...


def head_and_backbone_groups(params, head: nn.Module, config: TrainConfig) -> list[dict]:
    """Optimizer groups for fine-tuning: the new head learns at lr, the pretrained backbone more gently."""
    head_ids = {id(p) for p in head.parameters()}
    groups = [{"params": [p for p in params if id(p) in head_ids], "lr": config.lr}]
    backbone = [p for p in params if id(p) not in head_ids]
    if backbone:
        groups.append({"params": backbone, "lr": config.lr * config.backbone_lr_scale})
    return groups


# ---- pixels ----------------------------------------------------------------------------------


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

    def __init__(self, model: nn.Module, cached, train_idx, val_idx, config: TrainConfig,
                 classes: Sequence[str] = CLASS_NAMES):
        self.model, self.cached, self.config, self.classes = model, cached, config, tuple(classes)
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
        if config.strategy != Strategy.finetune or head is None:
            return [{"params": params}]
        return head_and_backbone_groups(params, head, config)

    def _batches(self, order: np.ndarray, batch_size: int):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            chunk = np.sort(chunk)  # ascending rows read the memmap sequentially
            yield self.cached.pixels(chunk), self.labels[chunk]

    def train_batches(self, epoch):
        rng = np.random.default_rng([self.config.seed, epoch])
        generator = torch.Generator().manual_seed(rank_seed(self.config.seed * 100_003 + epoch))
        # Under torch.distributed each rank takes its share of the one permutation (unchanged for one process).
        order, batch_size = shard(rng.permutation(self.train_idx)), local_batch_size(self.config.batch_size)
        if len(order) % batch_size == 1:
            order = order[:-1]  # a batch of one breaks batch norm
        for pixels, targets in prefetch(self._batches(order, batch_size)):
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
        for pixels, _ in prefetch(self._batches(self.val_idx, self.config.batch_size)):
            x = to_float_batch(pixels, self.config.channels_last)
            # fp32, as served: the temperature and the recorded figures come from these logits.
            z = self._forward(x).float()
            if self.config.tta:
                z = (z + self._forward(x.flip(3)).float()) / 2
            logits.append(z)
        return torch.cat(logits), self.labels[self.val_idx]


# ---- cached activations ------------------------------------------------------------------------


class CachedActivationTask:
    """Train the top of the backbone (or only the head) on cached activations of the frozen part."""

    def __init__(self, net: PretrainedClassifier, k: int | None, activations: np.ndarray, labels, train_idx, val_idx,
                 config, classes: Sequence[str] = CLASS_NAMES):
        self.model, self.k, self.config, self.classes = net, k, config, tuple(classes)
        self.activations = activations  # (n, views, ...) fp16 memmap
        self.labels = torch.as_tensor(labels)
        self.train_idx, self.val_idx = train_idx, val_idx
        for p in net.parameters():
            p.requires_grad_(False)
        for p in self._trainable_modules().parameters():
            p.requires_grad_(True)

    def _trainable_modules(self) -> torch.nn.ModuleList:
        if self.k is None:
            return torch.nn.ModuleList([self.model.head])
        backbone = self.model.backbone
        return torch.nn.ModuleList([*backbone.blocks[self.k :], backbone.top, self.model.head])

    def parameter_groups(self, config):
        params = [p for p in self._trainable_modules().parameters() if p.requires_grad]
        return head_and_backbone_groups(params, self.model.head, config)

    def n_train(self) -> int:
        return len(self.train_idx)

    def set_train_mode(self) -> None:
        # Batch norm keeps its ImageNet statistics (the keras.io fine-tuning recipe): batch
        # statistics of 64 cached activations drift from the running ones and wreck validation.
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.k is not None:
            h = self.model.backbone.features_from(h, self.k)
        z = self.model.head(h)
        return z.squeeze(1) if z.shape[1] == 1 else z  # (n,) for one logit, (n, N) for N classes

    def train_step_logits(self, inputs):
        return self._logits(inputs)

    def train_batches(self, epoch):
        rng = np.random.default_rng([self.config.seed, epoch])
        order, batch_size = shard(rng.permutation(self.train_idx)), local_batch_size(self.config.batch_size)
        n_views = self.activations.shape[1]
        for start in range(0, len(order), batch_size):
            chunk = np.sort(order[start : start + batch_size])
            views = rng.integers(0, n_views, len(chunk))
            h = torch.from_numpy(np.asarray(self.activations[chunk, views], dtype=np.float32))
            yield h, self.labels[chunk]

    @torch.no_grad()
    def val_logits(self):
        self.model.eval()
        n_views = min(2, self.activations.shape[1]) if self.config.tta else 1
        out = []
        for start in range(0, len(self.val_idx), 256):
            chunk = self.val_idx[start : start + 256]
            z = sum(self._logits(torch.from_numpy(np.asarray(self.activations[chunk, v], dtype=np.float32)))
                    for v in range(n_views)) / n_views
            out.append(z.float())
        return torch.cat(out), self.labels[self.val_idx]


def make_task(cached, train_idx, val_idx, config: TrainConfig, classes: Sequence[str] = CLASS_NAMES) -> Task:
    """The task a strategy trains: whole network on pixels, or the top of a backbone on cached activations.

    The model's head has head_width(len(classes)) outputs: one logit for two classes, else one per class.
    """
    if config.strategy == Strategy.scratch:
        return PixelTask(model_for(config, num_classes=len(classes)), cached, train_idx, val_idx, config, classes)
    net = model_for(config, pretrained=True, num_classes=len(classes))
    if not isinstance(net, PretrainedClassifier):
        raise ConfigError(f"strategy {config.strategy!r} needs a pretrained backbone ({', '.join(pretrained_models())}), "
                         f"not {config.model}")
    if config.strategy == Strategy.linear:
        k = None
    else:
        n_blocks = net.backbone.n_blocks
        if not 1 <= config.unfreeze <= n_blocks:
            raise ConfigError(f"--unfreeze must be between 1 and {n_blocks}, got {config.unfreeze}")
        k = n_blocks - config.unfreeze
        if k == 0:
            return PixelTask(net, cached, train_idx, val_idx, config, classes)
    activations = cached_activations(net, k, cached, max(1, config.views), config)
    return CachedActivationTask(net, k, activations, cached.labels, train_idx, val_idx, config, classes)
