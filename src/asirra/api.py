"""The home of the public functions and their result types. Import them from `asirra` (and
`asirra.captcha`), which load this module on first use; this module's own name is not promised.

Each function converts its arguments, calls the one internal pipeline that does the work, and
wraps what it returns. The command line calls the same functions, so what `asirra train` does and
what `asirra.training` does cannot drift apart. Heavy imports (torch, FastAPI) happen here, which is
why `import asirra` does not import this module until a name from it is asked for.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asirra.captcha.attack.bot import DEFAULT_MAX_WAIT, AttackError, AttackReport
from asirra.captcha.challenge import SIMULATED_CHALLENGES
from asirra.captcha.defend.config import HardenConfig, parse_epsilon
from asirra.captcha.defend.derived_pool import DerivedPoolSummary, labelled_sample
from asirra.captcha.experiments.study import StudyConfig, StudyResult, quick_config, run_study
from asirra.captcha.service.settings import DEFAULT_SAFEGUARD, ServiceSettings
from asirra.config import DEFAULT_BACKEND, AugmentConfig, TrainConfig, read_config_file
from asirra.errors import ConfigError, UserError, require
from asirra.gradcam import ExplainReport
from asirra.images import ImageSource
from asirra.predict import Classifier, load_classifier

try:  # the service is an optional extra (asirra[serve]); create_app says so in one line when it is missing
    from fastapi import FastAPI
except ImportError:  # pragma: no cover - the annotation stays a name
    FastAPI = Any  # type: ignore[misc,assignment]

PathLike = str | os.PathLike
"""A path: a string or anything `os.fspath` takes (a `TrainResult` is one: its run folder)."""


# ---- models ---------------------------------------------------------------------------------


def load_model(model: PathLike | None = None, *, backend: str = DEFAULT_BACKEND, tta: bool | None = None) -> Classifier:
    """Load a trained model, ready to predict.

    The model shipped with asirra (EfficientNet-Lite2 fine-tuned on the Kaggle photos, 99.4% on its
    validation images) needs no file: call `load_model()`. Anything `asirra train` wrote loads by its
    run folder; a model folder or its weights file works too. Model files are never unpickled:
    safetensors weights and a JSON config, rebuilt through the model registry.

    Args:
        model: A run folder, a model folder or a `.safetensors` file; None loads the shipped model.
        backend: "auto" runs the model's int8 ONNX export when its folder has one made from exactly its
            weights (the shipped model does: about 2.5x faster than fp32, as accurate), else fp32 ONNX;
            "onnx" is exact fp32 (equal to PyTorch to ~1e-6), "onnx-int8" insists on int8, "torch" runs
            PyTorch.
        tta: Average each image with its mirror image; None uses what the model was validated with.

    Returns:
        A `Classifier`: `predict`, `predict_proba`, `explain`, `solve`.

    Raises:
        ModelError: No model at that path, or a file that is not one.

    Examples:
        >>> model = asirra.load_model()
        >>> model.classes
        ('cat', 'dog')
        >>> seed = asirra.load_model("runs/seed-cnn", backend="torch")
    """
    return load_classifier(None if model is None else os.fspath(model), backend=backend, tta=tta)


def _classifier(model: Classifier | PathLike | None, **options: Any) -> Classifier:
    """`model` as given when it is already loaded, else loaded from its folder (None: the shipped model)."""
    return model if isinstance(model, Classifier) else load_classifier(
        None if model is None else os.fspath(model), **options)


@functools.lru_cache(maxsize=4)
def _cached_classifier(model: str | None, backend: str) -> Classifier:
    # Loading verifies the weights and opens an ONNX session (~1 s): once per model, not per call.
    return load_classifier(model, backend=backend)


def solve(images: Sequence[ImageSource], model: PathLike | None = None, backend: str = DEFAULT_BACKEND) -> list[bool]:
    """Answer an Asirra challenge: which of the images are cats.

    The model is loaded once and kept for later calls. On the shipped model's validation images,
    a 12-image challenge is solved 92.9% of the time (99.4% per image); one call on 12 JPEG files
    takes 52-56 ms on two quiet CPU cores with VNNI (about twice that without VNNI, or with backend="onnx").

    Args:
        images: The challenge's images (Asirra shows 12): file paths, encoded bytes or PIL images.
        model: A run folder or model file; None uses the shipped model.
        backend: As for `load_model`; "onnx" gives exact fp32 answers (about 2.2x slower than the
            default int8 on a CPU with VNNI).

    Returns:
        One bool per image, True where the model sees a cat.

    Raises:
        UnusableImage: An image cannot be decoded; the message names which and why.

    Examples:
        >>> asirra.solve(["a.jpg", open("b.jpg", "rb").read()])
        [True, False]
    """
    return _cached_classifier(None if model is None else os.fspath(model), backend).solve(images)


def engine(model: PathLike | None = None, backend: str = DEFAULT_BACKEND) -> dict[str, Any]:
    """What `solve(images, model, backend)` runs on, for benchmarks and bug reports.

    Args:
        model: As for `solve`.
        backend: As for `solve`.

    Returns:
        {"backend", "kernels", "threads", ...}. For the int8 backend "kernels" is the int8 kernel path
        chosen for this CPU ("avx512-vnni", "avx-vnni", "amx": fast; "exact-u8u8" on CPUs without VNNI, or
        when ASIRRA_INT8_KERNELS=exact) and "reason" says why.

    Examples:
        >>> asirra.engine()["kernels"]
        'avx512-vnni'
    """
    return _cached_classifier(None if model is None else os.fspath(model), backend).engine


# ---- data -----------------------------------------------------------------------------------


def check_data(data: PathLike | None = None, /, *, workers: int = 2) -> dict[str, Any]:
    """Decode every image of a data set and report what is there.

    Any layout asirra reads: Kaggle's `train/cat.N.jpg`, Microsoft's PetImages (folder or zip), or one
    folder per class. An image that cannot be used (empty, truncated, not an image, a decompression
    bomb) is listed with its reason, never fatal; training and evaluation skip the same files.

    Args:
        data: A folder or .zip of images; None looks in `$ASIRRA_DATA`, `./data/dogs-vs-cats`, then
            `../shared/datasets/dogs-vs-cats`.
        workers: Decoding threads.

    Returns:
        What `asirra data check --json` prints: "path", "layout", "n_images", "n_usable", "per_class"
        (counts in label order), "unusable" (each {"path", "reason"}) and "size" (min / median / max of
        width and height).

    Raises:
        DataNotFound: No data at `data`, or nowhere it was looked for.

    Examples:
        >>> report = asirra.check_data("data/dogs-vs-cats")
        >>> report["per_class"]
        {'cat': 9500, 'dog': 9500, 'unlabelled': 500}
    """
    from asirra.data import check_folder

    return check_folder(data, workers=workers).to_json()


def show_data(data: PathLike | None = None, /, *, n: int = 16, seed: int = 0,
              out: PathLike = "runs/data/sample.png") -> Path:
    """Draw a grid of randomly chosen images, each titled with its class and id.

    Args:
        data: A folder or .zip of images; None looks where `check_data` looks.
        n: How many images.
        seed: Which random sample.
        out: The PNG file to write.

    Returns:
        The PNG's path (in a notebook: `IPython.display.Image(path)`).
    """
    from asirra.data import show_folder

    return show_folder(data, out, n=n, seed=seed)


# ---- training -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    """A finished training run: its folder, read on demand.

    A `TrainResult` is path-like (`os.fspath(result)` is the run folder), so it goes wherever a run
    folder does: `load_model(result)`, `evaluate(result, split=result)`, a surrogate of `harden`.

    The folder holds `config.json` (every setting: `train(config=...)` reruns it), `env.json`,
    `split.json` (which images validated), `metrics.csv` (one row per epoch), `curves.png`,
    `checkpoint.pt` (for `resume=True`), `model/` (the best epoch, calibrated), `metrics.json` and
    `val_predictions.csv`.

    Examples:
        >>> run = asirra.train("data/dogs-vs-cats/train", model="seed-cnn", epochs=8, limit=3000)
        >>> run.metrics["val"]["accuracy"]
        0.758
        >>> run.files["curves"]
        PosixPath('runs/train/curves.png')
    """

    run: Path
    """The run folder."""

    def __fspath__(self) -> str:
        return str(self.run)

    @property
    def config(self) -> TrainConfig:
        """The run's settings, as recorded in its `config.json`."""
        return TrainConfig.from_dict(read_config_file(self.run / "config.json"))

    @property
    def metrics(self) -> dict[str, Any]:
        """The kept epoch's validation figures: "val" (calibrated), "val_uncalibrated", "temperature"."""
        return json.loads((self.run / "metrics.json").read_text())

    @property
    def history(self) -> list[dict[str, float]]:
        """One row per epoch (`metrics.csv`): epoch, train and validation loss and accuracy, learning rate, seconds."""
        with open(self.run / "metrics.csv", newline="") as f:
            return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]

    @property
    def model_dir(self) -> Path:
        """The folder of the kept model (weights and `model.json`)."""
        return self.run / "model"

    @property
    def files(self) -> dict[str, Path]:
        """The run's files that exist, by name: "config", "curves", "metrics", "history", "val_predictions",
        "split", "timings", "model"."""
        names = {"config": "config.json", "curves": "curves.png", "metrics": "metrics.json", "history": "metrics.csv",
                 "val_predictions": "val_predictions.csv", "split": "split.json", "timings": "timings.json",
                 "model": "model"}
        return {key: self.run / name for key, name in names.items() if (self.run / name).exists()}

    def load_model(self, backend: str = DEFAULT_BACKEND) -> Classifier:
        """The run's kept model, as `asirra.load_model(run)` loads it.

        Args:
            backend: As for `asirra.load_model` ("auto" is fp32 ONNX until the model is exported to int8).

        Returns:
            A `Classifier`.
        """
        return load_model(self.run, backend=backend)


