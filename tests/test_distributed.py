"""Data-parallel training: shards, the helpers in a world of one, and real 2-process runs on this machine.

The end-to-end tests launch this file under torchrun as the worker (see `worker` at the bottom):
it runs `asirra train` on each rank and dumps the rank's weights after the loop, so the test can
compare the replicas.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import write_pattern_dataset

from asirra import distributed

HERE = Path(__file__).resolve()
LAUNCH_TIMEOUT = 420  # seconds: a hung rank fails the test instead of the suite


# ---- shards and helpers, one process ------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(37, 2), (40, 2), (41, 3), (5, 4)])
def test_shards_are_disjoint_equal_and_cover_all_but_the_remainder(n, size):
    order = np.random.default_rng(1).permutation(n)
    shards = [distributed.shard(order, rank, size) for rank in range(size)]
    assert {len(s) for s in shards} == {n // size}
    together = np.concatenate(shards)
    assert len(set(together.tolist())) == len(together) == n - n % size


def test_a_global_batch_is_the_union_of_the_ranks_batches():
    """With the batch split N ways, step k of N ranks trains on what step k of one process would."""
    order, batch, size = np.random.default_rng(2).permutation(64), 16, 2
    local = distributed.local_batch_size(batch, size)
    for k in range(len(order) // batch):
        union = np.concatenate([distributed.shard(order, r, size)[k * local : (k + 1) * local] for r in range(size)])
        assert sorted(union) == sorted(order[k * batch : (k + 1) * batch])


def test_a_world_of_one_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    order = np.arange(7)
    assert distributed.world() == distributed.World() and distributed.world().is_main
    assert distributed.shard(order) is order
    assert distributed.local_batch_size(64) == 64 and distributed.rank_seed(123) == 123
    assert distributed.main_only(lambda x: x + 1, 1) == 2 and distributed.main_first(lambda: "a") == "a"
    assert distributed.sum_over_ranks([1.5, 2]) == [1.5, 2]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert p.grad.tolist() == [2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="boom"):
        distributed.main_only(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="--batch-size 63 does not split into 2 equal batches"):
        distributed.local_batch_size(63, 2)
    with pytest.raises(ValueError, match="batches of 2 or more"):
        distributed.local_batch_size(4, 4)


def test_nproc_refuses_bad_input_in_one_line_before_starting_processes(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from asirra.cli import app

    data = write_pattern_dataset(tmp_path / "train", per_class=2)
    base = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--nproc", "2"]
    result = CliRunner().invoke(app, [*base, "--batch-size", "7"])
    assert result.exit_code == 2 and "error: --batch-size 7 does not split into 2 equal batches" in result.output
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, base)
    assert result.exit_code == 2 and "leave it out under torchrun" in result.output
    assert not (tmp_path / "run").exists()


# ---- two processes ------------------------------------------------------------------------------


def _helpers_on_two_ranks(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    seen = {}

    def fails_on_rank_0():
        raise ValueError("no such data")

    for name, call in [("main_only", lambda: distributed.main_only(fails_on_rank_0)),
                       ("main_first", lambda: distributed.main_first(fails_on_rank_0)),
                       ("agree", lambda: distributed.agree(rank, "numbers"))]:
        try:
            call()
            seen[name] = "returned"
        except Exception as exc:
            seen[name] = f"{type(exc).__name__}: {exc}"
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0]) * (rank + 1)
    distributed.average_gradients([p])
    seen["gradient"] = p.grad.tolist()
    seen["shared"] = distributed.main_only(lambda: f"from rank {rank}")
    results[rank] = seen


@pytest.mark.slow  # two spawned interpreters importing torch: ~10 s quiet, 40 s under load
def test_a_failure_on_rank_0_reaches_every_rank_instead_of_leaving_it_waiting():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_helpers_on_two_ranks, args=(free_port(), results), nprocs=2, start_method="spawn")
    for rank in range(2):
        seen = results[rank]
        assert seen["main_only"] == "ValueError: no such data"
        assert seen["main_first"] in ("ValueError: no such data", "RuntimeError: rank 0 failed: no such data")
        assert seen["agree"] == "DataError: rank 1 sees different numbers from rank 0"
        assert seen["gradient"] == [1.5, 4.5] and seen["shared"] == "from rank 0"
    assert results[1]["main_first"] == "RuntimeError: rank 0 failed: no such data"



@pytest.fixture
def job(tmp_path, monkeypatch):
    """A tiny data set and a small, fast seed-cnn recipe (as a config file) in tmp_path."""
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    data = write_pattern_dataset(tmp_path / "data" / "train", per_class=20, size=(40, 36))
    config = {"data": str(data), "out": str(tmp_path / "runs" / "run"), "model": "seed-cnn", "image_size": 32,
              "model_options": {"widths": [8, 16], "dense": 32}, "batch_size": 8, "epochs": 1, "workers": 1,
              "bf16": False, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def run_checked(command: list[str], cwd: Path) -> str:
    """Run a launcher to completion; on timeout (a rank waiting forever) kill it with all its ranks."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(HERE.parent)}, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{command} still running after {LAUNCH_TIMEOUT} s (a rank waiting for another?):\n{output[-3000:]}")
    assert process.returncode == 0, f"{command} failed:\n{output[-5000:]}"
    return output


