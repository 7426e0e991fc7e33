"""The `asirra` command line: one Typer app, thin wrappers over the package's functions.

Heavy imports (torch, onnxruntime, fastapi) happen inside commands so `asirra --help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from asirra.config import DEFAULT_BACKEND, Schedule, Strategy
from asirra.config import default as train_default

app = typer.Typer(
    help="Train cat-vs-dog CNNs; measure, attack and defend Asirra-style CAPTCHAs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, no traceback: how every command reports bad input."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


MODEL_HELP = "Run folder or model file (default: the model shipped with asirra)."
BACKEND_HELP = ("Inference engine: auto (onnx-int8 when the model has a fresh int8 export, as the shipped one does, "
                "else onnx), onnx (exact fp32, equals torch), onnx-int8 (needs `asirra export --int8`) or torch.")

# Options several commands share, declared once so their spelling, help and checks cannot drift.
ModelOption = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP, show_default=False)]
BackendOption = Annotated[str, typer.Option("--backend", help=BACKEND_HELP)]
TtaOption = Annotated[Optional[bool], typer.Option(
    "--tta/--no-tta", help="Average with the mirrored image (default: as the model was validated).", show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds every random draw of the command.")]


# ---- section: data (data.py, download.py) -------------------------------------------------

data_app = typer.Typer(help="Inspect a data set: counts, unusable files, a sample grid; write the bundled digits.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DATA_PATH_HELP = "Folder or .zip of images (default: --data lookup: $ASIRRA_DATA, ./data/..., ../shared/...)."


@data_app.command("check")
def data_check(
    path: Optional[Path] = typer.Argument(None, help=DATA_PATH_HELP, show_default=False),
    as_json: JsonFlag = False,
    workers: int = typer.Option(2, min=1, help="Decoding threads."),
) -> None:
    """Decode every image: counts per class, size statistics, each unusable file with its reason."""
    from asirra import data

    try:
        root = data.resolve_data_root(path)
        layout = data.detect_layout(root)
        refs = data.scan_all(root)
        classes = data.class_names(root) or data.CLASS_NAMES  # unlabelled: counted as before, cat 0, dog 0
    except data.DataError as exc:
        fail(str(exc))
    report = data.check(refs, workers=workers, classes=classes)
    if as_json:
        emit_json({"path": str(root), "layout": layout, **report.to_json()})
    else:
        typer.echo(f"{root} ({layout})\n{report.to_text()}")


@data_app.command("show")
def data_show(
    path: Optional[Path] = typer.Argument(None, help=DATA_PATH_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    n: int = typer.Option(16, "--n", min=1, help="How many images."),
    seed: int = typer.Option(0, help="Which random sample."),
) -> None:
    """Write a PNG grid of randomly drawn images titled with their class and id."""
    from asirra import data

    try:
        root = data.resolve_data_root(path)
        classes = data.class_names(root) or data.CLASS_NAMES
        written = data.show_grid(data.scan(root), out, n=n, seed=seed, classes=classes)
    except data.DataError as exc:
        fail(str(exc))
    typer.echo(str(written))


@data_app.command("digits")
def data_digits(
    out: Path = typer.Option(..., "--out", help="Folder to write 0/ ... 9/ class folders of PNGs into."),
    size: int = typer.Option(32, "--size", min=8, help="Image side in pixels (the originals are 8x8)."),
) -> None:
    """Write scikit-learn's bundled handwritten digits (1,797 images, 10 classes) as class folders."""
    from asirra.sample_data import SampleDataError, write_digits

    try:
        counts = write_digits(out, size=size)
    except SampleDataError as exc:
        fail(str(exc))
    typer.echo(f"{out}: {sum(counts.values())} images in {len(counts)} classes "
               f"({', '.join(f'{k}: {v}' for k, v in counts.items())})\nnext: asirra train --data {out}")


