"""`asirra tune` on tiny generated data: resuming, pruning, failures, the best config, shared storage, the CLI."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from model_support import write_pattern_dataset  # noqa: E402
from redis_support import redis_server  # noqa: E402,F401  (fixture)

from asirra.tuning import TuneSettings, tune  # noqa: E402

FIXED = {"workers": 1, "bf16": False}
TESTS = Path(__file__).parent


def tiny_space(trial, max_epochs: int) -> dict:
    """A seed-cnn search space a test trains in a second: 32 px, two thin blocks (the real one is tested below).

    Its own names for batch size and width, so the real space's baseline point leaves them to the sampler.
    """
    return {"image_size": 32, "epochs": trial.suggest_int("epochs", 1, max_epochs),
            "lr": trial.suggest_float("lr", 1e-3, 1e-2, log=True),
            "optimizer": trial.suggest_categorical("optimizer", ["adamw", "sgd"]),
            "batch_size": trial.suggest_categorical("tiny_batch", [8, 16]),
            "model_options": {"widths": [4, trial.suggest_categorical("tiny_width", [4, 8])], "dense": 8}}


def run_tune(settings, **kwargs):
    return tune(settings, space=tiny_space, **kwargs)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_pattern_dataset(tmp_path_factory.mktemp("tune-data") / "train", per_class=12)


def tiny(tmp_path: Path, data: Path, **overrides) -> TuneSettings:
    settings = dict(model="seed-cnn", data=str(data), out=str(tmp_path / "tune"), trials=2, epochs=1, limit=None,
                    heldout=0, fixed={**FIXED, "cache_dir": str(tmp_path.parent / "tune-cache")})
    settings.update(overrides)
    return TuneSettings(**settings)


def journal(settings: TuneSettings):
    Path(settings.out).mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(Path(settings.out) / "study.log")))


def load(settings: TuneSettings):
    return optuna.load_study(study_name=settings.study_name, storage=journal(settings))


def new_study(settings: TuneSettings):
    """The study `tune` will load, made first so that a test can plant trials in it."""
    return optuna.create_study(study_name=settings.study_name, storage=journal(settings), direction="minimize")


def read_trials_csv(out) -> list[dict]:
    with open(Path(out) / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("model", ["seed-cnn", "effnet-lite2"])
def test_every_drawn_config_is_a_valid_training_config(tmp_path, model):
    from asirra.config import OPTIMIZERS, TrainConfig
    from asirra.tuning import trial_config

    settings = TuneSettings(model=model, data="data", out=str(tmp_path), epochs=6)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        config = trial_config(settings, trial, tmp_path / "run")
        assert TrainConfig.from_dict(config.to_dict()) == config  # survives the JSON round trip best_config.json takes
        assert 2 <= config.epochs <= 6
        if model == "seed-cnn":
            widths = config.model_options["widths"]
            assert config.image_size in (64, 96, 128, 160) and config.image_size % 2 ** len(widths) == 0
            assert 2 <= len(widths) <= 5 and config.optimizer in OPTIMIZERS
            assert config.augment.rotation_deg == pytest.approx(15.0 * trial.params["augment_strength"])
        else:
            assert config.strategy.value in ("linear", "finetune") and config.views in (1, 2)
            assert ("unfreeze" in trial.params) == (config.strategy.value == "finetune")
        study.tell(trial, 0.5)


def test_a_resumed_study_continues_its_trial_count(tmp_path, data):
    first = tiny(tmp_path, data, trials=2)
    run_tune(first)
    assert [t.number for t in load(first).trials] == [0, 1]

    run_tune(tiny(tmp_path, data, trials=3))  # the study's total is 3: one more trial, not three
    study = load(first)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert sorted(p.name for p in (Path(first.out) / "trials").iterdir()) == ["trial-0", "trial-1", "trial-2"]

    run_tune(tiny(tmp_path, data, trials=3))  # already complete: nothing runs
    assert len(load(first).trials) == 3
    assert [r["number"] for r in read_trials_csv(first.out)] == ["0", "1", "2"]


def test_a_study_resumed_with_other_settings_is_refused(tmp_path, data):
    run_tune(tiny(tmp_path, data, trials=1))
    with pytest.raises(ValueError, match="other settings.*seed"):
        run_tune(tiny(tmp_path, data, trials=2, seed=7))


def test_the_median_pruner_prunes_a_trial_worse_than_the_median(tmp_path, data):
    settings = tiny(tmp_path, data, trials=2, epochs=3)
    study = new_study(settings)
    # A finished trial whose every epoch beat anything a real one can reach: the next trial is
    # worse than the median at its first epoch, so median pruning with no warm-up must stop it there.
    study.add_trial(optuna.trial.create_trial(value=1e-6, intermediate_values={1: 1e-6, 2: 1e-6, 3: 1e-6}))
    study.enqueue_trial({"epochs": 3})
    run_tune(settings, pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))

    trial = load(settings).trials[1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [1]
    assert trial.user_attrs["note"].startswith("pruned after epoch 1")
    row = read_trials_csv(settings.out)[1]
    assert (row["state"], row["epochs_run"]) == ("PRUNED", "1")
    run = Path(trial.user_attrs["run"])
    assert (run / "checkpoint.pt").exists()  # left resumable
    assert not (Path(settings.out) / "best_config.json").exists()  # no trial of ours completed


def test_a_trial_whose_loss_turns_nan_is_recorded_as_failed(tmp_path, data):
    settings = tiny(tmp_path, data, trials=2)
    new_study(settings).enqueue_trial({"optimizer": "sgd", "lr": 1e30})
    with pytest.warns(UserWarning):  # optuna: the enqueued lr lies outside the search range
        run_tune(settings)
    failed, after = load(settings).trials
    assert failed.state == optuna.trial.TrialState.FAIL
    assert "not finite" in failed.user_attrs["note"]
    assert after.state == optuna.trial.TrialState.COMPLETE  # the study goes on
    assert [r["state"] for r in read_trials_csv(settings.out)] == ["FAIL", "COMPLETE"]


def test_timeout_stops_the_running_trial_after_an_epoch(tmp_path, data):
    ticks = iter(range(0, 10**6, 100))
    settings = tiny(tmp_path, data, trials=3, epochs=3, timeout=50)
    new_study(settings).enqueue_trial({"epochs": 3})
    run_tune(settings, clock=lambda: next(ticks))  # a fake clock: 100 s pass at every look
    (trial,) = load(settings).trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["note"] == "stopped by --timeout after epoch 1"


def test_an_interrupted_trial_is_rerun_in_its_own_run_folder(tmp_path, data):
    settings = tiny(tmp_path, data, trials=1)
    study = new_study(settings)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = study.ask()  # what a process killed mid-trial leaves: a RUNNING trial
    killed.set_user_attr("host", socket.gethostname())
    killed.set_user_attr("pid", int(dead.stdout))
    run_tune(settings)

    old, rerun = load(settings).trials
    assert old.state == optuna.trial.TrialState.FAIL and old.user_attrs["interrupted"]
    assert rerun.state == optuna.trial.TrialState.COMPLETE
    assert rerun.user_attrs["resume_of"] == 0
    assert rerun.user_attrs["run"].endswith("trial-0")


def test_the_best_config_reproduces_the_best_trial_through_asirra_train(tmp_path, data):
    from typer.testing import CliRunner

    from asirra.cli import app

    settings = tiny(tmp_path, data, trials=2)
    summary = run_tune(settings)
    best_config = Path(settings.out) / "best_config.json"
    config = json.loads(best_config.read_text())
    assert config["model_options"]["widths"][1] == summary["best"]["params"]["tiny_width"]

    result = CliRunner().invoke(app, ["train", "--config", str(best_config), "--out", str(tmp_path / "again")])
    assert result.exit_code == 0, result.output

    def first_epoch(run):
        with open(Path(run) / "metrics.csv", newline="") as f:
            return next(csv.DictReader(f))

    trial, again = first_epoch(summary["best"]["run"]), first_epoch(tmp_path / "again")
    assert again["train_loss"] == trial["train_loss"]
    assert again["val_loss"] == trial["val_loss"]
    assert float(trial["train_loss"]) == pytest.approx(summary["best"]["first_epoch_train_loss"])


_WORKER = """
import sys
sys.path.insert(0, sys.argv[5])
from asirra.tuning import TuneSettings, tune
from test_tune import tiny_space
tune(TuneSettings(model="seed-cnn", data=sys.argv[1], out=sys.argv[2], trials=int(sys.argv[3]), epochs=1, limit=None,
                  heldout=0, fixed={"workers": 1, "bf16": False, "cache_dir": sys.argv[4]}), space=tiny_space)
