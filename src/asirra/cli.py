"""The `asirra` command line: one Typer app, thin wrappers over the package's functions.

Heavy imports (torch, onnxruntime, fastapi) happen inside commands so `asirra --help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

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


# ---- section: data (data.py, download.py) -------------------------------------------------

data_app = typer.Typer(help="Inspect a data set: counts, unusable files, a sample grid.", no_args_is_help=True)
app.add_typer(data_app, name="data")

DATA_PATH_HELP = "Folder or .zip of images (default: --data lookup: $ASIRRA_DATA, ./data/..., ../shared/...)."


@data_app.command("check")
def data_check(
    path: Optional[Path] = typer.Argument(None, help=DATA_PATH_HELP, show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of text."),
    workers: int = typer.Option(2, min=1, help="Decoding threads."),
) -> None:
    """Decode every image: counts per class, size statistics, each unusable file with its reason."""
    from asirra import data

    try:
        root = data.resolve_data_root(path)
        layout = data.detect_layout(root)
        refs = data.scan_all(root)
    except data.DataError as exc:
        fail(str(exc))
    report = data.check(refs, workers=workers)
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
        written = data.show_grid(data.scan(data.resolve_data_root(path)), out, n=n, seed=seed)
    except data.DataError as exc:
        fail(str(exc))
    typer.echo(str(written))


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

MODEL_HELP = "Run folder or model file (default: the model shipped with asirra)."
BACKEND_HELP = "Inference engine: onnx (fast, equals torch), onnx-int8 (fastest; needs `asirra export --int8`) or torch."


def _classifier(model: Optional[str], backend: str, tta: Optional[bool] = None):
    from asirra.predict import load_classifier

    try:
        return load_classifier(model, backend=backend, tta=tta)
    except ValueError as exc:
        fail(str(exc))


@app.command("train")
def train_command(
    data: Optional[Path] = typer.Option(None, "--data", help="Labelled images (default: the --data lookup, its train/)."),
    out: Path = typer.Option(Path("runs/train"), "--out", help="Run folder: config, metrics, plots, checkpoints, model."),
    model: str = typer.Option("seed-cnn", "--model", help="seed-cnn (from scratch), effnet-lite0 or effnet-lite2 (ImageNet-pretrained)."),
    strategy: str = typer.Option("scratch", "--strategy", help="scratch, linear (frozen backbone) or finetune."),
    epochs: int = typer.Option(30, min=1),
    batch_size: int = typer.Option(64, min=2),
    lr: float = typer.Option(1e-3, help="Learning rate (the head's, for transfer strategies)."),
    weight_decay: float = typer.Option(0.0, help="L2 weight decay."),
    unfreeze: int = typer.Option(1, help="finetune: top blocks of the backbone that train (all: 16 for lite0, 21 for lite2)."),
    views: int = typer.Option(2, help="transfer: cached views per image (original, mirror, random warps)."),
    schedule: str = typer.Option("plateau", help="plateau (on val accuracy), cosine or onecycle."),
    label_smoothing: float = typer.Option(0.0),
    patience: int = typer.Option(10, help="Early stopping patience on validation loss."),
    limit: Optional[int] = typer.Option(None, help="Train on a stratified subset of this many images."),
    seed: int = typer.Option(0),
    augment: bool = typer.Option(True, help="Random rotation, shear, zoom, shift and flip."),
    tta: bool = typer.Option(False, "--tta/--no-tta", help="Validate (and later predict) on the mean of image and mirror."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network (slow start, faster epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last completed epoch."),
) -> None:
    """Train a network; the best epoch (by validation loss) is kept, calibrated, in OUT/model."""
    from asirra.augment import AugmentConfig
    from asirra.data import DataError, labelled_split_dirs, resolve_data_root
    from asirra.train import TrainConfig, train

    try:
        root = resolve_data_root(data)
        train_dir = labelled_split_dirs(root)[0] or root
        config = TrainConfig(
            data=str(train_dir), out=str(out), model=model, strategy=strategy, epochs=epochs, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, unfreeze=unfreeze, views=views, schedule=schedule,
            label_smoothing=label_smoothing, patience=patience, limit=limit, seed=seed,
            augment=AugmentConfig() if augment else None, tta=tta, compile=compile,
        )
        run = train(config, resume=resume)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"run folder: {run}  (model: {run / 'model'}, curves: {run / 'curves.png'})")


@app.command("evaluate")
def evaluate_command(
    path: Optional[Path] = typer.Argument(None, help="Labelled images (default: the --data lookup)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
    out: Path = typer.Option(Path("runs/evaluate"), "--out", help="Folder for metrics.json and plots."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a stratified random sample of this many images."),
    split: Optional[Path] = typer.Option(None, help="A run folder: evaluate only its validation images."),
    challenges: int = typer.Option(10_000, help="Random 12-image challenges to draw."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average with the mirrored image (default: as the model was validated)."),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Accuracy, log loss, AUC, confusion, and the share of 12-image challenges solved; plots in OUT."""
    from asirra.data import DataError, labelled_split_dirs, resolve_data_root, scan
    from asirra.evaluate import evaluate_predictions, write_evaluation
    from asirra.images import read_pixels
    from asirra.train import stratified_subset, validation_refs

    try:
        root = resolve_data_root(path)
        refs = scan(labelled_split_dirs(root)[0] or root, labelled=True)
        if split is not None:
            refs = validation_refs(refs, Path(split) / "split.json")
        refs = [refs[i] for i in stratified_subset([r.label for r in refs], limit, seed)]
    except (DataError, ValueError) as exc:
        fail(str(exc))
    clf = _classifier(model, backend, tta)
    preds = _predict_reporting_skips(clf, refs)
    if not preds.refs:
        fail("no readable images to evaluate")
    report = evaluate_predictions(preds.labels, preds.p_dog, n_challenges=challenges, seed=seed,
                                  info={"model": clf.name, "backend": backend, "data": str(root),
                                        "unusable": len(preds.unusable)})
    files = write_evaluation(report, preds.labels, preds.p_dog,
                             lambda idx: [read_pixels(preds.refs[i].read_bytes(), 160) for i in idx],
                             [r.name for r in preds.refs], out)
    if as_json:
        emit_json(report.to_json())
        return
    r = report.to_json()
    auc = "n/a (one class)" if r["auc"] is None else f"{r['auc']:.4f}"
    typer.echo(f"{r['n']} images  accuracy {r['accuracy']:.4f}  log loss {r['log_loss']:.4f}  AUC {auc}")
    if r.get("challenge_solve_rate") is not None:
        typer.echo(f"12-image challenges solved: {r['challenge_solve_rate']:.4f} "
                   f"(95% CI {r['ci_low']:.4f}-{r['ci_high']:.4f}; p^12 = {r['p12']:.4f})")
    for name, file in files.items():
        typer.echo(f"{name}: {file}")


