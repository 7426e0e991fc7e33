"""Transfer learning from ImageNet: the frozen part of the backbone runs once per image, cached.

On 2 cores the backbone's forward pass is the whole cost, so what does not change between epochs
is computed once and cached on disk (fp16, memory-mapped):

- linear: pooled 1280-d features; an epoch trains only the head, in seconds.
- finetune --unfreeze K: activations below the top K blocks; an epoch trains K blocks + head.
  Augmentation then happens before the cache: each image is cached in `views` versions
  (original, mirror, then random affine warps of the training recipe) and every epoch draws one.
- finetune with every block unfrozen: everything trains on freshly augmented pixels (no cache; slow on CPU).

The frozen part runs in ONNX Runtime, several times faster than eager PyTorch here. The tasks
that train on these activations are in asirra.tasks.
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
from asirra.models import LiteBackbone, PretrainedClassifier, input_size


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


def cached_activations(net: PretrainedClassifier, k: int | None, cached, views: int, config) -> np.ndarray:
    """(n, views, ...) fp16 outputs of the frozen part for every cached image; resumable."""
    folder = activation_cache_folder(net, k, cached, views, config)
    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "frozen.onnx"
    if not onnx_path.exists():
        export_onnx(frozen_part(net, k), onnx_path, input_size(config))
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