@app.command("download")
def download_command(
    dest: Path = typer.Option(Path("data"), help="Folder to put the archive in."),
    url: Optional[str] = typer.Option(None, help="Archive URL (default: Microsoft's PetImages zip).", show_default=False),
    size: Optional[int] = typer.Option(None, help="Expected size in bytes."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 (hex)."),
) -> None:
    """Fetch Microsoft's PetImages zip (resumable); it is then usable in place as data."""
    from asirra import download

    try:
        path = download.download(url or download.PETIMAGES_URL, dest, expected_size=size, sha256=sha256)
    except download.DownloadError as exc:
        fail(str(exc))
    typer.echo(f"{path}\nnext: asirra data check {path}")



# ---- section: models, training, evaluation, prediction -----------------------------------

def _classifier(model: Optional[str], backend: str, tta: Optional[bool] = None):
    from asirra.predict import load_classifier

    try:
        return load_classifier(model, backend=backend, tta=tta)
    except ValueError as exc:
        fail(str(exc))


@app.command("train")
def train_command(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="A training config JSON (a run's config.json, `asirra tune`'s best_config.json); "
                               "options given on the command line override it.", show_default=False),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images: cat/dog, or one folder per class with any "
                                                             "names (default: the --data lookup, its train/)."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder: config, metrics, plots, checkpoints, model."),
    model: str = typer.Option(train_default("model"), "--model", help="seed-cnn (from scratch), effnet-lite0 or effnet-lite2 (ImageNet-pretrained)."),
    image_size: Optional[int] = typer.Option(train_default("image_size"), "--image-size", min=16,
                                             help="Input side in px (default: the model's own).", show_default=False),
    strategy: Strategy = typer.Option(train_default("strategy"), "--strategy", help="scratch, linear (frozen backbone) or finetune."),
    epochs: int = typer.Option(train_default("epochs"), min=1),
    batch_size: int = typer.Option(train_default("batch_size"), min=2),
    lr: float = typer.Option(train_default("lr"), help="Learning rate (the head's, for transfer strategies)."),
    weight_decay: float = typer.Option(train_default("weight_decay"), help="L2 weight decay."),
    unfreeze: int = typer.Option(train_default("unfreeze"), help="finetune: top blocks of the backbone that train (all: 16 for lite0, 21 for lite2)."),
    views: int = typer.Option(train_default("views"), help="transfer: cached views per image (original, mirror, random warps)."),
    schedule: Schedule = typer.Option(train_default("schedule"), help="plateau (on val accuracy), cosine or onecycle."),
    label_smoothing: float = typer.Option(train_default("label_smoothing")),
    patience: int = typer.Option(train_default("patience"), help="Early stopping patience on validation loss."),
    limit: Optional[int] = typer.Option(train_default("limit"), help="Train on a stratified subset of this many images."),
    seed: SeedOption = train_default("seed"),
    augment: bool = typer.Option(True, help="Random rotation, shear, zoom, shift and flip."),
    tta: bool = typer.Option(train_default("tta"), "--tta/--no-tta", help="Validate (and later predict) on the mean of image and mirror."),
    compile: bool = typer.Option(train_default("compile"), "--compile", help="torch.compile the network (slow start, faster epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last completed epoch."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes on this machine (torch.distributed; "
                                                        "each takes --batch-size / N of every batch)."),
) -> None:
    """Train a network; the best epoch (by validation loss) is kept, calibrated, in OUT/model."""
    from asirra.data import DataError
    from asirra.train import train

    try:
        config = _train_config(ctx)
        if nproc > 1:
            return _train_distributed(config, resume, nproc)  # rank 0's own `asirra train` reports the run
        run = train(config, resume=resume)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"run folder: {run}  (model: {run / 'model'}, curves: {run / 'curves.png'})")


def _train_distributed(config, resume: bool, nproc: int) -> None:
    """`asirra train` on `nproc` local processes under torchrun."""
    import os

    from asirra import distributed
    from asirra.train import prepare_run

    if "WORLD_SIZE" in os.environ:
        raise ValueError("--nproc starts its own processes; leave it out under torchrun")
    distributed.local_batch_size(config.batch_size, nproc)
    # The run folder is checked and its config.json written here, so bad input fails once, before
    # N processes start; the ranks then train from that config.json (rank 0 rewrites it unchanged).
    run = prepare_run(config, resume)
    code = distributed.launch(nproc, ["--config", str(run / "config.json"), *(["--resume"] if resume else [])])
    if code:
        fail(f"distributed training failed (torchrun exit code {code})", code)


# `asirra train`'s options that are TrainConfig fields (its others: --config, --data, --out, --resume).
_TRAIN_FIELDS = ("model", "image_size", "strategy", "epochs", "batch_size", "lr", "weight_decay", "unfreeze", "views",
                 "schedule", "label_smoothing", "patience", "limit", "seed", "augment", "tta", "compile")


def _train_config(ctx: typer.Context):
    """The TrainConfig a command's `asirra train` options describe: --config FILE, overridden by options given."""
    from dataclasses import asdict

    from asirra.config import AugmentConfig, TrainConfig
    from asirra.data import labelled_split_dirs, resolve_data_root

    params = ctx.params
    options = {name: params[name] for name in _TRAIN_FIELDS}
    options["augment"] = asdict(AugmentConfig()) if params["augment"] else None
    # By name: typer vendors its own click, whose ParameterSource is not click's.
    given = {name for name in params if getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"}
    settings = _read_config_file(params["config_file"]) if params["config_file"] else {}
    # The file's settings stand unless an option says otherwise; a bare command is all defaults.
    settings.update({k: v for k, v in options.items() if k in given or k not in settings})
    if "data" in given or "data" not in settings:
        root = resolve_data_root(params["data"])
        settings["data"] = str(labelled_split_dirs(root)[0] or root)
    if "out" in given or "out" not in settings:
        settings["out"] = str(params["out"])
    return TrainConfig.from_dict(settings)


def _read_config_file(path: Path) -> dict:
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the training config {path} ({exc})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is not a training config (expected a JSON object)")
    return settings


def _with_train_options(command):
    """Give `command` every option of `asirra train` but --out and --resume, declared once (in train_command).

    The command takes them as **train_options and builds its TrainConfig with _train_config(ctx).
    """
    import inspect

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    taken = {p.name for p in own} | {"resume"}
    borrowed = [p for p in inspect.signature(train_command, eval_str=True).parameters.values() if p.name not in taken]
    command.__signature__ = inspect.Signature([*own, *borrowed])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


@app.command("cv")
@_with_train_options
def cv_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/cv"), "--out", help="Folder: folds.json, fold-K run folders, oof.csv, "
                             "suspects.csv/.png, cv.json, cv.png. Rerun the same command to continue it."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of folds."),
    train_fraction: float = typer.Option(1.0, "--train-fraction", min=0.01, max=1.0,
                                         help="Train each fold on this stratified share of its training images "
                                              "(validation folds unchanged)."),
    hamming: Optional[int] = typer.Option(None, "--hamming", min=0, max=64, show_default=False,
                                          help="dHash bits near-identical images may differ by (they must also "
                                               "correlate >= 0.9); they share a fold (default: asirra.crossval.HAMMING_THRESHOLD, 8)."),
    suspects: int = typer.Option(24, "--suspects", min=0, help="Most confident label disagreements to list and draw."),
    drop_from_training: Optional[Path] = typer.Option(None, "--drop-from-training", show_default=False,
                                                      help="CSV with a key column (e.g. a suspects.csv): never train on "
                                                           "these images; they are still validated in their fold."),
    **train_options,
) -> None:
    """Stratified k-fold cross-validation (duplicates and near-duplicates never straddle folds), plus every
    `asirra train` option; out-of-fold predictions and the most suspicious labels."""
    from dataclasses import replace

    from asirra import crossval
    from asirra.data import DataError

    try:
        config = replace(_train_config(ctx), out=str(out))  # never a --config file's own run folder
        drop = crossval.read_image_keys(drop_from_training) if drop_from_training else frozenset()
        crossval.cross_validate(config, folds, train_fraction, crossval.HAMMING_THRESHOLD if hamming is None else hamming,
                                suspects, drop_from_training=drop)
    except (DataError, ValueError) as exc:
        fail(str(exc))


