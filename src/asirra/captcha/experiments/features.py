"""Frozen EfficientNet-Lite2 features of served images: computed once per (image, view), kept on disk.

Every probe rung of the ladder (bought-labels, bought-aug, residual, self-trained) is a linear
read-out of the same frozen ImageNet backbone, so the backbone's pass over an image is the whole
cost of building and scoring them. The store keeps the pooled 1280-d features of each image's
content (asirra.runs.content_key of its bytes) under each *view*: a counter-move spec
(asirra.captcha.attack.counter, "none" for the image as served) optionally followed by "|mirror".
A view's pixels are made exactly as `Classifier` makes them (`read_pixels` of the moved image), so
a head fitted here and saved with the backbone (`save_probe`) answers on served images as it
scores here (tests/test_bill_ladder.py checks it).

The store's folder is keyed by the backbone's weights and the libraries' versions (input_key):
features computed by other weights or another ONNX Runtime are never read back.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from asirra.runs import Key, content_key, input_key

log = logging.getLogger(__name__)

PROBE_MODEL = "effnet-lite2"
FEATURES_VERSION = 1
BATCH = 32


def view_pixels(data: bytes, view: str, size: int) -> np.ndarray:
    """uint8 (size, size, 3): `data` through the view's counter-move (then mirrored for "|mirror")."""
    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.images import read_pixels

    spec, _, flip = view.partition("|")
    pipeline = parse_preprocess(spec)
    pixels = read_pixels(pipeline.apply(data) if pipeline else data, size)
    if flip == "mirror":
        pixels = np.ascontiguousarray(pixels[:, ::-1])
    elif flip:
        raise ValueError(f"unknown view modifier {flip!r} in {view!r}")
    return pixels


class FeatureStore:
    """(image content, view) -> the frozen backbone's pooled features, in SQLite under `root`."""

    def __init__(self, root: str | Path, model: str = PROBE_MODEL):
        from asirra.export import state_fingerprint
        from asirra.models import create_model

        self.model = model
        self.template = create_model(model, pretrained=True).eval()  # ImageNet weights; probes get their own head
        self.size = self.template.backbone.size
        self.key: Key = input_key("features", version=FEATURES_VERSION, model=model, size=self.size,
                                  backbone=state_fingerprint(self.template.backbone))
        self.dir = Path(root) / "features" / self.key.hex
        self.dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.dir / "features.sqlite")
        self._db.execute("CREATE TABLE IF NOT EXISTS feature (key TEXT, view TEXT, vector BLOB, PRIMARY KEY (key, view))")
        self._session = None
        self.computed = 0  # views computed by this object (the rest were read back)

    def session(self):
        if self._session is None:
            from asirra.export import export_onnx, onnx_session

            path = self.dir / "backbone.onnx"
            if not path.exists():
                export_onnx(self.template.backbone, path, self.size)
            self._session = onnx_session(path)
        return self._session

    def get(self, images: Sequence[bytes], view: str, progress: bool = False) -> np.ndarray:
        """float32 (n, 1280) features of each image under `view`, computing only what is missing."""
        keys = [content_key(data) for data in images]
        found = self._lookup(set(keys), view)
        todo = [(k, data) for k, data in zip(keys, images) if k not in found]
        todo = list({k: data for k, data in todo}.items())  # one pass per distinct content
        if todo:
            from asirra.export import run_onnx

            bar = tqdm(total=len(todo), desc=f"features ({view})", unit="img", disable=not progress, leave=False)
            for start in range(0, len(todo), BATCH):
                chunk = todo[start:start + BATCH]
                pixels = np.stack([view_pixels(data, view, self.size) for _, data in chunk])
                vectors = run_onnx(self.session(), pixels).astype(np.float32)
                rows = [(k, view, v.astype(np.float16).tobytes()) for (k, _), v in zip(chunk, vectors)]
                self._db.executemany("INSERT OR REPLACE INTO feature VALUES (?, ?, ?)", rows)
                self._db.commit()
                found.update({k: v.astype(np.float16).astype(np.float32) for (k, _), v in zip(chunk, vectors)})
                self.computed += len(chunk)
                bar.update(len(chunk))
            bar.close()
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, 1280), np.float32)

    def _lookup(self, keys: set[str], view: str) -> dict[str, np.ndarray]:
        found, keys = {}, list(keys)
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i:i + 900]
            query = f"SELECT key, vector FROM feature WHERE view = ? AND key IN ({','.join('?' * len(chunk))})"
            for key, blob in self._db.execute(query, [view, *chunk]):
                found[key] = np.frombuffer(blob, dtype=np.float16).astype(np.float32)
        return found


# ---- linear heads --------------------------------------------------------------------------------


def fit_head(features: np.ndarray, labels: np.ndarray, c: float, seed: int = 0) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression on standardised features, folded back to the raw features:
    (w, b) with logit P(dog) = features @ w + b."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = features.mean(0), features.std(0) + 1e-6
    model = LogisticRegression(C=c, max_iter=3000, random_state=seed)
    model.fit((features - mean) / scale, labels)
    w = model.coef_[0] / scale
    return w.astype(np.float32), float(model.intercept_[0] - (mean * w).sum())


def save_probe(folder: Path, store: FeatureStore, w: np.ndarray, b: float, tta: bool, extra: dict) -> Path:
    """The backbone with the fitted head as a model folder `load_classifier` (and `asirra attack --model`) reads."""
    import copy

    import torch

    from asirra.models import ModelConfig, save_model

    net = copy.deepcopy(store.template)
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(w).reshape(net.head.weight.shape))
        net.head.bias.fill_(b)
    return save_model(net, ModelConfig(store.model, store.size, temperature=1.0, tta=tta, extra=extra), folder)
