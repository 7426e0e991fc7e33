"""`asirra evaluate`, `predict`, `explain`, `export` and `demo`: using a trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from asirra.captcha.challenge import SIMULATED_CHALLENGES
from asirra.cli.common import (
    DEFAULT_BACKEND,
    BackendOption,
    JsonFlag,
    ModelOption,
    SeedOption,
    TtaOption,
    emit_json,
    report_skips,
)
from asirra.config import default
from asirra.demo import run_demo


def evaluate_command(
    path: Optional[Path] = typer.Argument(None, help="Labelled images (default: the --data lookup)."),
    model: ModelOption = None,
    backend: BackendOption = DEFAULT_BACKEND,
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json and plots."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a stratified random sample of this many images."),
    split: Optional[Path] = typer.Option(None, help="A run folder: evaluate only its validation images."),
    challenges: int = typer.Option(SIMULATED_CHALLENGES, help="Random 12-image challenges to draw."),
    tta: TtaOption = None,
    seed: SeedOption = 0,
    as_json: JsonFlag = False,
    explain: bool = typer.Option(True, "--explain/--no-explain",
                                 help="Draw each mistake in mistakes.png under its Grad-CAM map (a backward pass for <= 24 images)."),
) -> None:
    """Accuracy, log loss, AUC, confusion, and the share of 12-image challenges solved; plots in OUT.

    A model of other classes than cat/dog: top-1/top-k accuracy, macro-F1, per-class scores, N x N confusion."""
    from asirra import api

    result = api.evaluate(model, path, split=split, limit=limit, out=out, challenges=challenges, explain=explain,
                          seed=seed, backend=backend, tta=tta)
    report_skips(result.unusable)
    if as_json:
        emit_json(result.metrics)
        return
    for line in result.summary_lines():
        typer.echo(line)


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
    as_json: JsonFlag = False,
) -> None:
    """Classify one image (prints `dog 0.97`) or a folder (writes a Kaggle submission, or id,label for other classes).

    With --json: one object naming the engine that answered (backend, int8 kernel path, threads) beside the
    image's label and probabilities, or beside the folder's CSV path and counts."""
    from asirra.calibration import describe_row, predicted_index
    from asirra.data import scan
    from asirra.predict import load_classifier, plot_predictions, predict_refs, write_predictions

    if path.is_file() and path.suffix.lower() != ".zip":
        classifier = load_classifier(model, backend=backend, tta=tta)
        row = classifier.predict_proba([path])[0]
        if as_json:
            label = classifier.classes[int(predicted_index(row[None])[0])]  # the package's one decision rule
            emit_json({"image": str(path), "label": label,
                       "proba": {c: float(p) for c, p in zip(classifier.classes, row)}, "engine": classifier.engine})
            return
        typer.echo(describe_row(row, classifier.classes))
        return
    refs = scan(path, labelled=False)
    classifier = load_classifier(model, backend=backend, tta=tta)
    preds = predict_refs(classifier, refs, progress=not as_json)
    report_skips(preds.unusable)
    out = out or Path("submission.csv")
    write_predictions(preds, out, proba=proba)
    grid_path = plot_predictions(preds, grid) if grid is not None else None
    if as_json:
        emit_json({"predictions": len(preds.refs), "out": str(out), "skipped": preds.unusable,
                   "grid": None if grid_path is None else str(grid_path), "engine": classifier.engine})
        return
    skipped = f" ({len(preds.unusable)} unreadable skipped)" if preds.unusable else ""
    typer.echo(f"{len(preds.refs)} predictions -> {out}{skipped}")
    if grid_path is not None:
        typer.echo(f"grid: {grid_path}")


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
    from asirra import api
    from asirra.gradcam import summary_lines

    report = api.explain(images, model=model, target=class_name, limit=limit, seed=seed, out=out)
    report_skips(report.skipped)
    if as_json:
        emit_json(json.loads(report.files["json"].read_text()))
        return
    for line in summary_lines(report):
        typer.echo(line)


def export_command(
    model: ModelOption = None,
    onnx: bool = typer.Option(True, "--onnx/--no-onnx", help="Write model.onnx beside the weights."),
    int8: bool = typer.Option(False, "--int8", help="Write model.int8.onnx (static int8, made from model.onnx; needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Images whose activation ranges set the int8 scales."),
    package: bool = typer.Option(False, "--package", help="Install the model as the package's default (fp16, with --int8 its int8 export)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Write a copy of the model that reads "
                                             "images at this size into --out (e.g. 260: Lite2's native size, faster)."),
    out: Optional[Path] = typer.Option(None, "--out", help="The folder for the --image-size copy."),
) -> None:
    """Export a model to ONNX (fp32, optionally int8), make it the default model shipped in the package, or
    copy it to read another image size (`--image-size 260 --out DIR`; then `asirra.solve(files, model=DIR)`)."""
    from asirra.export import export_model

    report = export_model(model, onnx=onnx, int8=int8, calibration=calibration, package=package,
                          image_size=image_size, out=out)
    for line in report.summary_lines():
        typer.echo(line)


def demo_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Kaggle-style root with train/ and test1/."),
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    samples: int = typer.Option(default("samples", of=run_demo), help="Validation images to evaluate."),
    challenges: int = typer.Option(default("challenges", of=run_demo), help="Simulated 12-image challenges."),
    backend: BackendOption = DEFAULT_BACKEND,
) -> None:
    """The whole workflow with the shipped model: check data, evaluate, submit, solve challenges, plot."""
    run_demo(data, out, samples=samples, challenges=challenges, backend=backend)