@app.command("ablate")
def ablate_command(
    config_file: Path = typer.Option(..., "--config", help="Ablation TOML: a baseline table of training settings, a cv table "
                                     "(folds), variants.NAME tables of overrides (example: ablations/seed-cnn.toml)."),
    out: Path = typer.Option(Path("runs/ablate"), "--out", help="Folder: one cross-validation per variant, "
                             "report.md, ablation.png. Rerun the same command to continue it."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images (default: the file's baseline data, "
                                        "else the --data lookup, its train/)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: report the variants finished so far."),
) -> None:
    """Cross-validate named variants of a baseline on the same folds; compare them (corrected resampled t-test)."""
    from asirra.ablate import read_ablation, run_ablation
    from asirra.data import DataError, labelled_split_dirs, resolve_data_root

    try:
        ablation = read_ablation(config_file)
        if data is None and "data" in ablation.baseline:
            data = Path(ablation.baseline["data"])
        root = resolve_data_root(data)
        run_ablation(ablation, str(labelled_split_dirs(root)[0] or root), out, train=not report_only)
    except (DataError, ValueError) as exc:
        fail(str(exc))


from asirra import tune as _tune_defaults  # noqa: E402  (light: optuna and torch load inside its functions)


@app.command("tune")
def tune_command(
    model: str = typer.Option(train_default("model"), "--model", help="seed-cnn (the notebook's search space) or "
                              "effnet-lite0 / effnet-lite2 (head, top blocks and rates on cached activations)."),
    trials: int = typer.Option(_tune_defaults.DEFAULT_TRIALS, "--trials", min=1,
                               help="The study's total trials: a resumed or shared study runs only the rest."),
    storage: Optional[str] = typer.Option(None, "--storage", show_default=False,
                                          help="Study storage: a journal file (default OUT/study.log), sqlite:///FILE, "
                                               "or redis://HOST:PORT/DB to share one study between machines."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name in the storage (default: asirra-MODEL).",
                                        show_default=False),
    timeout: Optional[float] = typer.Option(None, "--timeout", show_default=False,
                                            help="Seconds this process may run; a running trial stops after its "
                                                 "current epoch (recorded as pruned, noted as a timeout)."),
    out: Path = typer.Option(Path("runs/tune"), "--out", help="trials/, trials.csv, best_config.json, plots, tune.json."),
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images: cat/dog, or one folder per class with any "
                                                             "names (default: the --data lookup, its train/)."),
    limit: int = typer.Option(_tune_defaults.DEFAULT_LIMIT, "--limit", min=0,
                              help="Images in the tuning subset (0: all); the rest is where held-out images come from."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, show_default=False,
                                         help=f"Most epochs a trial may draw (default: {_tune_defaults.DEFAULT_EPOCHS['seed-cnn']} "
                                              f"for seed-cnn, {_tune_defaults.DEFAULT_TRANSFER_EPOCHS} for transfer)."),
    heldout: int = typer.Option(_tune_defaults.DEFAULT_HELDOUT, "--heldout", min=0,
                                help="Held-out images the best trial's model is scored on (0: skip)."),
    seed: SeedOption = train_default("seed"),
) -> None:
    """Search training settings with Optuna (TPE, median pruning); the best becomes a config `train --config` runs."""
    from asirra.data import DataError, labelled_split_dirs, resolve_data_root

    try:
        root = resolve_data_root(data)
        settings = _tune_defaults.TuneSettings(
            model=model, data=str(labelled_split_dirs(root)[0] or root), out=str(out), trials=trials, storage=storage,
            study=study, timeout=timeout, limit=limit or None, epochs=epochs, seed=seed, heldout=heldout)
        _tune_defaults.tune(settings)
    except (DataError, ValueError) as exc:
        fail(str(exc))