"""


def completed(settings: TuneSettings) -> int:
    try:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in load(settings).trials)
    except KeyError:  # the study is not made yet
        return 0


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_study_in_sqlite_or_redis_storage_resumes_from_it(tmp_path, data, kind, request):
    url = f"sqlite:///{tmp_path / 'study.db'}" if kind == "sqlite" else request.getfixturevalue("redis_server").url
    run_tune(tiny(tmp_path, data, trials=1, storage=url))
    run_tune(tiny(tmp_path, data, trials=2, storage=url, out=str(tmp_path / "elsewhere")))  # another folder, same study
    storage = url if kind == "sqlite" else optuna.storages.JournalStorage(optuna.storages.journal.JournalRedisBackend(url))
    trials = optuna.load_study(study_name="asirra-seed-cnn", storage=storage).trials
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    assert not (tmp_path / "tune" / "study.log").exists()


def test_storage_urls_are_logged_without_their_password():
    from asirra.tuning import describe_storage

    assert describe_storage("redis://:s3cret@db.example:6379/0") == "redis://:***@db.example:6379/0"
    assert describe_storage("sqlite:///x.db") == "sqlite:///x.db"


def test_two_processes_sharing_one_journal_file_add_to_one_study(tmp_path, data):
    out, cache = tmp_path / "shared", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(trials: int):
        return subprocess.Popen([sys.executable, "-c", _WORKER, str(data), str(out), str(trials), str(cache), str(TESTS)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    # The first process aims at 2 trials, the second (started once the first has finished one) at 4:
    # whatever the timing, each must add trials, and the study ends with exactly 4.
    first = start(2)
    deadline = time.monotonic() + 120
    settings = tiny(tmp_path, data, out=str(out))
    while not completed(settings):
        assert first.poll() is None or first.returncode == 0, first.stderr.read()
        assert time.monotonic() < deadline, "the first process finished no trial in 120 s"
        time.sleep(0.2)
    second = start(4)
    for process in (first, second):
        _, err = process.communicate(timeout=180)
        assert process.returncode == 0, err

    trials = load(settings).trials
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert {t.user_attrs["pid"] for t in trials} == {first.pid, second.pid}


def test_cli_tune_writes_the_config_trials_plots_and_heldout_score(tmp_path, data, monkeypatch):
    from typer.testing import CliRunner

    from asirra.cli import app

    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("asirra.tuning.search_space", lambda model: tiny_space)
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, ["tune", "--model", "seed-cnn", "--data", str(data), "--trials", "2",
                                      "--epochs", "1", "--limit", "16", "--heldout", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "best trial" in result.output and "held-out (8 images" in result.output
    summary = json.loads((out / "tune.json").read_text())
    assert summary["trials"] == 2 and summary["settings"]["limit"] == 16
    assert summary["heldout"]["n"] == 8  # the 8 images outside the 16-image tuning subset
    assert (out / "history.png").stat().st_size > 0
    assert summary["plots"]["importances"].endswith("importances.png") or "skipped" in summary["plots"]["importances"]
    rows = read_trials_csv(out)
    assert len(rows) == 2
    assert rows[0]["note"].startswith("baseline") and summary["baseline"]["trial"] == 0  # the defaults go first
    assert (rows[0]["lr"], rows[0]["optimizer"]) == ("0.001", "adamw")
    assert json.loads((out / "best_config.json").read_text())["limit"] == 16


def test_cli_tune_refuses_an_unknown_model_in_one_line(tmp_path, data):
    from typer.testing import CliRunner

    from asirra.cli import app

    result = CliRunner().invoke(app, ["tune", "--model", "resnet-9000", "--data", str(data), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "error: unknown model 'resnet-9000'" in result.output
