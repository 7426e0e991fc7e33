"""The training loop's decisions, on a one-weight model whose validation results follow a script:
early stopping, which epoch is kept, the learning-rate schedules and label smoothing.

`fit` only sees a Task, so a scripted task pins each decision down exactly, with no data, no
randomness and no waiting.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from asirra.config import TrainConfig
from asirra.training import fit

LR = 1e-3
BATCH = 4


def logit_with_loss(loss: float) -> float:
    """The logit z whose log loss on a dog (label 1) is `loss`: softplus(-z) = loss."""
    return -math.log(math.expm1(loss))


def by_loss(*losses: float) -> list[tuple[list[float], list[int]]]:
    """A validation script: one dog per epoch, scored with these losses."""
    return [([logit_with_loss(loss)], [1]) for loss in losses]


def by_accuracy(*accuracies: float) -> list[tuple[list[float], list[int]]]:
    """A validation script: four dogs per epoch, this fraction of them called dogs."""
    return [([2.0 if i < round(a * 4) else -2.0 for i in range(4)], [1, 1, 1, 1]) for a in accuracies]


class ScriptedTask:
    """A one-weight logistic model trained on a fixed batch; validation returns the script's next entry.

    It records the weights at each validation (= after each epoch) and the learning rate of each
    optimiser group at each step, so a test can check what fit kept and what it trained with.
    """

    def __init__(self, val_script, batches_per_epoch: int = 1, weight: float = 0.5, groups: int = 1):
        self.model = nn.Linear(1, 1)
        with torch.no_grad():
            self.model.weight.fill_(weight)
            self.model.bias.zero_()
        self.val_script, self.batches_per_epoch, self.n_groups = list(val_script), batches_per_epoch, groups
        self.inputs = torch.ones(BATCH, 1)
        self.targets = torch.ones(BATCH, dtype=torch.long)
        self.snapshots: list[dict] = []
        self.step_lrs: list[list[float]] = []
        self.val_returned: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_train_mode(self) -> None:
        self.model.train()

    def parameter_groups(self, config):
        if self.n_groups == 1:
            self.groups = [{"params": list(self.model.parameters())}]
        else:  # as fine-tuning does: the head at lr, the rest at lr * backbone_lr_scale
            self.groups = [{"params": [self.model.bias], "lr": config.lr},
                           {"params": [self.model.weight], "lr": config.lr * config.backbone_lr_scale}]
        return self.groups  # the optimiser keeps these dicts, so their "lr" is the rate each step uses

    def n_train(self) -> int:
        return self.batches_per_epoch * BATCH

    def train_batches(self, epoch):
        for _ in range(self.batches_per_epoch):
            yield self.inputs, self.targets

    def train_step_logits(self, inputs):
        self.step_lrs.append([group["lr"] for group in self.groups])
        return self.model(inputs).squeeze(1)

    def val_logits(self):
        self.snapshots.append({k: v.clone() for k, v in self.model.state_dict().items()})
        logits, labels = self.val_script[len(self.snapshots) - 1]
        returned = torch.tensor(logits), torch.tensor(labels)
        self.val_returned.append(returned)
        return returned


def config_for(run, **overrides) -> TrainConfig:
    settings = dict(data="unused", out=str(run), epochs=5, batch_size=BATCH, lr=LR, bf16=False, patience=100,
                    schedule="cosine", min_lr=0.0)
    return TrainConfig(**{**settings, **overrides})


def metrics(run) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def column(run, name: str) -> list[float]:
    return [float(row[name]) for row in metrics(run)]


# ---- early stopping and the kept epoch ---------------------------------------------------------


def test_early_stopping_stops_once_validation_loss_fails_to_improve_for_patience_epochs(tmp_path):
    # best at epoch 2; epochs 3 and 4 are worse: with patience 2 the run ends after epoch 4 of 10.
    task = ScriptedTask(by_loss(0.5, 0.4, 0.45, 0.41, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1))
    state = fit(task, config_for(tmp_path, epochs=10, patience=2), tmp_path)
    assert state == {"epoch": 4, "best_val_loss": pytest.approx(0.4), "best_epoch": 2, "bad_epochs": 2}
    assert [int(row["epoch"]) for row in metrics(tmp_path)] == [1, 2, 3, 4]
    assert len(task.snapshots) == 4  # no epoch trained beyond the stop


def test_an_improvement_resets_the_patience_count(tmp_path):
    # bad, better, bad, bad: the two bad epochs before the improvement do not add to the two after it.
    task = ScriptedTask(by_loss(0.5, 0.6, 0.4, 0.45, 0.5, 0.1, 0.1))
    state = fit(task, config_for(tmp_path, epochs=7, patience=2), tmp_path)
    assert state["epoch"] == 5 and state["best_epoch"] == 3
    assert column(tmp_path, "val_loss") == pytest.approx([0.5, 0.6, 0.4, 0.45, 0.5], rel=1e-5)


def test_a_resumed_run_that_had_stopped_early_trains_no_further(tmp_path):
    script = by_loss(0.5, 0.6, 0.7, 0.1, 0.1)
    fit(ScriptedTask(script), config_for(tmp_path, epochs=5, patience=2), tmp_path)
    again = ScriptedTask(script)
    state = fit(again, config_for(tmp_path, epochs=5, patience=2), tmp_path, resume=True)
    assert state["epoch"] == 3 and again.snapshots == [] and len(metrics(tmp_path)) == 3


def test_the_saved_model_is_the_epoch_with_the_lowest_validation_loss_not_the_last(tmp_path):
    task = ScriptedTask(by_loss(0.6, 0.3, 0.5, 0.4, 0.7))
    state = fit(task, config_for(tmp_path, epochs=5), tmp_path)
    assert state["best_epoch"] == 2 and state["epoch"] == 5
    saved = load_file(tmp_path / "model" / "model.safetensors")
    best, last = task.snapshots[1], task.snapshots[-1]
    assert not torch.equal(best["weight"], last["weight"])  # training moved the weight after epoch 2
    for name in ("weight", "bias"):
        assert torch.equal(saved[name], best[name])
    # ...while the checkpoint, which --resume continues from, holds the last epoch.
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert torch.equal(checkpoint["model"]["weight"], last["weight"])


def test_a_tie_with_the_best_loss_is_not_an_improvement(tmp_path):
    task = ScriptedTask(by_loss(0.3, 0.3, 0.3))
    state = fit(task, config_for(tmp_path, epochs=3, patience=2), tmp_path)
    assert state["best_epoch"] == 1 and state["bad_epochs"] == 2
    assert torch.equal(load_file(tmp_path / "model" / "model.safetensors")["weight"], task.snapshots[0]["weight"])


# ---- learning-rate schedules -------------------------------------------------------------------


def test_plateau_halves_the_rate_after_lr_patience_epochs_without_better_accuracy_as_keras_counts(tmp_path):
    # Keras' ReduceLROnPlateau(patience=2): the 2nd epoch in a row without a better validation accuracy
    # cuts the rate for the next epoch, and the count restarts after a cut.
    accuracies = (0.5, 0.75, 0.75, 0.75, 0.75, 0.5, 1.0, 1.0)
    task = ScriptedTask(by_accuracy(*accuracies))
    fit(task, config_for(tmp_path, epochs=8, schedule="plateau", lr_patience=2, lr_factor=0.5, min_lr=1e-5), tmp_path)
    expected = [LR, LR, LR, LR, LR / 2, LR / 2, LR / 4, LR / 4]  # cuts after epochs 4 and 6
    assert [lrs[0] for lrs in task.step_lrs] == pytest.approx(expected, rel=1e-9)
    assert column(tmp_path, "lr") == pytest.approx(expected, rel=1e-5)  # the rate each epoch trained with
    assert column(tmp_path, "val_acc") == pytest.approx(accuracies)


def test_plateau_never_cuts_below_min_lr(tmp_path):
    task = ScriptedTask(by_accuracy(*[0.5] * 9))
    fit(task, config_for(tmp_path, epochs=9, schedule="plateau", lr_patience=1, lr_factor=0.5, min_lr=3e-4), tmp_path)
    # epoch 1 sets the best; every later epoch is a bad one and cuts: 1e-3, 5e-4, then 2.5e-4 floored at 3e-4
    assert [lrs[0] for lrs in task.step_lrs] == pytest.approx([LR, LR, LR / 2] + [3e-4] * 6, rel=1e-9)


def test_cosine_follows_the_half_cosine_per_step_and_ends_at_min_lr(tmp_path):
    epochs, per_epoch, min_lr = 4, 3, 1e-5
    task = ScriptedTask(by_loss(*[0.5] * epochs), batches_per_epoch=per_epoch)
    fit(task, config_for(tmp_path, epochs=epochs, schedule="cosine", min_lr=min_lr), tmp_path)
    total = epochs * per_epoch
    expected = [min_lr + (LR - min_lr) * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)]
    assert [lrs[0] for lrs in task.step_lrs] == pytest.approx(expected, rel=1e-9)
    assert column(tmp_path, "lr")[-1] == pytest.approx(min_lr, rel=1e-5)  # where the last step leaves it


def test_onecycle_warms_up_to_each_groups_own_rate_then_anneals_far_below_it(tmp_path):
    epochs, scale = 10, 0.1
    task = ScriptedTask(by_loss(*[0.5] * epochs), groups=2)
    fit(task, config_for(tmp_path, epochs=epochs, schedule="onecycle", backbone_lr_scale=scale), tmp_path)
    for group, peak in ((0, LR), (1, LR * scale)):
        rates = [lrs[group] for lrs in task.step_lrs]
        assert len(rates) == epochs
        assert max(rates) == pytest.approx(peak, rel=1e-9)
        top = rates.index(max(rates))
        assert rates[0] == pytest.approx(peak / 25, rel=1e-9)  # OneCycle's start: max_lr / div_factor
        assert all(a < b for a, b in zip(rates[:top], rates[1 : top + 1]))  # rising to the peak
        assert all(a > b for a, b in zip(rates[top:], rates[top + 1 :]))  # then falling
        assert 0 < top < epochs - 1 and rates[-1] < peak / 1000


# ---- label smoothing ---------------------------------------------------------------------------


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_training_loss_is_log_loss_against_targets_pulled_towards_one_half(tmp_path, smoothing):
    # A confident, correct model (logit 8 on dogs): its first step's loss is the cross-entropy
    # against y * (1 - s) + 0.5 * s, which smoothing raises from ~3e-4 towards a floor.
    task = ScriptedTask(by_loss(0.5), weight=8.0)
    fit(task, config_for(tmp_path, epochs=1, label_smoothing=smoothing), tmp_path)
    target = 1 * (1 - smoothing) + 0.5 * smoothing
    z = torch.tensor(8.0)
    expected = -(target * F.logsigmoid(z) + (1 - target) * F.logsigmoid(-z)).item()
    assert column(tmp_path, "train_loss")[0] == pytest.approx(expected, rel=1e-5)


def test_smoothing_raises_the_loss_of_a_confident_correct_prediction(tmp_path):
    losses = {}
    for smoothing in (0.0, 0.1):
        run = tmp_path / str(smoothing)
        run.mkdir()
        fit(ScriptedTask(by_loss(0.5), weight=8.0), config_for(run, epochs=1, label_smoothing=smoothing), run)
        losses[smoothing] = column(run, "train_loss")[0]
    assert losses[0.0] < 1e-3 < 0.3 < losses[0.1]


def test_smoothed_training_settles_at_the_logit_of_the_smoothed_target_and_validation_stays_unsmoothed(tmp_path):
    # Minimising cross-entropy against target t puts the logit at log(t / (1 - t)); without
    # smoothing it keeps growing.
    steps, s = 150, 0.1
    final = {}
    for smoothing in (0.0, s):
        run = tmp_path / str(smoothing)
        run.mkdir()
        task = ScriptedTask(by_loss(0.5), batches_per_epoch=steps, weight=0.0)
        fit(task, config_for(run, epochs=1, lr=0.1, schedule="plateau", label_smoothing=smoothing), run)
        final[smoothing] = task.model(torch.ones(1, 1)).item()
        val_logits, val_labels = task.val_returned[0]
        unsmoothed = F.binary_cross_entropy_with_logits(val_logits, val_labels.float()).item()
        assert column(run, "val_loss")[0] == pytest.approx(unsmoothed, rel=1e-5)
    t = 1 - s / 2
    assert final[s] == pytest.approx(math.log(t / (1 - t)), abs=0.05)
    assert final[0.0] > final[s] + 2