@app.command("evaluate")
def evaluate_command(
    path: Optional[Path] = typer.Argument(None, help="Labelled images (default: the --data lookup)."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json and plots."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a stratified random sample of this many images."),
    split: Optional[Path] = typer.Option(None, help="A run folder: evaluate only its validation images."),
    challenges: int = typer.Option(10_000, help="Random 12-image challenges to draw."),
    tta: TtaOption = None,
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
    explain: bool = typer.Option(True, "--explain/--no-explain",
                                 help="Draw each mistake in mistakes.png under its Grad-CAM map (a backward pass for <= 24 images)."),
) -> None:
    """Accuracy, log loss, AUC, confusion, and the share of 12-image challenges solved; plots in OUT.

    A model of other classes than cat/dog: top-1/top-k accuracy, macro-F1, per-class scores, N x N confusion."""
    from asirra.data import DataError, class_names, labelled_split_dirs, resolve_data_root, scan
    from asirra.evaluate import evaluate_model
    from asirra.predict import align_labels
    from asirra.splits import evaluation_sample

    try:
        root = resolve_data_root(path)
        labelled = labelled_split_dirs(root)[0] or root
        refs = scan(labelled, labelled=True)
        refs = evaluation_sample(refs, Path(split) / "split.json" if split is not None else None, limit, seed)
        clf = _classifier(model, backend, tta)
        refs = align_labels(refs, class_names(labelled), clf.classes)  # the data's class order -> the model's
        evaluation = evaluate_model(clf, refs, out, n_challenges=challenges, seed=seed,
                                    info={"data": str(root)}, explain=explain)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    _report_skips(evaluation.predictions)
    report, files = evaluation.report, evaluation.files
    if as_json:
        emit_json(report.to_json())
        return
    r = report.to_json()
    if "top_k_accuracy" in r:  # not the cat/dog model
        top = "  ".join(f"{k.replace('_', '-')} {v:.4f}" for k, v in r["top_k_accuracy"].items())
        typer.echo(f"{r['n']} images, {len(r['classes'])} classes  {top}  macro-F1 {r['macro_f1']:.4f}  "
                   f"log loss {r['log_loss']:.4f}  ECE {r['ece']:.4f}")
        for name, file in files.items():
            typer.echo(f"{name}: {file}")
        return
    auc = "n/a (one class)" if r["auc"] is None else f"{r['auc']:.4f}"
    typer.echo(f"{r['n']} images  accuracy {r['accuracy']:.4f}  log loss {r['log_loss']:.4f}  AUC {auc}")
    if r.get("challenge_solve_rate") is not None:
        typer.echo(f"12-image challenges solved: {r['challenge_solve_rate']:.4f} "
                   f"(95% CI {r['ci_low']:.4f}-{r['ci_high']:.4f}; p^12 = {r['p12']:.4f})")
    for name, file in files.items():
        typer.echo(f"{name}: {file}")


def _report_skips(preds) -> None:
    for item in preds.unusable:
        typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)


def _predict_reporting_skips(clf, refs):
    from asirra.predict import predict_refs

    preds = predict_refs(clf, refs)
    _report_skips(preds)
    return preds