class TrainingFailed(UserError):
    """A data-parallel run whose processes failed; `exit_code` is torchrun's."""

    def __init__(self, exit_code: int):
        super().__init__(f"distributed training failed (torchrun exit code {exit_code})")
        self.exit_code = exit_code


_AUGMENT_DEFAULT = asdict(AugmentConfig())


def resolve_train_config(config: TrainConfig | PathLike | None, data: PathLike | None, out: PathLike | None,
                         options: dict[str, Any], default_out: str = "runs/train") -> TrainConfig:
    """The TrainConfig of a `train` or `cross_validate` call (and of `asirra train` / `asirra cv`).

    `config` (an object or a config JSON) is the base; `options` override its fields; `augment` may be
    True / False. `data` and `out`, when given, override the config's; a config without them gets the
    data lookup (its train/ folder) and `default_out`.
    """
    from asirra.data import labelled_root

    valid = {f.name for f in fields(TrainConfig)} - {"data", "out"}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown training option {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if isinstance(config, TrainConfig):
        settings = config.to_dict()
    else:
        settings = read_config_file(config) if config is not None else {}
    options = dict(options)
    if isinstance(options.get("augment"), bool):
        options["augment"] = _AUGMENT_DEFAULT if options["augment"] else None
    settings.update(options)
    if data is not None or "data" not in settings:
        settings["data"] = str(labelled_root(None if data is None else os.fspath(data)))
    if out is not None or "out" not in settings:
        settings["out"] = os.fspath(out) if out is not None else default_out
    return TrainConfig.from_dict(settings)


def train(data: PathLike | None = None, /, *, config: TrainConfig | PathLike | None = None, out: PathLike | None = None,
          resume: bool = False, nproc: int = 1, **options: Any) -> TrainResult:
    """Train a network on a folder of labelled images.

    One training loop for every recipe: the notebook's CNN from scratch (`model="seed-cnn"`, 128 px,
    augmentation, early stopping and learning-rate cuts on plateau, as in Keras), or transfer learning
    from ImageNet (`model="effnet-lite0"` / `"effnet-lite2"` with `strategy="linear"` or `"finetune"`,
    on cached backbone activations). A stratified 20% of the images validate; the epoch with the
    lowest validation loss is kept, its temperature fitted (calibrated probabilities), and saved in
    `out/model`. Two classes (cats and dogs) train one logit; N >= 3 class folders an N-way softmax.

    Args:
        data: Labelled images: Kaggle's `cat.N.jpg` / `dog.N.jpg`, PetImages, or one folder per class.
            None uses the config's data, else the data lookup (as `check_data`) and its `train/` folder.
        config: A `TrainConfig`, or a config JSON (a run's `config.json`, `tune`'s `best_config.json`);
            `options` override its fields.
        out: The run folder; None uses the config's, else "runs/train".
        resume: Continue the run in `out` from its last completed epoch (it may train longer, never on
            other data or otherwise).
        nproc: Data-parallel processes on this machine (torch.distributed under torchrun); each takes
            `batch_size / nproc` of every batch, so a recipe means the same with any number.
        **options: Any `TrainConfig` field: `model`, `epochs`, `limit` (a stratified subset),
            `strategy`, `lr`, `batch_size`, `image_size`, `augment` (True / False), `seed`, ...

    Returns:
        A `TrainResult`: the run folder, its metrics, its per-epoch history and its files.

    Raises:
        ConfigError: An unknown option or a setting that cannot work; the message says which.
        RunFolderError: `out` already holds a run (pass `resume=True` or another `out`).

    Examples:
        >>> run = asirra.train("data/dogs-vs-cats/train", model="seed-cnn", epochs=8, limit=3000, out="runs/seed")
        >>> probe = asirra.train(model="effnet-lite2", strategy="linear", views=1, out="runs/probe")
        >>> again = asirra.train(config=run.files["config"], epochs=30, out="runs/seed-30")
    """
    from asirra.training import train as train_run
    from asirra.training import train_on_processes

    settings = resolve_train_config(config, data, out, options)
    if nproc > 1:
        code = train_on_processes(settings, resume, nproc)
        if code:
            raise TrainingFailed(code)
    else:
        train_run(settings, resume=resume)
    return TrainResult(Path(settings.out))


def cross_validate(data: PathLike | None = None, /, *, config: TrainConfig | PathLike | None = None,
                   out: PathLike = "runs/cv", folds: int = 5, train_fraction: float = 1.0, hamming: int | None = None,
                   suspects: int = 24, drop_from_training: PathLike | None = None, **options: Any) -> dict[str, Any]:
    """Cross-validate one training recipe on k stratified folds.

    Copies and near-copies of a photo (by perceptual hash and correlation) always share a fold, so no
    fold validates on a picture it trained on. Every image is validated exactly once: its out-of-fold
    prediction (`oof.csv`) is honest, and the most confident disagreements with the labels
    (`suspects.csv`, `suspects.png`) are the likeliest label errors. Rerun the same call to resume.

    Args:
        data: Labelled images, as for `train`.
        config: A `TrainConfig` or config JSON, as for `train` (its run folder is not used).
        out: The folder for `folds.json`, `fold-K/` run folders, `oof.csv`, `suspects.*`, `cv.json`, `cv.png`.
        folds: Number of folds (k).
        train_fraction: Train each fold on this stratified share of its training images (validation
            folds unchanged): a learning curve, one point per call.
        hamming: dHash bits near-identical images may differ by (default 6).
        suspects: How many of the most confident label disagreements to list and draw.
        drop_from_training: A CSV with a `key` column (e.g. a `suspects.csv`): never train on those
            images; they are still validated in their fold, so the scores stay comparable.
        **options: `TrainConfig` fields, as for `train`.

    Returns:
        What `cv.json` holds: "per_fold" (each fold's figures), "summary" (mean and 95% t-interval of
        "accuracy", "log_loss", "auc" over folds), "summary_corrected" (the interval corrected for
        overlapping training sets), "oof" (the pooled out-of-fold figures), "suspects", "config".

    Examples:
        >>> cv = asirra.cross_validate(model="effnet-lite0", strategy="linear", views=1, folds=3, limit=600)
        >>> cv["summary"]["accuracy"]
    """
    from asirra.crossval import HAMMING_THRESHOLD, read_image_keys
    from asirra.crossval import cross_validate as run_folds

    settings = replace(resolve_train_config(config, data, out, options), out=os.fspath(out))
    drop = read_image_keys(Path(drop_from_training)) if drop_from_training is not None else frozenset()
    return run_folds(settings, folds, train_fraction, HAMMING_THRESHOLD if hamming is None else hamming, suspects,
                     drop_from_training=drop)


def tune(data: PathLike | None = None, /, *, model: str = "seed-cnn", trials: int = 20, out: PathLike = "runs/tune",
         limit: int | None = 3000, epochs: int | None = None, heldout: int = 2000, storage: str | None = None,
         study: str | None = None, timeout: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Search training settings with Optuna (TPE sampling, median pruning on each epoch's loss).

    Trials train on a stratified tuning subset of `limit` images; the objective is the calibrated
    validation log loss of the kept epoch. Because the settings are chosen on that validation
    split, the best trial is then scored on `heldout` images from outside the subset: the honest
    figure. Trial 0 is the model's default recipe, so "tuning bought nothing" is visible. A study is
    kept in `storage` and resumes (or is joined by other machines) when called again.

    Args:
        data: Labelled images, as for `train`.
        model: "seed-cnn" (the notebook's search space: depth, widths, dropout, optimizer, input size...)
            or "effnet-lite0" / "effnet-lite2" (head, top blocks and rates on cached activations).
        trials: The study's total trials: a resumed or shared study runs only the rest.
        out: The folder for `trials/`, `trials.csv`, `best_config.json`, the plots and `tune.json`.
        limit: Images in the tuning subset (None or 0: all; then nothing is left to hold out).
        epochs: Most epochs a trial may draw (None: 8 for seed-cnn, 6 for transfer models).
        heldout: Held-out images the best trial's model is scored on (0: skip).
        storage: A journal file (default `out/study.log`), `sqlite:///FILE`, or `redis://HOST:PORT/DB`
            to share one study between machines.
        study: The study's name in the storage (default `asirra-MODEL`).
        timeout: Seconds this call may run; a running trial stops after its current epoch.
        seed: Seeds the sampler and every trial's split and initialisation.

    Returns:
        What `tune.json` holds: "trials", "states", "best" (the best trial's number, run folder,
        validation loss and parameters), "baseline" (trial 0, the default recipe), "heldout" (the
        best model on held-out images) and "plots". `out/best_config.json` is a config
        `train(config=...)` reruns.

    Raises:
        MissingExtra: Optuna is not installed (`pip install 'asirra[tune]'`).
    """
    require("optuna", "tune")  # before any data is read
    from asirra.data import labelled_root
    from asirra.tuning import TuneSettings
    from asirra.tuning import tune as run_study_trials

    return run_study_trials(TuneSettings(
        model=model, data=str(labelled_root(None if data is None else os.fspath(data))), out=os.fspath(out),
        trials=trials, storage=storage, study=study, timeout=timeout, limit=limit or None, epochs=epochs, seed=seed,
        heldout=heldout))


# ---- evaluating and explaining ----------------------------------------------------------------


@dataclass
class EvaluationResult:
    """What `evaluate` measured and drew.

    Examples:
        >>> result = asirra.evaluate(data="data/dogs-vs-cats", limit=400)
        >>> result.metrics["accuracy"], result.metrics["challenge_solve_rate"]
        >>> result.files["mistakes"]  # the most confident mistakes, under their Grad-CAM maps
    """

    metrics: dict[str, Any]
    """What `metrics.json` holds: "n", "accuracy", "log_loss", "auc", "confusion", the 12-image
    challenge solve rate with its 95% interval (cat/dog), or top-k accuracy, macro-F1 and ECE (N classes)."""
    files: dict[str, Path]
    """The files written, by name: "metrics", "confusion", "roc" (two classes), "reliability", "mistakes"."""
    proba: np.ndarray
    """(n, n_classes) calibrated probabilities of the scored images, columns in the order of `classes`."""
    labels: np.ndarray
    """(n,) true class index of each scored image."""
    names: list[str]
    """File name of each scored image."""
    classes: tuple[str, ...]
    """The model's class names."""
    unusable: list[dict[str, str]]
    """Images that could not be read ({"path", "reason"}): skipped, not scored."""

    def summary_lines(self) -> list[str]:
        """The evaluation in a few lines of text, as `asirra evaluate` prints it.

        Returns:
            The headline figures, then one line per file written.
        """
        from asirra.evaluation import summary_lines

        return summary_lines(self.metrics, self.files)


def evaluate(model: Classifier | TrainResult | PathLike | None = None, data: PathLike | None = None, /, *,
             split: PathLike | None = None, limit: int | None = None, out: PathLike = "runs/evaluate",
             challenges: int = SIMULATED_CHALLENGES, explain: bool = True, seed: int = 0,
             backend: str = DEFAULT_BACKEND, tta: bool | None = None) -> EvaluationResult:
    """Score a model on labelled images, and draw what it got right and wrong.

    Accuracy, log loss, AUC and the confusion matrix; for the cat/dog model also the share of random
    12-image challenges it solves (with a 95% interval, beside p^12); for N classes top-k accuracy,
    macro-F1 and the calibration error. Writes `metrics.json`, `confusion.png`, `roc.png`,
    `reliability.png` and `mistakes.png` (the most confident mistakes, each under the Grad-CAM map of
    the class it wrongly chose).

    Args:
        model: A `Classifier`, a `TrainResult`, a run folder or model file; None is the shipped model.
        data: Labelled images (a Kaggle root's `train/` is used); None uses the data lookup.
        split: A run folder (or `TrainResult`, or a model folder with a `split.json`): score only its
            validation images, the ones the model never trained on. The shipped model's folder is
            `asirra.load_model().folder`.
        limit: Score a stratified random sample of this many images.
        out: The folder for the report and plots.
        challenges: Random 12-image challenges drawn from the scored images.
        explain: Draw each mistake under its Grad-CAM map (a backward pass for at most 24 images).
        seed: Seeds the sample and the challenges.
        backend: As for `load_model`, when `model` is not already loaded.
        tta: As for `load_model`, when `model` is not already loaded.

    Returns:
        An `EvaluationResult`: the metrics, the figure paths, and the probabilities behind them.

    Examples:
        >>> shipped = asirra.load_model()
        >>> result = asirra.evaluate(shipped, "data/dogs-vs-cats", split=shipped.folder, limit=1000)
        >>> print("\\n".join(result.summary_lines()))
    """
    from asirra.evaluation import evaluate_data

    classifier = _classifier(model, backend=backend, tta=tta)
    evaluation = evaluate_data(classifier, None if data is None else os.fspath(data), Path(out),
                               split=None if split is None else os.fspath(split), limit=limit, seed=seed,
                               n_challenges=challenges, explain=explain)
    preds = evaluation.predictions
    return EvaluationResult(metrics=evaluation.report.to_json(), files=evaluation.files, proba=preds.proba,
                            labels=preds.labels, names=[r.name for r in preds.refs], classes=preds.classes,
                            unusable=preds.unusable)


def explain(images: PathLike | Sequence[PathLike], /, *, model: Classifier | PathLike | None = None,
            target: str | None = None, limit: int | None = None, seed: int = 0,
            out: PathLike = "runs/explain") -> ExplainReport:
    """Draw Grad-CAM maps: where in each picture the model found its evidence.

    One overlay PNG per image (the map over the photo, its peak marked), `grid.png` of the first 24,
    and `explain.json` (per image: the call, its probability, the peak's position as fractions of
    the picture). For the array of maps without any drawing, use `Classifier.explain`.

    Args:
        images: An image file, a folder or .zip of images, or a list of them.
        model: A `Classifier`, a run folder or model file; None is the shipped model. Grad-CAM runs
            the PyTorch network whatever the classifier's backend.
        target: Explain this class's evidence in every image; None explains each predicted class.
        limit: Explain a random sample of this many images.
        seed: Which random sample.
        out: The folder for the pictures and `explain.json`.

    Returns:
        An `ExplainReport`: `images` (one record each), `skipped` (unreadable files), `files`, and
        the seconds Grad-CAM took per image.

    Examples:
        >>> report = asirra.explain("data/dogs-vs-cats/test1", limit=8)
        >>> report.files["grid"]
    """
    from asirra.gradcam import collect_refs, explain_refs

    classifier = _classifier(model, backend="torch")  # Grad-CAM needs the module's gradients
    paths = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    refs = collect_refs([Path(p) for p in paths], limit=limit, seed=seed, classes=classifier.classes)
    return explain_refs(classifier.model, classifier.config, refs, Path(out), tta=classifier.tta, target_class=target)


# ---- the CAPTCHA ------------------------------------------------------------------------------


def create_app(pool: PathLike, /, *, safeguard: str = DEFAULT_SAFEGUARD, settings: ServiceSettings | None = None,
               sites: PathLike | None = None, limit: int | None = None, seed: int = 0) -> FastAPI:
    """Build the CAPTCHA service over a folder of labelled photos, as a FastAPI app.

    Each challenge shows 12 photos drawn from the pool and asks for every cat; each served copy is
    re-encoded with a random crop, size and JPEG quality, so no two fetches of a photo are the same
    bytes. The page is at `/`, the JSON API under `/api/` (challenge, image, answer, verify). Run it
    with `asirra.captcha.running(app)` (a background thread, for notebooks and tests) or
    `asirra.captcha.serve(app)`; `asirra serve` adds worker processes and Redis.

    Args:
        pool: Labelled images (any layout asirra reads); undecodable ones are left out with a warning.
        safeguard: The verdict policy: "token-bucket:capacity=1" (the default of `asirra serve` too),
            "none", "partial-credit", or another setting such as "token-bucket:capacity=5".
        settings: Rate limits, lifetimes and rendering (`asirra.captcha.ServiceSettings`); None is the
            defaults `asirra serve` uses.
        sites: A JSON file `{"sites": [{"key": ..., "secret": ...}]}` of the web sites that may request
            challenges and verify the pass tokens their visitors earn.
        limit: Serve a stratified random sample of this many photos.
        seed: Which sample.

    Returns:
        The FastAPI application.

    Raises:
        ServiceError: Fewer than 12 usable photos, or settings that cannot work.
        MissingExtra: FastAPI is not installed (`pip install 'asirra[serve]'`).

    Examples:
        >>> from asirra.captcha import ServiceSettings, running
        >>> app = asirra.create_app("data/dogs-vs-cats/train", limit=200,
        ...                         settings=ServiceSettings(challenge_rate=100))
        >>> with running(app) as url:
        ...     report = asirra.attack(url, 30)
    """
    require("fastapi", "serve")
    require("uvicorn", "serve")
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service.app import create_app as build_app
    from asirra.captcha.service.app import read_pool
    from asirra.captcha.service.clients import load_sites

    return build_app(read_pool(os.fspath(pool), limit=limit, seed=seed), parse_safeguard(safeguard), settings,
                     sites=load_sites(os.fspath(sites)) if sites is not None else None)


def attack(url: str, /, n: int = 100, *, model: Classifier | PathLike | None = None, backend: str = DEFAULT_BACKEND,
           target: str = "cat", concurrency: int = 1, timeout: float = 30.0, max_wait: float = DEFAULT_MAX_WAIT,
           preprocess: str = "none", progress: bool = False) -> AttackReport:
    """Solve a running service's challenges over HTTP with a classifier, as a bot would.

    The bot uses only the public API, with a cookie jar per concurrent worker, and waits out
    "429 / 503, Retry-After" as a patient bot does. A challenge the service would not let it finish
    is a refusal, counted apart: the solve rate (passed / answered) measures the classifier, and
    passes per hour what the rate limits leave of it.

    Args:
        url: The service, e.g. "http://127.0.0.1:8000".
        n: Challenges to attempt.
        model: A `Classifier`, a run folder or model file, or a ladder rung's folder (`asirra captcha
            build-attacker`); None is the shipped model.
        backend: As for `load_model`, when `model` is not already loaded.
        target: The class the challenge asks to select (one of the model's classes).
        concurrency: Challenges in flight at once.
        timeout: Seconds to wait for each HTTP reply.
        max_wait: Seconds the whole run may spend waiting out Retry-After; past it, refusals are
            recorded instead of waited out.
        preprocess: Counter-moves applied to each served image before classifying, in order:
            "jpeg:75,median:3" (also "blur:SIGMA", "resize:FACTOR"); "none" for none.
        progress: Show a progress bar.

    Returns:
        An `AttackReport`: attempted, answered, passed, `solve_rate` with its 95% interval
        (`solve_rate_ci`), refusals by kind, `passes_per_hour`, latencies.

    Raises:
        AttackError: Bad settings, or no service at `url`.
        TargetClassError: The model has no class `target`.
    """
    from asirra.captcha.attack.bot import aim, check_settings
    from asirra.captcha.attack.bot import attack as run_bot
    from asirra.captcha.attack.counter import parse_preprocess
    from asirra.captcha.attack.solvers import load_solver

    check_settings(url, n, concurrency, max_wait)  # before a model is loaded for nothing
    pipeline = parse_preprocess(preprocess)
    given = isinstance(model, Classifier)
    # A model folder, or a ladder rung's folder (its solver.json: a counter-move, an ensemble, a lookup table).
    classifier = model if given else load_solver(None if model is None else os.fspath(model), backend=backend)
    previous = classifier.target if given else None
    try:
        report = run_bot(url, n, aim(classifier, target), concurrency=concurrency, timeout=timeout,
                         max_wait=max_wait, preprocess=pipeline, progress=progress)
    finally:
        if given:
            classifier.target = previous  # a caller's classifier is left as it was given
    if report.unreachable:
        raise AttackError(f"cannot connect to {url}; is the service running?")
    return report


def harden(data: PathLike, out: PathLike, /, *, config: HardenConfig | None = None, limit: int | None = None,
           **options: Any) -> DerivedPoolSummary:
    """Write an adversarially hardened copy of a labelled pool: the defender's move.

    Each photo gets a perturbation within `epsilon` (L-infinity) that pushes the defender's own
    surrogate models towards the wrong answer, with the service's random crop, resize and JPEG in
    the loop (expectation over transformation). Files are lossless PNGs in Kaggle's naming, so the
    folder is a pool `create_app` serves as it is. Resumable: a rerun writes only what is missing.
    What it buys, measured: against a bot that does not adapt, a lot; against one that buys a few
    hundred labels of hardened images, little (see the hardening study).

    Args:
        data: Labelled images to harden.
        out: The folder for the hardened pool, `manifest.jsonl`, `summary.json` and `compare.html`.
        config: A `asirra.captcha.HardenConfig`; `options` override its fields.
        limit: Harden a random sample of this many images.
        **options: `HardenConfig` fields: `method` ("fgsm", "pgd", "random-target", "balanced-target",
            "feature", "universal", "universal-uncertain"), `epsilon` (4/255, or "4/255"),
            `surrogates` (run folders, `TrainResult`s or registry names), `steps`, `eot`, `seed`, ...

    Returns:
        A `DerivedPoolSummary`: the folder, how many images it holds, the unusable inputs, its files.

    Raises:
        HardenError: Settings that cannot work; the message says which.

    Examples:
        >>> probe = asirra.train(model="effnet-lite0", strategy="linear", views=1, limit=600, out="runs/probe")
        >>> pool = asirra.harden("data/dogs-vs-cats/train", "runs/hardened", method="pgd", epsilon="4/255",
        ...                      surrogates=[probe], limit=48)
    """
    from asirra.captcha.defend.harden import harden_pool

    options = dict(options)
    if isinstance(options.get("epsilon"), str):
        options["epsilon"] = parse_epsilon(options["epsilon"])
    if "surrogates" in options:
        options["surrogates"] = tuple(os.fspath(s) for s in options["surrogates"])
    valid = {f.name for f in fields(HardenConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown harden option {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    settings = replace(config or HardenConfig(), **options)
    return harden_pool(labelled_sample(os.fspath(data), limit, settings.seed), out, settings)


def make_pool(data: PathLike, out: PathLike, /, *, split: PathLike | None = None, limit: int | None = None,
              seed: int = 0) -> Path:
    """Make the study's pool: the photos of `data` that the model under attack never trained on.

    Links (never copies) the photos whose content is in the model's validation split into `out`, with
    `pool.json` recording each photo's content hash; `study` refuses any other pool.

    Args:
        data: Labelled photos, e.g. "data/dogs-vs-cats/train".
        out: A new or empty folder (or the same pool made before).
        split: The split.json of the model under attack; None is the shipped model's.
        limit: Keep a stratified random `limit` of them (all when None).
        seed: Seeds that draw.

    Returns:
        `out`, ready for `asirra.captcha.study(out, ...)`.

    Raises:
        PoolError: None of the photos is in the validation split, or `out` holds something else.
    """
    from asirra.captcha.experiments.pool import make_pool as link_pool

    link_pool(os.fspath(data), os.fspath(out), None if split is None else os.fspath(split), limit=limit, seed=seed,
              progress=False)
    return Path(out)


def study(data: PathLike, out: PathLike, /, *, quick: bool = False, config: StudyConfig | None = None,
          split: PathLike | None = None, prices: PathLike | None = None, **options: Any) -> StudyResult:
    """Run the attacker's-bill study: which stacked defence holds which attacker, and at what price.

    The pool must be photos the model under attack never trained on (`asirra captcha pool` makes one
    from the shipped model's validation split; an overlapping pool is refused). Per seed, a scored set
    and an attacker pool are drawn; at each epsilon the service's photos are hardened against the
    defender's surrogate, every ladder rung is built from bought labels of served copies (with its
    CPU-seconds and dollars), scored offline on the served bytes, and the strongest is attacked live
    over HTTP under each verdict policy, from one address and from a fresh address per challenge.
    People are simulated beside it, and the bill prices a thousand passes from the cited prices.
    Every stage is cached by the content of its inputs: a rerun resumes, a changed input recomputes.

    Args:
        data: The study's pool (`asirra captcha pool`).
        out: The folder for `report.md`, `results.json`, the plots and the cache.
        quick: The tests' few-minute version (exploratory: it never meets the goal).
        config: A `asirra.captcha.StudyConfig`; `options` override its fields.
        split: The split.json of the model under attack; None is the shipped model's.
        prices: A prices TOML for the bill; None is the cited `prices.toml`.
        **options: `StudyConfig` fields: `seeds`, `epsilons` (in 255ths), `budgets`, `attackers`, `moves`,
            `policies`, `live_challenges`, ...

    Returns:
        A `StudyResult`: every scored and live cell, the people, the bill, the goal check, and
        `files["report"]`.

    Raises:
        StudyError: Settings that cannot work, or a pool that overlaps the model's training split.
        MissingExtra: FastAPI is not installed (`pip install 'asirra[serve]'`).
    """
    valid = {f.name for f in fields(StudyConfig)}
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ConfigError(f"unknown study option {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    tuples = {name: tuple(value) for name, value in options.items() if isinstance(value, list)}
    base = config or (quick_config() if quick else StudyConfig())
    return run_study(os.fspath(data), os.fspath(out), replace(base, **{**options, **tuples}),
                     split_file=None if split is None else os.fspath(split),
                     prices_file=None if prices is None else os.fspath(prices))