def _predict_reporting_skips(clf, refs):
    from asirra.predict import predict_refs

    preds = predict_refs(clf, refs)
    for item in preds.unusable:
        typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    return preds


@app.command("predict")
def predict_command(
    path: Path = typer.Argument(..., help="An image, or a folder / .zip of images (e.g. test1/)."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
    out: Optional[Path] = typer.Option(None, "--out", help="Submission CSV to write (id,label; 1 = dog)."),
    proba: bool = typer.Option(False, "--proba", help="Write clipped P(dog) instead of 0/1 (log-loss leaderboard)."),
    grid: Optional[Path] = typer.Option(None, "--grid", help="PNG grid of the first predictions."),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="Average with the mirrored image (default: as the model was validated)."),
) -> None:
    """Classify one image (prints `dog 0.97`) or a folder (writes a Kaggle submission)."""
    from asirra.data import DataError, scan
    from asirra.images import UnusableImage
    from asirra.predict import plot_predictions, write_submission

    if path.is_file() and path.suffix.lower() != ".zip":
        clf = _classifier(model, backend, tta)
        try:
            p = float(clf.predict_proba([path])[0])
        except UnusableImage as exc:
            fail(f"{path}: {exc.reason}")
        typer.echo(f"{'dog' if p >= 0.5 else 'cat'} {max(p, 1 - p):.2f}")
        return
    try:
        refs = scan(path, labelled=False)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    clf = _classifier(model, backend, tta)
    preds = _predict_reporting_skips(clf, refs)
    out = out or Path("submission.csv")
    write_submission([r.id for r in preds.refs], preds.p_dog, out, proba=proba)
    typer.echo(f"{len(preds.refs)} predictions -> {out}" + (f" ({len(preds.unusable)} unreadable skipped)" if preds.unusable else ""))
    if grid is not None:
        typer.echo(f"grid: {plot_predictions(preds, grid)}")