@app.command("predict")
def predict_command(
    path: Path = typer.Argument(..., help="An image, or a folder / .zip of images (e.g. test1/)."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    out: Optional[Path] = typer.Option(None, "--out", help="CSV to write: id,label (the cat/dog model: Kaggle's, 1 = dog; "
                                                          "other models: the class name)."),
    proba: bool = typer.Option(False, "--proba", help="Cat/dog: write clipped P(dog) instead of 0/1 (log-loss leaderboard); "
                                                      "other models: add one p_<class> column per class."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid of the first predictions."),
    tta: TtaOption = None,
) -> None:
    """Classify one image (prints `dog 0.97`) or a folder (writes a Kaggle submission, or id,label for other classes)."""
    from asirra.calibration import describe_row
    from asirra.data import DataError, scan
    from asirra.images import UnusableImage
    from asirra.predict import plot_predictions, write_predictions

    if path.is_file() and path.suffix.lower() != ".zip":
        clf = _classifier(model, backend, tta)
        try:
            row = clf.predict_classes_proba([path])[0]
        except UnusableImage as exc:
            fail(f"{path}: {exc.reason}")
        typer.echo(describe_row(row, clf.classes))
        return
    try:
        refs = scan(path, labelled=False)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    clf = _classifier(model, backend, tta)
    preds = _predict_reporting_skips(clf, refs)
    out = out or Path("submission.csv")
    write_predictions(preds, out, proba=proba)
    typer.echo(f"{len(preds.refs)} predictions -> {out}" + (f" ({len(preds.unusable)} unreadable skipped)" if preds.unusable else ""))
    if grid is not None:
        typer.echo(f"grid: {plot_predictions(preds, grid)}")


@app.command("explain")
def explain_command(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (or .zip) of images.", show_default=False),
    model: ModelOption = None,
    out: Path = typer.Option(Path("runs/explain"), "--out", help="Folder for one overlay PNG per image, grid.png, explain.json."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Explain a random sample of this many images."),
    class_name: Optional[str] = typer.Option(None, "--class", help="Explain this class's evidence in every image "
                                                                   "(default: each image's predicted class).", show_default=False),
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
) -> None:
    """Grad-CAM heat maps: where in each picture the model found the evidence for the class it predicted."""
    from asirra.explain import collect_refs, explain_refs, summary_lines

    try:
        clf = _classifier(model, "torch")  # Grad-CAM needs the PyTorch module's gradients
        refs = collect_refs(images, limit=limit, seed=seed, classes=clf.classes)
        report = explain_refs(clf.model, clf.config, refs, out, target_class=class_name)
    except ValueError as exc:
        fail(str(exc))
    for item in report.skipped:
        typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    if not report.images:
        fail(f"none of the {len(refs)} images could be read")
    if as_json:
        emit_json(json.loads(report.files["json"].read_text()))
        return
    for line in summary_lines(report):
        typer.echo(line)


@app.command("export")
def export_command(
    model: ModelOption = None,
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write model.onnx beside the weights."),
    int8: bool = typer.Option(False, "--int8", help="Write model.int8.onnx (static int8, made from model.onnx; needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Images whose activation ranges set the int8 scales."),
    package: bool = typer.Option(False, "--package", help="Install the model as the package's default (fp16, with --int8 its int8 export)."),
) -> None:
    """Export a model to ONNX (fp32, optionally int8), or make it the default model shipped in the package."""
    from asirra.export import calibration_pixels, export_beside_weights, package_model, quantize_beside_weights
    from asirra.models import load_model, resolve_model_folder
    from asirra.predict import DEFAULT_MODEL_DIR

    if int8 and calibration is None:
        fail("--int8 needs --calibration: a folder of typical images (a few hundred are sampled)")
    try:
        folder = resolve_model_folder(model) if model else _default_model_dir()
        net, config = load_model(folder)
        # Read before anything is written: a bad calibration folder must not leave a half-made export.
        pixels = calibration_pixels(calibration, config.image_size) if int8 else None
        if package:
            typer.echo(f"default model -> {package_model(folder, DEFAULT_MODEL_DIR, calibration=pixels)}")
            return
        if onnx:
            typer.echo(f"onnx -> {export_beside_weights(net, folder, config.image_size)}")
        if pixels is not None:
            typer.echo(f"onnx-int8 -> {quantize_beside_weights(net, folder, pixels)} (calibrated on {len(pixels)} images)")
    except ValueError as exc:
        fail(str(exc))


def _default_model_dir() -> Path:
    from asirra.predict import default_model_path

    try:
        return default_model_path()
    except ValueError as exc:
        fail(str(exc))


@app.command("demo")
def demo_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Kaggle-style root with train/ and test1/."),
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    samples: int = typer.Option(2000, help="Validation images to evaluate."),
    challenges: int = typer.Option(10_000, help="Simulated 12-image challenges."),
    backend: BackendOption = DEFAULT_BACKEND,
) -> None:
    """The whole workflow with the shipped model: check data, evaluate, submit, solve challenges, plot."""
    from asirra.demo import DemoError, run_demo

    try:
        run_demo(data, out, samples=samples, challenges=challenges, backend=backend)
    except DemoError as exc:
        fail(str(exc))



# ---- section: captcha simulate / defend (captcha/simulate.py, captcha/safeguards.py) --------

captcha_app = typer.Typer(
    help="Asirra-style CAPTCHAs: simulate attacks, choose safeguards, serve challenges.", no_args_is_help=True
)
app.add_typer(captcha_app, name="captcha")

_SAFEGUARD_HELP = 'none, partial-credit, token-bucket, or a setting such as "token-bucket:capacity=5,cost_per_failure=2"'


def _score_captcha_pool(data: Path, model: Optional[str], backend: str, limit: Optional[int], seed: int):
    """Scan the labelled pool at `data` and score it once with the classifier (asirra.predict.Predictions)."""
    import numpy as np

    from asirra.captcha.simulate import sample_pool
    from asirra.data import scan
    from asirra.predict import load_classifier

    try:
        refs = sample_pool(scan(data, labelled=True), limit, np.random.default_rng(seed))
        classifier = load_classifier(model, backend=backend)
        if not classifier.is_cat_dog:  # the simulation scores P(dog) of a cat/dog pool
            raise ValueError(f"the CAPTCHA simulation needs a cat/dog model; {classifier.name} has classes "
                             f"{', '.join(classifier.classes)}")
    except ValueError as exc:
        fail(str(exc))
    return classifier, _predict_reporting_skips(classifier, refs)


@captcha_app.command("simulate")
def captcha_simulate(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    challenges: int = typer.Option(10_000, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    safeguard: str = typer.Option("none", "--safeguard", help=_SAFEGUARD_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many pool images, at random."),
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
) -> None:
    """Attack random 12-image challenges with the classifier, from one client, under a safeguard."""
    import numpy as np

    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.simulate import simulate_model

    try:
        policy = parse_safeguard(safeguard)
    except ValueError as exc:
        fail(str(exc))
    classifier, scored = _score_captcha_pool(data, model, backend, limit, seed)
    try:
        result = simulate_model(scored.p_dog, scored.labels, challenges, policy, np.random.default_rng(seed),
                                agent=classifier.name)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        emit_json({**result.to_dict(), "images": len(scored.refs), "skipped": scored.unusable, "seed": seed})
        return
    low, high = result.ci
    typer.echo(f"{result.agent} on {len(scored.refs)} images ({len(scored.unusable)} skipped): "
               f"per-image accuracy {result.per_image_accuracy:.4f}, p^12 = {result.p12:.2%}")
    typer.echo(f"safeguard {result.safeguard}: solved {result.solved} of {result.attempted} challenges = "
               f"{result.solve_rate:.2%} (95% CI {low:.2%} to {high:.2%})")


@captcha_app.command("defend")
def captcha_defend(
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images to measure the bot (the classifier) on."),
    accuracy: Optional[float] = typer.Option(None, "--accuracy", min=0.0, max=1.0,
                                             help="The bot's per-image accuracy, instead of --data (needs no model)."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many images, at random."),
    challenges: int = typer.Option(20_000, "--challenges", "-n", min=100, help="Challenges per agent and setting."),
    human: float = typer.Option(0.996, "--human", min=0.0, max=1.0, help="Human challenge success (Elson et al.)."),
    human_floor: float = typer.Option(0.99, "--human-floor", min=0.0, max=1.0,
                                      help="Recommend only settings keeping humans above this."),
    out: Path = typer.Option(Path("runs/defend"), "--out", help="Folder for defend.csv, defend.json, defend.png."),
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
) -> None:
    """Bot vs human under a grid of partial-credit and token-bucket settings; recommends one."""
    from asirra.captcha.simulate import defend, format_setting

    if (data is None) == (accuracy is None):
        fail("give the bot as either --data PATH (measured with the model) or --accuracy P")
    bot = {"bot_accuracy": accuracy}
    if data is not None:
        classifier, scored = _score_captcha_pool(data, model, backend, limit, seed)
        bot = {"bot_proba": scored.p_dog, "bot_labels": scored.labels, "bot_name": classifier.name}
    try:
        report = defend(out, **bot, human_success=human, human_floor=human_floor, n_challenges=challenges, seed=seed)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        emit_json(report.to_dict())
        return
    typer.echo(f"bot per-image accuracy {report.bot_accuracy:.4f}; human challenge success {human:.1%}")
    for row in report.settings:
        typer.echo("  " + format_setting(row))
    if report.recommended is None:
        typer.echo(f"no setting keeps humans above {human_floor:.1%}")
    else:
        typer.echo("recommended: " + format_setting(report.recommended))
    typer.echo(f"wrote {', '.join(report.files.values())}")



# ---- section: captcha harden / distort (captcha/harden.py, captcha/distort.py) --------------


def _derived_pool_refs(data: Path, limit: Optional[int], seed: int) -> list:
    """The labelled images of POOL to derive a pool from (a random `limit` of them, in order)."""
    import numpy as np

    from asirra.captcha.simulate import sample_pool
    from asirra.data import scan

    try:
        return sample_pool(scan(data, labelled=True), limit, np.random.default_rng(seed))
    except ValueError as exc:
        fail(str(exc))


def _derive_pool(data: Path, limit: Optional[int], seed: int, write) -> None:
    """Run `write(refs)` (harden or distort) over POOL's sampled images and report what it wrote."""
    try:
        summary = write(_derived_pool_refs(data, limit, seed))
    except ValueError as exc:  # PoolError, HardenError, DistortError: settings or files it cannot use
        fail(str(exc))
    for item in summary.unusable:
        typer.echo(f"skipped {item['source']}: {item['reason']}", err=True)
    typer.echo(f"{summary.written} images in {summary.out} ({summary.this_run} this run, {len(summary.unusable)} "
               f"unusable); manifest {summary.files['manifest']}, side by side {summary.files['compare']}")


@captcha_app.command("harden")
def captcha_harden(
    data: Path = typer.Option(..., "--data", help="Labelled images to harden (any data layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for the hardened pool (cat.N.png, dog.N.png) and its manifest."),
    method: str = typer.Option("fgsm", "--method", help="fgsm, pgd, random-target / balanced-target (label-independent), "
                                                        "feature, universal or universal-uncertain (one pattern for all)."),
    epsilon: str = typer.Option("4/255", "--epsilon", help="L-infinity bound, e.g. 4/255 or 0.0157."),
    surrogates: str = typer.Option("effnet-lite0", "--surrogates",
                                   help="Comma-separated defender models: run folders, registry names (runs/surrogates/NAME) "
                                        "or `shipped` (the attacker's model: white-box rows only)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Gradient steps (default: 1 for fgsm, 4 otherwise)."),
    eot: int = typer.Option(2, "--eot", min=1, help="Random service transformations averaged per gradient."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Harden only this many images, drawn at random."),
    seed: int = typer.Option(0, "--seed", help="Seeds the sample, the transformations and random targets."),
    crafting: Optional[Path] = typer.Option(None, "--crafting", help="universal*: labelled images to craft the one "
                                                                     "pattern on (none of them in the pool)."),
    crafting_limit: int = typer.Option(64, "--crafting-limit", min=1, help="universal*: crafting images drawn from --crafting."),
) -> None:
    """Write a pool of adversarially perturbed images (lossless, within epsilon), resumably."""
    from asirra.captcha.harden import HardenConfig, harden_pool, parse_epsilon

    try:
        config = HardenConfig(method=method, epsilon=parse_epsilon(epsilon), seed=seed, steps=steps, eot=eot,
                              surrogates=tuple(s.strip() for s in surrogates.split(",") if s.strip()),
                              crafting=str(crafting) if crafting else None, crafting_limit=crafting_limit)
    except ValueError as exc:
        fail(str(exc))
    _derive_pool(data, limit, seed, lambda refs: harden_pool(refs, out, config))


@captcha_app.command("distort")
def captcha_distort(
    data: Path = typer.Option(..., "--data", help="Labelled images to distort (any data layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for the distorted pool (cat.N.png, dog.N.png) and its manifest."),
    kind: str = typer.Option(..., "--kind", help="noise, blur, warp, contrast or clutter."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Per kind (see `asirra.captcha.distort`); default: a strength people still read."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Distort only this many images, drawn at random."),
    seed: int = typer.Option(0, "--seed", help="Seeds the sample and every random distortion."),
) -> None:
    """The classic CAPTCHA baseline: random noise, blur, warping, low contrast or clutter, resumably."""
    from asirra.captcha.distort import DistortConfig, distort_pool

    try:
        config = DistortConfig(kind=kind, strength=strength, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    _derive_pool(data, limit, seed, lambda refs: distort_pool(refs, out, config))


# ---- section: captcha attacker (captcha/ladder.py) -----------------------------------------


@captcha_app.command("attacker")
def captcha_attacker(
    name: str = typer.Argument(..., help="The rung: shipped, seed-cnn-alt, lite2-probe, bought-labels, adv-trained or passed-challenges."),
    out: Path = typer.Option(..., "--out", help="Folder for the attacker (its model/ is what `asirra attack --model` takes)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The labelled pool the attacker learns from (and the service serves)."),
    url: Optional[str] = typer.Option(None, "--url", help="Fetch images as served from this live service (else rendered locally as it would)."),
    budget: Optional[int] = typer.Option(None, "--budget", min=12, help="Training images (default per rung, a few hundred)."),
    seed: int = typer.Option(0, "--seed", help="Seeds the images drawn and the training."),
) -> None:
    """Build one attacker of the ladder as a model folder for `asirra attack --model DIR`."""
    from asirra.captcha.ladder import build_attacker

    try:
        folder = build_attacker(name, out, train_data=data, service_url=url, budget=budget, seed=seed)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(str(folder))


# ---- section: captcha study (captcha/study.py) ---------------------------------------------


@captcha_app.command("study")
def captcha_study(
    data: Path = typer.Option(..., "--data", help="Labelled pool: split into a hidden scored set and crafting images."),
    out: Path = typer.Option(..., "--out", help="Folder for report.md, results.csv/json, plots and the cache (rerun to resume)."),
    quick: bool = typer.Option(False, "--quick", help="A few minutes: 24 hidden images, eps 0 and 8, fgsm, a 1-epoch seed-cnn surrogate."),
    scored: Optional[int] = typer.Option(None, "--scored", help="Hidden images scored in every cell (default 300; --quick 24)."),
    craft_limit: Optional[int] = typer.Option(None, "--craft-limit", help="Crafting images the surrogates train on (default 600)."),
    methods: Optional[str] = typer.Option(None, "--methods", help="Comma-separated harden methods (default pgd)."),
    epsilons: Optional[str] = typer.Option(None, "--epsilons", help="Comma-separated, in 1/255 (default 0,2,4,8,16)."),
    attackers: Optional[str] = typer.Option(None, "--attackers", help="Comma-separated: shipped, model folders, or ladder names."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess",
                                             help="Comma-separated counter-moves, + chains steps: none,jpeg:75,median:3,jpeg:75+median:3 "
                                                  "(default none,jpeg:75,median:3)."),
    surrogates: Optional[str] = typer.Option(None, "--surrogates", help="Comma-separated defender models (default effnet-lite0, "
                                             "trained on the crafting images)."),
    headline: Optional[str] = typer.Option(None, "--headline", help="Live attacks: strongest (default), all or none."),
    live_challenges: Optional[int] = typer.Option(None, "--live-challenges", help="Challenges per live attack (default 60)."),
    attacker_pool: Optional[int] = typer.Option(None, "--attacker-pool", min=12,
                                                help="Crafting images adaptive attackers learn from, hardened per setting (default 300)."),
    baselines: Optional[str] = typer.Option(None, "--baselines", help="Comma-separated distortion baselines served and attacked "
                                            "the same way: noise, blur, warp, contrast, clutter, or KIND:STRENGTH (default none; --quick noise)."),
    seed: SeedOption = 0,
) -> None:
    """The hardening study: methods x epsilon x attackers x counter-moves on served bytes, with live attacks."""
    from dataclasses import replace

    from asirra.captcha.study import StudyConfig, parse_epsilons, parse_list, parse_moves, quick_config, run_study

    try:
        config = quick_config(seed=seed) if quick else StudyConfig(seed=seed)
        given = {"scored": scored, "craft_limit": craft_limit, "headline": headline, "live_challenges": live_challenges,
                 "attacker_pool": attacker_pool, "baselines": parse_list(baselines) if baselines else None, "methods": parse_list(methods) if methods else None,
                 "epsilons": parse_epsilons(epsilons) if epsilons else None,
                 "attackers": parse_list(attackers) if attackers else None,
                 "preprocess": parse_moves(preprocess) if preprocess else None,
                 "surrogates": parse_list(surrogates) if surrogates else None}
        config = replace(config, **{k: v for k, v in given.items() if v is not None})
        result = run_study(data, out, config)
    except ValueError as exc:
        fail(str(exc))
    goal = result.goal
    typer.echo(f"{len(result.cells)} cells, {len(result.live)} live attacks; goal "
               f"{'met' if goal['met'] else 'not met'}; wrote {result.files['report']}")


# ---- section: serve / attack (captcha/service.py, captcha/attack.py) -------------------------


@app.command("serve")
def serve_command(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    safeguard: str = typer.Option("none", "--safeguard", help=_SAFEGUARD_HELP),
    ttl: float = typer.Option(120.0, "--ttl", min=1.0, help="Seconds a challenge stays answerable."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds which challenges are drawn (tokens stay random)."),
    challenge_rate: float = typer.Option(1.0, "--challenge-rate", min=0.001,
                                         help="New challenges per second per client (raise it to measure a bot unthrottled)."),
    redis_url: Optional[str] = typer.Option(None, "--redis", help="Keep all state in Redis, e.g. redis://127.0.0.1:6379/0 "
                                            "(shared by every worker and instance; needs --secret-file)."),
    workers: int = typer.Option(1, "--workers", min=1, help="Worker processes (more than 1 needs --redis)."),
    secret_file: Optional[Path] = typer.Option(None, "--secret-file", help="File of >= 32 random bytes: the key for "
                                               "cookies and pass tokens, shared by every worker and instance."),
    sites_file: Optional[Path] = typer.Option(None, "--sites", help='JSON {"sites": [{"key": ..., "secret": ...}]}: '
                                              "the sites that may request challenges and verify pass tokens."),
) -> None:
    """Serve challenges on a web page and a JSON API until Ctrl-C."""
    from asirra.captcha.clients import load_sites, read_secret_file
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service import ServiceSettings, create_app, serve, serve_workers, usable_pool, worker_config
    from asirra.captcha.store import StoreError, claim_pool, ordered_pool, pool_fingerprint
    from asirra.data import scan

    if workers > 1 and not redis_url:
        fail("--workers above 1 needs --redis: in-process state cannot be shared between worker processes")
    if redis_url and not secret_file:
        fail("--redis needs --secret-file, so that every worker and restart signs cookies and pass tokens alike")
    try:
        policy = parse_safeguard(safeguard)
        secret = read_secret_file(secret_file) if secret_file else None
        sites = load_sites(sites_file) if sites_file else None
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            fail(f"--redis must be a redis://HOST:PORT/DB URL, got {redis_url!r}")
        pool = ordered_pool(usable_pool(scan(data, labelled=True)))
        settings = ServiceSettings(ttl_seconds=ttl, seed=seed, challenge_rate=challenge_rate, secret=secret,
                                   redis_url=redis_url)
        if redis_url:
            claim_pool(redis_url, pool_fingerprint(pool))  # a clear error now, not one per request
        web_app = create_app(pool, policy, settings, sites=sites) if workers == 1 else None
    except StoreError as exc:
        fail(str(exc))
    except ValueError as exc:
        fail(str(exc))
    store = f"Redis {redis_url}" if redis_url else "in-process state"
    typer.echo(f"serving {len(pool)} images, safeguard {policy.name}, {store}, {workers} worker(s), "
               f"{len(sites or ())} site(s), at http://{host}:{port}/", err=True)
    if web_app is not None:
        serve(web_app, host, port)
    else:
        config = worker_config(pool, policy, settings, str(secret_file.resolve()),
                               str(sites_file.resolve()) if sites_file else None)
        serve_workers(config, host, port, workers)



@app.command("attack")
def attack_command(
    url: str = typer.Option(..., "--url", help="A running service, e.g. http://127.0.0.1:8000."),
    challenges: int = typer.Option(100, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Challenges in flight at once."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for each HTTP reply."),
    max_wait: float = typer.Option(300.0, "--max-wait", min=0.0,
                                   help="Seconds the whole run may spend waiting out Retry-After (429/503); "
                                        "past it, refusals are recorded as refused, not waited out."),
    preprocess: str = typer.Option("none", "--preprocess",
                                   help="Counter-moves applied to each served image before classifying, in order: "
                                        "jpeg:QUALITY, median:SIZE, blur:SIGMA, resize:FACTOR, e.g. jpeg:75,median:3."),
    target: str = typer.Option("cat", "--target", help="The class the challenge asks to select (one of the model's classes)."),
    as_json: JsonFlag = False,
) -> None:
    """Solve a running service's challenges over HTTP with the classifier, as a bot would.

    Refused challenges (rate limits, errors) are reported apart: the solve rate is passes / answered.
    """
    from asirra.captcha.attack import aim, attack, check_settings
    from asirra.captcha.counter import parse_preprocess
    from asirra.predict import load_classifier

    try:
        check_settings(url, challenges, concurrency, max_wait)
        pipeline = parse_preprocess(preprocess)
        classifier = aim(load_classifier(model, backend=backend), target)  # refuses a class the model lacks
        report = attack(url, challenges, classifier, concurrency=concurrency, timeout=timeout, max_wait=max_wait,
                        preprocess=pipeline, progress=True)
    except ValueError as exc:
        fail(str(exc))
    if report.refused.get("ConnectError") == report.attempted:
        fail(f"cannot connect to {url}; is the service running?")
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.summary_lines():
        typer.echo(line)



if __name__ == "__main__":
    app()
