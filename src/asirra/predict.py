"""Inference: a Classifier over any model file, on PyTorch or ONNX Runtime, and Kaggle submissions.

Every input goes through asirra.images.read_pixels, the same function that filled the training
cache, so train and predict see identical pixels.
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from asirra.cache import default_cache_dir
from asirra.config import BACKENDS, DEFAULT_BACKEND
from asirra.calibration import apply_temperature, describe, is_cat, predicted_labels
from asirra.images import ImageSource, UnusableImage, read_pixels
from asirra.fileio import atomic_path
from asirra.models import ModelConfig, load_model, resolve_model_folder

DEFAULT_MODEL_DIR = Path(__file__).parent / "weights"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL_DIR / "model.json").exists():
        raise ValueError("the default model is missing from this installation; pass --model or run `make model`")
    return DEFAULT_MODEL_DIR


def resolve_backend(backend: str, model: torch.nn.Module, folder: Path | None) -> str:
    """The engine a backend name means for this model: only "auto" (DEFAULT_BACKEND) needs resolving.

    "auto" is the fastest shipped engine: the int8 export if `folder` holds one made from exactly
    these weights (it is never made on the fly: it needs calibration images), else fp32 ONNX.
    """
    if backend != "auto":
        return backend
    from asirra.export import onnx_beside_weights

    return "onnx-int8" if onnx_beside_weights(model, folder, "onnx-int8") is not None else "onnx"


class Classifier:
    """P(dog) for images: `predict_proba(sources)`, and `solve(sources)` for a CAPTCHA challenge."""

    def __init__(self, model: torch.nn.Module, config: ModelConfig, backend: str = DEFAULT_BACKEND, folder: Path | None = None,
                 tta: bool | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        backend = resolve_backend(backend, model, folder)
        self.model, self.config, self.backend, self.folder = model, config, backend, folder
        # The temperature was fitted on the logits the model was validated with: use the same by default.
        self.tta = config.tta if tta is None else tta
        self.name = config.name
        self.image_size = config.image_size
        self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
        self._session = self._onnx_session() if backend.startswith("onnx") else None

    # -- pixels in, logits out ---------------------------------------------------------------

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> raw logits (before temperature), averaged with the mirror if tta."""
        z = self._raw_logits(pixels)
        if self.tta:
            z = (z + self._raw_logits(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
        return z

    def _raw_logits(self, pixels: np.ndarray) -> np.ndarray:
        if self._session is not None:
            from asirra.export import run_onnx

            return run_onnx(self._session, pixels).astype(np.float64).reshape(-1)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            return self.model(x).double().numpy().reshape(-1)

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        return apply_temperature(logits, self.config.temperature)

    # -- images in ---------------------------------------------------------------------------

    def pixels(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Decode a batch in parallel; an unreadable image raises UnusableImage naming its position."""

        def read(indexed):
            i, source = indexed
            try:
                return read_pixels(source, self.image_size)
            except UnusableImage as exc:
                raise UnusableImage(exc.reason, f"image {i + 1} of {len(sources)} ({exc.name})") from None

        return np.stack(list(self._pool.map(read, enumerate(sources))))

    def predict_proba(self, sources: Sequence[ImageSource]) -> np.ndarray:
        if isinstance(sources, (str, bytes, os.PathLike)):
            raise TypeError("predict_proba takes a list of images; wrap a single image in a list")
        if len(sources) == 0:
            return np.zeros(0)
        return self.proba_from_logits(self.logits(self.pixels(sources)))

    def solve(self, sources: Sequence[ImageSource]) -> list[bool]:
        """Which of the challenge images are cats (the package's one threshold rule)."""
        return is_cat(self.predict_proba(sources))

    # -- ONNX --------------------------------------------------------------------------------

    def _onnx_session(self):
        from asirra.export import onnx_session

        return onnx_session(self.onnx_path())

    def onnx_path(self) -> Path:
        """The model's ONNX file: the export beside the weights if made from them, else one cached per weights.

        An int8 file needs calibration images, so it is never made on the fly: `asirra export --int8`.
        """
        from asirra.export import export_onnx, onnx_beside_weights, state_fingerprint

        exported = onnx_beside_weights(self.model, self.folder, self.backend)
        if exported is not None:
            return exported
        if self.backend == "onnx-int8":
            raise ValueError(f"no int8 export of this model in {self.folder}; make one with "
                             "`asirra export --model FOLDER --int8 --calibration IMAGES`")
        path = default_cache_dir() / "onnx" / f"{self.name}-{state_fingerprint(self.model)}.onnx"
        if not path.exists():
            export_onnx(self.model, path, self.image_size, output_name="logit")
        return path


def load_classifier(model: str | os.PathLike | None = None, backend: str = DEFAULT_BACKEND, tta: bool | None = None) -> Classifier:
    """A classifier from a run folder or model file; None means the default model in the package."""
    folder = resolve_model_folder(model) if model is not None else default_model_path()
    net, config = load_model(folder)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return Classifier(net, config, backend=backend, folder=folder, tta=tta)


# ---- many images: folders, evaluation, submissions -----------------------------------------


@dataclass
class Predictions:
    refs: list  # the usable ImageRefs, in order
    p_dog: np.ndarray
    logits: np.ndarray
    unusable: list[dict] = field(default_factory=list)  # {"path", "reason"}

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.refs], dtype=np.int64)


def predict_refs(clf: Classifier, refs: Sequence, batch_size: int = 64, progress: bool = True) -> Predictions:
    """P(dog) for every readable ref; unreadable ones are skipped and reported, never fatal."""
    from tqdm import tqdm

    def read(ref):
        try:
            return read_pixels(ref.read_bytes(), clf.image_size), None
        except UnusableImage as exc:
            return None, exc.reason
        except OSError as exc:
            return None, f"cannot read ({exc})"

    usable, logits, unusable = [], [], []
    bar = tqdm(total=len(refs), desc=f"classifying ({clf.backend})", unit="img", disable=not progress)
    for start in range(0, len(refs), batch_size):
        chunk = refs[start : start + batch_size]
        batch = []
        for ref, (pixels, reason) in zip(chunk, clf._pool.map(read, chunk)):
            if pixels is None:
                unusable.append({"path": ref.source, "reason": reason})
            else:
                usable.append(ref)
                batch.append(pixels)
        if batch:
            logits.append(clf.logits(np.stack(batch)))
        bar.update(len(chunk))
    bar.close()
    z = np.concatenate(logits) if logits else np.zeros(0)
    return Predictions(usable, clf.proba_from_logits(z), z, unusable)


def plot_predictions(preds: Predictions, out: Path, n: int = 24, title: str | None = None) -> Path:
    """A grid of the first `n` predictions, each titled with its name, class and confidence."""
    from asirra.plots import plot_image_grid

    shown = range(min(n, len(preds.refs)))
    titles = [f"{preds.refs[i].name}: {describe(p)}"
              for i, p in zip(shown, preds.p_dog)]
    images = [read_pixels(preds.refs[i].read_bytes(), 160) for i in shown]
    return plot_image_grid(images, titles, out, title=title)


# Kaggle scores log loss on clipped probabilities; clipping here too keeps one confident
# mistake from costing more than it must.
SUBMISSION_CLIP = 0.005


def write_submission(ids: Sequence[str], p_dog: np.ndarray, out: Path, proba: bool = False) -> Path:
    """Kaggle's id,label (1 = dog), rows sorted by numeric id; label is clipped P(dog) with proba."""
    rows = sorted(zip(ids, p_dog), key=lambda row: _id_sort_key(row[0]))
    with atomic_path(Path(out)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        for image_id, p in rows:
            label = f"{np.clip(p, SUBMISSION_CLIP, 1 - SUBMISSION_CLIP):.6f}" if proba else int(predicted_labels(p))
            writer.writerow([image_id, label])
    return Path(out)


def _id_sort_key(image_id: str):
    return (0, int(image_id), "") if str(image_id).isdigit() else (1, 0, str(image_id))