def asirra_train(job: Path, *options: str) -> str:
    """`asirra train --nproc 2` as a user types it (torchrun launched by the command)."""
    return run_checked([str(Path(sys.executable).with_name("asirra")), "train", "--config", str(job / "config.json"),
                        "--nproc", "2", *options], job)


def torchrun_worker(job: Path, *options: str, fake_validation: bool = False) -> str:
    """This file as the worker under `torchrun --nproc-per-node 2`, each rank dumping its weights to job/."""
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", str(HERE), str(job),
               *(["--fake-validation"] if fake_validation else []), "--", "--config", str(job / "config.json"), *options]
    return run_checked(command, job)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def epochs_logged(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def replicas(job: Path) -> list[dict]:
    return [torch.load(job / f"rank{rank}.pt", weights_only=True) for rank in range(2)]


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert different == [], f"replicas differ in {different}"


@pytest.mark.slow
def test_two_processes_train_equal_replicas_into_one_run_folder_and_resume(job):
    asirra_train(job)
    run = job / "runs" / "run"
    assert [p.name for p in (job / "runs").iterdir()] == ["run"]
    assert epochs_logged(run) == [1]
    assert json.loads((run / "env.json").read_text())["processes"] == 2
    assert {"checkpoint.pt", "model", "metrics.json", "curves.png", "split.json", "val_predictions.csv"} <= {
        p.name for p in run.iterdir()}
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    first_row = (run / "metrics.csv").read_text().splitlines()[1]

    output = torchrun_worker(job, "--resume", "--epochs", "2")
    assert f"resuming {run} after epoch 1" in output
    assert epochs_logged(run) == [1, 2]  # each epoch once, though two ranks trained it
    assert (run / "metrics.csv").read_text().splitlines()[1] == first_row
    rank0, rank1 = replicas(job)
    assert_equal_states(rank0, rank1)
    # What rank 0 saved is what both ranks hold.
    assert_equal_states(torch.load(run / "checkpoint.pt", weights_only=True)["model"], rank0)


@pytest.mark.slow
def test_early_stopping_is_decided_once_for_every_rank(job):
    """Rank 0's validation never improves after epoch 1, rank 1's would improve forever: were each rank
    to decide for itself, rank 0 would stop after epoch 2 and rank 1 would wait for it in epoch 3 until
    the timeout. Both stop after epoch 2, with equal weights."""
    torchrun_worker(job, "--epochs", "5", "--patience", "1", fake_validation=True)
    assert epochs_logged(job / "runs" / "run") == [1, 2]
    assert_equal_states(*replicas(job))


# ---- the worker torchrun runs on each rank --------------------------------------------------------


def worker(dump: Path, fake_validation: bool, train_args: list[str]) -> None:
    import asirra.tasks
    import asirra.training
    from asirra.cli import app

    rank = int(os.environ["RANK"])
    fit = asirra.training.fit

    def fit_and_dump(task, *args, **kwargs):
        state = fit(task, *args, **kwargs)
        torch.save(task.model.state_dict(), dump / f"rank{rank}.pt")  # the replica, before rank 0 reloads the best epoch
        return state

    asirra.training.fit = fit_and_dump
    if fake_validation:
        calls = [0]

        def val_logits(task):
            calls[0] += 1
            labels = task.labels[task.val_idx]
            if rank == 0:
                return torch.zeros(len(labels)), labels  # the same loss every epoch: no improvement after the first
            return (2.0 * labels - 1) * calls[0], labels  # ever more confident and right: always improving

        asirra.tasks.PixelTask.val_logits = val_logits
    app(["train", *train_args], prog_name="asirra")


if __name__ == "__main__":
    dump_dir, *rest = sys.argv[1:]
    fake = "--fake-validation" in rest
    worker(Path(dump_dir), fake, rest[rest.index("--") + 1 :])
