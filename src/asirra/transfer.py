"""Transfer learning from ImageNet: the frozen part of the backbone runs once per image.

On 2 cores the backbone's forward pass is the whole cost, so what does not change between epochs
is computed once and cached on disk (fp16, memory-mapped):

- linear: pooled 1280-d features; an epoch trains only the head, in seconds.
- finetune --unfreeze K: activations below the top K blocks; an epoch trains K blocks + head.
  Augmentation then happens before the cache: each image is cached in `views` versions
  (original, mirror, then random affine warps of the training recipe) and every epoch draws one.
- finetune with every block unfrozen: everything trains on freshly augmented pixels (no cache; slow on CPU).

The frozen part runs in ONNX Runtime, several times faster than eager PyTorch here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from asirra.augment import random_affine, to_float_batch
from asirra.cache import PREPROCESS_VERSION, FileLock, default_cache_dir
from asirra.export import export_onnx, onnx_session, run_onnx, state_fingerprint
from asirra.fileio import write_json_atomic
from asirra.models import LiteBackbone, PretrainedClassifier, create_model, image_size_of, pretrained_models


class BelowBlock(torch.nn.Module):
    """A backbone's stem and blocks[:k]: the frozen part when the top blocks fine-tune."""

    def __init__(self, backbone: LiteBackbone, k: int):
        super().__init__()
        self.stem, self.blocks, self.normalise = backbone.stem, backbone.blocks[:k], backbone.normalise

    def forward(self, x):
        h = self.stem(self.normalise(x))
        for block in self.blocks:
            h = block(h)
        return h


def frozen_part(net: PretrainedClassifier, k: int | None) -> torch.nn.Module:
    """What never changes during training: the whole backbone (k None), or the part below block k.

    Holds only frozen modules, so its fingerprint (the activation cache's key) and its ONNX
    export do not depend on the trainable top or the randomly initialised head.
    """
    return net.backbone if k is None else BelowBlock(net.backbone, k)


class CachedActivationTask:
    """Train the top of the backbone (or only the head) on cached activations of the frozen part."""

    def __init__(self, net: PretrainedClassifier, k: int | None, activations: np.ndarray, labels, train_idx, val_idx,
                 config):
        self.model, self.k, self.config = net, k, config
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
        from asirra.train import head_and_backbone_groups

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
        return self.model.head(h).squeeze(1)

    def train_step_logits(self, inputs):
        return self._logits(inputs)

    def train_batches(self, epoch):
        rng = np.random.default_rng([self.config.seed, epoch])
        order = rng.permutation(self.train_idx)
        n_views = self.activations.shape[1]
        for start in range(0, len(order), self.config.batch_size):
            chunk = np.sort(order[start : start + self.config.batch_size])
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


def make_transfer_task(cached, train_idx, val_idx, config):
    from asirra.train import PixelTask

    net = create_model(config.model, pretrained=True)
    if not isinstance(net, PretrainedClassifier):
        raise ValueError(f"strategy {config.strategy!r} needs a pretrained backbone ({', '.join(pretrained_models())}), "
                         f"not {config.model}")
    if config.strategy == "linear":
        k = None
    elif config.strategy == "finetune":
        n_blocks = net.backbone.n_blocks
        if not 1 <= config.unfreeze <= n_blocks:
            raise ValueError(f"--unfreeze must be between 1 and {n_blocks}, got {config.unfreeze}")
        k = n_blocks - config.unfreeze
        if k == 0:
            return PixelTask(net, cached, train_idx, val_idx, config)
    else:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose scratch, linear or finetune")
    activations = cached_activations(net, k, cached, max(1, config.views), config)
    return CachedActivationTask(net, k, activations, cached.labels, train_idx, val_idx, config)


def cached_activations(net: PretrainedClassifier, k: int | None, cached, views: int, config) -> np.ndarray:
    """(n, views, ...) fp16 outputs of the frozen part for every cached image; resumable."""
    folder = activation_cache_folder(net, k, cached, views, config)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "frozen.onnx"
    if not onnx_path.exists():
        export_onnx(frozen_part(net, k), onnx_path, image_size_of(config.model))
    session = onnx_session(onnx_path)

    sample = run_onnx(session, cached.pixels([0]))
    shape = (len(cached), views, *sample.shape[1:])
    data_path, progress_path = folder / "activations.npy", folder / "done.json"
    with FileLock(folder / "lock"):  # two runs sharing a backbone fill the cache in turn
        done = json.loads(progress_path.read_text())["rows"] if progress_path.exists() and data_path.exists() else 0
        if done < len(cached):
            _fill(session, cached, data_path, progress_path, done, shape, views, k, config)
    return np.load(data_path, mmap_mode="r")


def _fill(session, cached, data_path, progress_path, done, shape, views, k, config) -> None:
    store = np.lib.format.open_memmap(data_path, mode="r+" if done else "w+", dtype=np.float16, shape=shape)
    chunk_size = 64
    what = "features" if k is None else f"below block {k}"
    bar = tqdm(total=len(cached), initial=done, desc=f"backbone {what} ({views} views)", unit="img")
    for start in range(done, len(cached), chunk_size):
        stop = min(start + chunk_size, len(cached))
        pixels = cached.pixels(np.arange(start, stop))
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + start)  # same views after a resume
        for v in range(views):
            store[start:stop, v] = run_onnx(session, _view(pixels, v, config, generator))
        store.flush()
        # Progress is recorded only after the rows are on disk, so a killed run resumes exactly here.
        write_json_atomic(progress_path, {"rows": stop})
        bar.update(stop - start)
    bar.close()


def activation_cache_folder(net: PretrainedClassifier, k: int | None, cached, views: int, config) -> Path:
    """Keyed by everything the cached numbers depend on: recipe, frozen weights, image contents."""
    root = Path(config.cache_dir) if config.cache_dir else default_cache_dir()
    key = hashlib.blake2b(digest_size=10)
    key.update(json.dumps([PREPROCESS_VERSION, k, views, config.seed, vars(config.augment) if config.augment else None]).encode())
    key.update(state_fingerprint(frozen_part(net, k)).encode())
    key.update("".join(cached.keys).encode())
    return root / "activations" / key.hexdigest()


def _view(pixels: np.ndarray, v: int, config, generator) -> np.ndarray:
    if v == 0:
        return pixels
    if v == 1 or config.augment is None:
        return np.ascontiguousarray(pixels[:, :, ::-1])
    x = random_affine(to_float_batch(pixels, channels_last=False), config.augment, generator)
    return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