@app.command("export")
def export_command(
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
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
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
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
    except ValueError as exc:
        fail(str(exc))
    return classifier, _predict_reporting_skips(classifier, refs)


@captcha_app.command("simulate")
def captcha_simulate(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    challenges: int = typer.Option(10_000, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
    safeguard: str = typer.Option("none", "--safeguard", help=_SAFEGUARD_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many pool images, at random."),
    seed: int = typer.Option(0, "--seed", help="Seeds the pool sample and the challenges."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
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
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=12, help="Score only this many images, at random."),
    challenges: int = typer.Option(20_000, "--challenges", "-n", min=100, help="Challenges per agent and setting."),
    human: float = typer.Option(0.996, "--human", min=0.0, max=1.0, help="Human challenge success (Elson et al.)."),
    human_floor: float = typer.Option(0.99, "--human-floor", min=0.0, max=1.0,
                                      help="Recommend only settings keeping humans above this."),
    out: Path = typer.Option(Path("runs/defend"), "--out", help="Folder for defend.csv, defend.json, defend.png."),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
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



# ---- section: captcha serve / attack (captcha/service.py, captcha/attack.py) ----------------


@captcha_app.command("serve")
def captcha_serve(
    data: Path = typer.Option(..., "--data", help="Labelled images: the pool challenges are drawn from."),
    port: int = typer.Option(8000, "--port", min=1, max=65535),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens it to the network."),
    safeguard: str = typer.Option("none", "--safeguard", help=_SAFEGUARD_HELP),
    ttl: float = typer.Option(120.0, "--ttl", min=1.0, help="Seconds a challenge stays answerable."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seeds which challenges are drawn (tokens stay random)."),
    challenge_rate: float = typer.Option(1.0, "--challenge-rate", min=0.001,
                                         help="New challenges per second per client (raise it to measure a bot unthrottled)."),
) -> None:
    """Serve challenges on a web page and a JSON API until Ctrl-C."""
    from asirra.captcha.safeguards import parse_safeguard
    from asirra.captcha.service import ServiceSettings, create_app, serve, usable_pool
    from asirra.data import scan

    try:
        policy = parse_safeguard(safeguard)
        pool = usable_pool(scan(data, labelled=True))
        web_app = create_app(pool, policy, ServiceSettings(ttl_seconds=ttl, seed=seed, challenge_rate=challenge_rate))
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"serving {len(pool)} images, safeguard {policy.name}, at http://{host}:{port}/", err=True)
    serve(web_app, host, port)


app.command("serve")(captcha_serve)


@captcha_app.command("attack")
def captcha_attack(
    url: str = typer.Option(..., "--url", help="A running service, e.g. http://127.0.0.1:8000."),
    challenges: int = typer.Option(100, "--challenges", "-n", min=1, help="Challenges to attempt."),
    model: Optional[str] = typer.Option(None, "--model", help=MODEL_HELP),
    backend: str = typer.Option("onnx", "--backend", help=BACKEND_HELP),
    concurrency: int = typer.Option(1, "--concurrency", min=1, help="Challenges in flight at once."),
    timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for each HTTP reply."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Solve a running service's challenges over HTTP with the classifier, as a bot would."""
    from asirra.captcha.attack import attack, check_settings
    from asirra.predict import load_classifier

    try:
        check_settings(url, challenges, concurrency)
        classifier = load_classifier(model, backend=backend)
        report = attack(url, challenges, classifier, concurrency=concurrency, timeout=timeout, progress=True)
    except ValueError as exc:
        fail(str(exc))
    if report.errors.get("ConnectError") == report.attempted:
        fail(f"cannot connect to {url}; is the service running?")
    if as_json:
        emit_json(report.to_dict())
        return
    results = ", ".join(f"{verdict} {count}" for verdict, count in report.to_dict()["results"].items())
    errors = ", ".join(f"{kind} x{count}" for kind, count in report.errors.items()) or "none"
    typer.echo(f"{report.model} solved {report.solved} of {report.attempted} challenges = {report.solve_rate:.2%} "
               f"({results}); errors: {errors}")
    if report.latencies_ms:
        typer.echo(f"latency per challenge: p50 {report.percentile_ms(50):.0f} ms, p90 {report.percentile_ms(90):.0f} ms, "
                   f"p99 {report.percentile_ms(99):.0f} ms; {report.attempted / report.seconds:.1f} challenges/s")


app.command("attack")(captcha_attack)


if __name__ == "__main__":
    app()
