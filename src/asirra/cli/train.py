"""`asirra train`, `cv`, `ablate` and `tune`: training runs, and the experiments made of them."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from asirra import tuning  # light: optuna and torch load inside its functions
from asirra.cli.common import SeedOption, with_options_of
from asirra.config import Schedule, Strategy
from asirra.config import default as train_default
from asirra.crossval import HAMMING_THRESHOLD, cross_validate

DATA_HELP = "Labelled images: cat/dog, or one folder per class with any names (default: the --data lookup, its train/)."


def train_command(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(
        None, "--config", help="A training config JSON (a run's config.json, `asirra tune`'s best_config.json); "
                               "options given on the command line override it.", show_default=False),
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
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
    from asirra import api
    from asirra.distributed import end_rank_process, launched_as_rank

    try:
        result = api.train(data, config=config_file, out=out if _given(ctx, "out") else None, resume=resume,
                           nproc=nproc, **train_options_given(ctx))
    except api.TrainingFailed as exc:  # rank 0 reported the run as it went; torchrun's exit code is ours
        raise typer.Exit(exc.exit_code) from None
    if nproc > 1:
        return
    run = result.run
    typer.echo(f"run folder: {run}  (model: {run / 'model'}, curves: {run / 'curves.png'})")
    if launched_as_rank():
        end_rank_process()  # a finished torchrun rank: not to be aborted by the runtime's own teardown


# `asirra train`'s options that are TrainConfig fields (its others: --config, --data, --out, --resume, --nproc).
TRAIN_FIELDS = ("model", "image_size", "strategy", "epochs", "batch_size", "lr", "weight_decay", "unfreeze", "views",
                "schedule", "label_smoothing", "patience", "limit", "seed", "augment", "tta", "compile")


def _given(ctx: typer.Context, name: str) -> bool:
    # By name: typer vendors its own click, whose ParameterSource is not click's.
    return getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE"


def train_options_given(ctx: typer.Context) -> dict:
    """The `asirra train` options given on the command line (they override a --config file; the others are
    TrainConfig's defaults, which every option shows)."""
    return {name: ctx.params[name] for name in TRAIN_FIELDS if _given(ctx, name)}


@with_options_of(train_command, skip=("resume", "nproc"))
def cv_command(
    ctx: typer.Context,
    out: Path = typer.Option(Path("runs/cv"), "--out", help="Folder: folds.json, fold-K run folders, oof.csv, "
                             "suspects.csv/.png, cv.json, cv.png. Rerun the same command to continue it."),
    folds: int = typer.Option(train_default("folds", of=cross_validate), "--folds", min=2, help="Number of folds."),
    train_fraction: float = typer.Option(train_default("train_fraction", of=cross_validate), "--train-fraction", min=0.01, max=1.0,
                                         help="Train each fold on this stratified share of its training images "
                                              "(validation folds unchanged)."),
    hamming: Optional[int] = typer.Option(None, "--hamming", min=0, max=64, show_default=False,
                                          help="dHash bits near-identical images may differ by (they must also "
                                               f"correlate >= 0.9); they share a fold (default: {HAMMING_THRESHOLD})."),
    suspects: int = typer.Option(train_default("n_suspects", of=cross_validate), "--suspects", min=0,
                                 help="Most confident label disagreements to list and draw."),
    drop_from_training: Optional[Path] = typer.Option(None, "--drop-from-training", show_default=False,
                                                      help="CSV with a key column (e.g. a suspects.csv): never train on "
                                                           "these images; they are still validated in their fold."),
    **train_options,
) -> None:
    """Stratified k-fold cross-validation (duplicates and near-duplicates never straddle folds), plus every
    `asirra train` option; out-of-fold predictions and the most suspicious labels."""
    from asirra import api

    api.cross_validate(ctx.params["data"], config=ctx.params["config_file"], out=out, folds=folds,
                       train_fraction=train_fraction, hamming=hamming, suspects=suspects,
                       drop_from_training=drop_from_training, **train_options_given(ctx))


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
    from asirra.data import labelled_root

    ablation = read_ablation(config_file)
    if data is None and "data" in ablation.baseline:
        data = Path(ablation.baseline["data"])
    run_ablation(ablation, str(labelled_root(data)), out, train=not report_only)


def tune_command(
    model: str = typer.Option(train_default("model"), "--model", help="seed-cnn (the notebook's search space) or "
                              "effnet-lite0 / effnet-lite2 (head, top blocks and rates on cached activations)."),
    trials: int = typer.Option(train_default("trials", of=tuning.TuneSettings), "--trials", min=1,
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
    data: Optional[Path] = typer.Option(None, "--data", help=DATA_HELP),
    limit: int = typer.Option(train_default("limit", of=tuning.TuneSettings), "--limit", min=0,
                              help="Images in the tuning subset (0: all); the rest is where held-out images come from."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, show_default=False,
                                         help=f"Most epochs a trial may draw (default: {tuning.DEFAULT_EPOCHS['seed-cnn']} "
                                              f"for seed-cnn, {tuning.DEFAULT_TRANSFER_EPOCHS} for transfer)."),
    heldout: int = typer.Option(train_default("heldout", of=tuning.TuneSettings), "--heldout", min=0,
                                help="Held-out images the best trial's model is scored on (0: skip)."),
    seed: SeedOption = train_default("seed"),
) -> None:
    """Search training settings with Optuna (TPE, median pruning); the best becomes a config `train --config` runs."""
    from asirra import api

    api.tune(data, model=model, trials=trials, out=out, limit=limit, epochs=epochs, heldout=heldout, storage=storage,
             study=study, timeout=timeout, seed=seed)
