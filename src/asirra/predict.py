"""Inference: a Classifier over any model file, on PyTorch or ONNX Runtime, and prediction CSVs.

Every input goes through asirra.images.read_pixels, the same function that filled the training
cache, so train and predict see identical pixels. A model has N >= 2 classes (ModelConfig.classes).
As in scikit-learn, `predict_proba` is always (n, N), columns in the order of `classes`, and
`predict` gives each image's class name; a binary model keeps its single logit inside (column 1 is
P(class 1) = P(dog), exactly the calibrated sigmoid). The Kaggle submission is the cat/dog view.
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
from asirra.calibration import describe_row, predicted_index, predicted_labels, probabilities
from asirra.config import BACKENDS, DEFAULT_BACKEND
from asirra.cpu import KernelChoice
from asirra.deprecation import deprecated
from asirra.errors import ConfigError, ModelError
from asirra.fileio import atomic_path
from asirra.images import ImageSource, UnusableImage, read_pixels
from asirra.labels import CAT, CLASS_NAMES, is_cat_dog
from asirra.models import ModelConfig, default_model_path, load_model, resolve_model_folder


class TargetClassError(ModelError):
    """A CAPTCHA asks to select a class the model does not know."""


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
    """A trained model, ready to classify images: what `asirra.load_model` returns.

    The contract follows scikit-learn's classifiers: `predict_proba` is always (n, n_classes) with
    columns in the order of `classes`, and `predict` gives each image's class name. Every image goes
    through the same decoding the model was trained on (EXIF-upright RGB, squashed to a square), and
    the probabilities are calibrated (a temperature fitted on the model's validation images).

    Build one with `asirra.load_model`; the constructor is for models already in memory.

    Args:
        model: The PyTorch network (also used for Grad-CAM when the backend is ONNX).
        config: The model's settings as saved beside its weights (name, input size, classes, temperature).
        backend: "auto" (the model's int8 export when it has one, else fp32 ONNX), "onnx" (exact fp32),
            "onnx-int8" or "torch".
        folder: The model's folder, where its ONNX exports live.
        tta: Average each image with its mirror image; None uses what the model was validated with.
        kernels: For "onnx-int8", the int8 kernel path; None chooses it from this CPU's flags
            (`asirra.cpu.int8_kernels`: fast VNNI kernels where they are exact, else exact u8 x u8 ones).

    Attributes:
        classes: The class names in column order, e.g. ("cat", "dog").
        name: The architecture's registry name, e.g. "effnet-lite2".
        backend: The inference engine actually used ("auto" resolved).
        image_size: The side, in pixels, images are resized to.
        target: The class `solve` selects ("cat" unless `select` changed it).

    Examples:
        >>> model = asirra.load_model()
        >>> model.predict_proba(["cat.jpg", "dog.jpg"]).round(2)
        array([[0.99, 0.01],
               [0.02, 0.98]])
        >>> model.predict(["cat.jpg"])
        array(['cat'], dtype='<U3')
    """

    def __init__(self, model: torch.nn.Module, config: ModelConfig, backend: str = DEFAULT_BACKEND,
                 folder: Path | None = None, tta: bool | None = None, kernels: KernelChoice | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        backend = resolve_backend(backend, model, folder)
        self.model, self.config, self.backend, self.folder = model, config, backend, folder
        # The temperature was fitted on the logits the model was validated with: use the same by default.
        self.tta = config.tta if tta is None else tta
        self.name = config.name
        self.image_size = config.image_size
        self.classes = tuple(str(c) for c in config.classes)  # label order: column i of the probabilities
        self.target = CLASS_NAMES[CAT]  # what solve() selects; see select()
        self._pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
        # The int8 kernel path (asirra.cpu.KernelChoice): this machine's choice unless given (benchmarks compare both).
        self.kernels = kernels
        self._session = self._onnx_session() if backend.startswith("onnx") else None

    def __repr__(self) -> str:
        return f"Classifier({self.name!r}, classes={self.classes}, backend={self.backend!r})"

    # -- pixels in, logits out ---------------------------------------------------------------

    @property
    def is_cat_dog(self) -> bool:
        """Whether this is the cat/dog model (classes exactly ("cat", "dog")), whose column 1 is P(dog)."""
        return is_cat_dog(self.classes)

    @property
    def classes_(self) -> np.ndarray:
        """The class names in column order, as an array (scikit-learn's name for it)."""
        return np.array(self.classes)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """Raw logits (before the temperature) of decoded pixels, averaged with the mirror image if `tta`.

        Args:
            pixels: uint8 array of shape (n, image_size, image_size, 3), as `pixels` returns.

        Returns:
            (n,) for a two-class model (z = logit of P(class 1)), (n, n_classes) otherwise.
        """
        z = self._raw_logits(pixels)
        if self.tta:
            z = (z + self._raw_logits(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
        return z

    def _raw_logits(self, pixels: np.ndarray) -> np.ndarray:
        if self._session is not None:
            from asirra.export import run_onnx

            return _batch_first(run_onnx(self._session, pixels).astype(np.float64), len(pixels))
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            return _batch_first(self.model(x).double().numpy(), len(pixels))

    def proba_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities from raw logits.

        Args:
            logits: What `logits` returns.

        Returns:
            (n, n_classes) probabilities; columns [1 - p, p] for a two-class model.
        """
        return probabilities(logits, self.config.temperature)

    # -- images in ---------------------------------------------------------------------------

    def pixels(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Decode images as the model sees them, in parallel.

        Args:
            sources: Paths, bytes or PIL images.

        Returns:
            uint8 array of shape (n, image_size, image_size, 3).

        Raises:
            UnusableImage: An image cannot be decoded; the message names its position and why.
        """

        def read(indexed):
            i, source = indexed
            try:
                return read_pixels(source, self.image_size)
            except UnusableImage as exc:
                raise UnusableImage(exc.reason, f"image {i + 1} of {len(sources)} ({exc.name})") from None

        return np.stack(list(self._pool.map(read, enumerate(sources))))

    def predict_proba(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Calibrated class probabilities of each image.

        Args:
            sources: A list of images: file paths, encoded bytes or PIL images.

        Returns:
            Array of shape (n, n_classes), columns in the order of `classes`; each row sums to 1.
            For the cat/dog model, column 1 is P(dog).

        Raises:
            UnusableImage: An image cannot be decoded; the message names which and why.
            TypeError: A single image was given instead of a list.

        Examples:
            >>> model.predict_proba(["a.jpg", "b.jpg"]).shape
            (2, 2)
        """
        _check_list(sources, "predict_proba")
        if len(sources) == 0:
            return np.zeros((0, len(self.classes)))
        return self.proba_from_logits(self.logits(self.pixels(sources)))

    def predict(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """The class name of each image, by the package's one decision rule.

        For the cat/dog model that is P(dog) >= 0.5; for N classes, the most probable one.

        Args:
            sources: A list of images: file paths, encoded bytes or PIL images.

        Returns:
            Array of shape (n,) of class names, each one of `classes`.
        """
        return np.array(self.classes)[predicted_index(self.predict_proba(sources))] if len(sources) else np.array([])

    @deprecated(since="0.1.0", removed_in="0.3.0", instead="Classifier.predict_proba, which is (n, N) for every model")
    def predict_classes_proba(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """The same as `predict_proba`.

        Args:
            sources: A list of images: file paths, encoded bytes or PIL images.

        Returns:
            Array of shape (n, n_classes).
        """
        return self.predict_proba(sources)

    def explain(self, sources: Sequence[ImageSource], *, target: str | None = None) -> np.ndarray:
        """Grad-CAM maps: where in each image the model found its evidence.

        A forward and a backward pass through the PyTorch network (whatever the backend), so the
        maps explain the same weights that answer. `asirra.explain` draws them over the photos and
        writes the pictures; this method returns the numbers.

        Args:
            sources: A list of images: file paths, encoded bytes or PIL images.
            target: Explain this class's evidence in every image; None explains each image's
                predicted class.

        Returns:
            float32 array of shape (n, image_size, image_size) in [0, 1], each map scaled to its own
            peak (all zeros where the image holds no evidence for the class).

        Raises:
            ModelError: `target` is not one of `classes`.
        """
        from asirra.gradcam import gradcam

        _check_list(sources, "explain")
        if target is not None and target not in self.classes:
            raise ModelError(f"no class {target!r} to explain: the model's classes are {', '.join(self.classes)}")
        if len(sources) == 0:
            return np.zeros((0, 0, 0), np.float32)
        targets = None if target is None else [self.classes.index(target)] * len(sources)
        return gradcam(self.model, self.pixels(sources), targets=targets, tta=self.tta).maps.astype(np.float32)

    def target_index(self, target: str | None = None) -> int:
        """The column of the class a CAPTCHA selects.

        Args:
            target: A class name; None means `self.target` ("cat" by default).

        Returns:
            The index of `target` in `classes`.

        Raises:
            TargetClassError: The model has no such class.
        """
        target = self.target if target is None else target
        if target not in self.classes:
            raise TargetClassError(f"{self.name} cannot select every {target!r}: its classes are "
                                   f"{', '.join(self.classes)}; choose one of them as the target")
        return self.classes.index(target)

    def select(self, target: str) -> "Classifier":
        """Make `solve` select every `target` image from now on.

        Args:
            target: One of `classes`, e.g. "dog" for a CAPTCHA that asks for the dogs.

        Returns:
            This classifier, so calls chain.

        Raises:
            TargetClassError: The model has no such class.
        """
        self.target_index(target)
        self.target = target
        return self

    def solve(self, sources: Sequence[ImageSource], target: str | None = None) -> list[bool]:
        """Answer a CAPTCHA challenge: which images show the target class.

        Args:
            sources: The challenge's images (12 for Asirra): paths, encoded bytes or PIL images.
            target: The class to select; None means `self.target` ("cat" by default).

        Returns:
            One bool per image, True where the model calls it the target class.
        """
        index = self.target_index(target)
        calls = predicted_index(self.predict_proba(sources))
        return [bool(call == index) for call in calls]

    # -- ONNX --------------------------------------------------------------------------------

    def _onnx_session(self):
        from asirra.cpu import int8_kernels
        from asirra.export import onnx_session

        self.kernels = self.kernels or int8_kernels()
        return onnx_session(self.onnx_path(), kernels=self.kernels)

    @property
    def engine(self) -> dict:
        """What computes the answers: the backend, its kernel path and threads (what `--json` and benchmarks report).

        kernels: for onnx-int8 the int8 kernel path (asirra.cpu: "avx512-vnni", "exact-u8u8", ...) and why;
        "fp32" for fp32 ONNX, "torch" for PyTorch.
        """
        if self._session is None:
            return {"backend": self.backend, "kernels": "torch", "threads": torch.get_num_threads(),
                    "torch": torch.__version__}
        import onnxruntime

        options = self._session.get_session_options()
        engine = {"backend": self.backend, "kernels": "fp32", "threads": options.intra_op_num_threads,
                  "onnxruntime": onnxruntime.__version__}
        if self.backend == "onnx-int8":
            engine.update(kernels=self.kernels.path, exact_int8=self.kernels.exact, reason=self.kernels.reason)
        return engine

    def onnx_path(self) -> Path:
        """The model's ONNX file: the export beside the weights if made from them, else one cached per weights.

        An int8 file needs calibration images, so it is never made on the fly: `asirra export --int8`.
        """
        from asirra.export import export_onnx, onnx_beside_weights, state_fingerprint

        exported = onnx_beside_weights(self.model, self.folder, self.backend)
        if exported is not None:
            return exported
        if self.backend == "onnx-int8":
            raise ModelError(f"no int8 export of this model in {self.folder}; make one with "
                             "`asirra export --model FOLDER --int8 --calibration IMAGES`")
        path = default_cache_dir() / "onnx" / f"{self.name}-{state_fingerprint(self.model)}.onnx"
        if not path.exists():
            export_onnx(self.model, path, self.image_size, output_name="logit")
        return path


def _batch_first(z: np.ndarray, n: int) -> np.ndarray:
    """A network's output as (n,) for one logit per image, else (n, N)."""
    z = z.reshape(n, -1)
    return z[:, 0] if z.shape[1] == 1 else z


def _check_list(sources, method: str) -> None:
    if isinstance(sources, (str, bytes, os.PathLike)):
        raise TypeError(f"{method} takes a list of images; wrap a single image in a list")


def load_classifier(model: str | os.PathLike | None = None, backend: str = DEFAULT_BACKEND,
                    tta: bool | None = None) -> Classifier:
    """A classifier from a run folder or model file; None means the default model in the package.

    Public as `asirra.load_model`, which documents the arguments.
    """
    folder = resolve_model_folder(model) if model is not None else default_model_path()
    net, config = load_model(folder)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return Classifier(net, config, backend=backend, folder=folder, tta=tta)


# ---- many images: folders, evaluation, submissions -----------------------------------------


@dataclass
class Predictions:
    refs: list  # the usable ImageRefs, in order
    proba: np.ndarray  # (n, N) calibrated class probabilities, columns in the order of `classes`
    logits: np.ndarray  # raw: (n,) for two classes, (n, N) otherwise
    unusable: list[dict] = field(default_factory=list)  # {"path", "reason"}
    classes: tuple[str, ...] = CLASS_NAMES

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.refs], dtype=np.int64)

    @property
    def p_dog(self) -> np.ndarray:
        """P(class 1) of a two-class model (P(dog) for cat/dog): exactly the calibrated sigmoid."""
        if self.proba.shape[1] != 2:
            raise ValueError(f"P(dog) is a two-class figure; these predictions have {self.proba.shape[1]} classes")
        return self.proba[:, 1]

    @property
    def predicted(self) -> np.ndarray:
        """Each image's predicted class index (the package's one decision rule)."""
        return predicted_index(self.proba)


def predict_refs(clf: Classifier, refs: Sequence, batch_size: int = 64, progress: bool = True) -> Predictions:
    """Class probabilities (and P(dog) for cat/dog) for every readable ref; unreadable ones are skipped and
    reported, never fatal."""
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
    n_classes = len(clf.classes)
    z = np.concatenate(logits) if logits else np.zeros(0 if n_classes == 2 else (0, n_classes))
    return Predictions(usable, clf.proba_from_logits(z), z, unusable, clf.classes)


def plot_predictions(preds: Predictions, out: Path, n: int = 24, title: str | None = None) -> Path:
    """A grid of the first `n` predictions, each titled with its name, class and confidence."""
    from asirra.plots import plot_image_grid

    shown = range(min(n, len(preds.refs)))
    titles = [f"{preds.refs[i].name}: {describe_row(preds.proba[i], preds.classes)}" for i in shown]
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


def write_class_predictions(ids: Sequence[str], proba: np.ndarray, classes: Sequence[str], out: Path,
                            with_proba: bool = False) -> Path:
    """id,label with the predicted class NAME (any model), and with `with_proba` one p_<class> column per
    class (unclipped: this is not a Kaggle leaderboard). Rows sorted by numeric id, as submissions are."""
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != (len(ids), len(classes)):
        raise ValueError(f"{len(ids)} ids and {len(classes)} classes but probabilities of shape {proba.shape}")
    order = sorted(range(len(ids)), key=lambda i: _id_sort_key(ids[i]))
    calls = predicted_index(proba) if len(ids) else np.zeros(0, np.int64)
    with atomic_path(Path(out)) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"] + ([f"p_{c}" for c in classes] if with_proba else []))
        for i in order:
            # 8 significant digits: a row of N printed probabilities still sums to 1 within 1e-7 * N.
            writer.writerow([ids[i], classes[calls[i]]] + ([f"{p:.8g}" for p in proba[i]] if with_proba else []))
    return Path(out)


def write_predictions(preds: Predictions, out: Path, proba: bool = False) -> Path:
    """The CSV `asirra predict` writes: Kaggle's cat/dog submission (id,label, 1 = dog; with `proba` clipped
    P(dog)) for the cat/dog model, else id,label with the class name (with `proba`, p_<class> columns);
    the id is the file's Kaggle id, or its path below the folder when those ids repeat."""
    ids = [r.id for r in preds.refs]
    if is_cat_dog(preds.classes):
        return write_submission(ids, preds.p_dog, out, proba=proba)
    if len(set(ids)) < len(ids):  # class folders may each hold a 1.png: their paths below the root are unique
        ids = [r.name for r in preds.refs]
    return write_class_predictions(ids, preds.proba, preds.classes, out, with_proba=proba)


def _id_sort_key(image_id: str):
    return (0, int(image_id), "") if str(image_id).isdigit() else (1, 0, str(image_id))
