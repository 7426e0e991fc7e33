"""Transfer learning: linear and finetune strategies, reuse of cached backbone activations, frozen batch norm."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from model_support import tiny_train_config, write_pattern_dataset

import asirra.transfer
from asirra.models import create_model, load_model
from asirra.tasks import CachedActivationTask, make_task
from asirra.training import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_pattern_dataset(tmp_path_factory.mktemp("data") / "train", per_class=6)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def backbone_calls(monkeypatch):
    """Records ONNX exports and the number of images each backbone run processes."""
    calls = {"exports": 0, "rows": []}
    export, run = asirra.transfer.export_onnx, asirra.transfer.run_onnx

    def counting_export(*args, **kwargs):
        calls["exports"] += 1
        return export(*args, **kwargs)

    def counting_run(session, pixels):
        calls["rows"].append(len(pixels))
        return run(session, pixels)

    monkeypatch.setattr(asirra.transfer, "export_onnx", counting_export)
    monkeypatch.setattr(asirra.transfer, "run_onnx", counting_run)
    return calls


def transfer_config(data, out, **overrides):
    return tiny_train_config(data, out, model="effnet-lite0", batch_size=4, augment=None, **overrides)


def epochs_logged(run) -> list[str]:
    with open(run / "metrics.csv", newline="") as f:
        return [row["epoch"] for row in csv.DictReader(f)]


def test_linear_strategy_trains_the_head_and_reuses_cached_activations(data, tmp_path, backbone_calls):
    first = train(transfer_config(data, tmp_path / "first", strategy="linear", epochs=2))
    assert epochs_logged(first) == ["1", "2"]
    assert backbone_calls["exports"] == 1
    assert sum(backbone_calls["rows"]) >= 2 * 12  # every image, original and mirrored
    activations = list((tmp_path / "cache" / "activations").iterdir())
    assert len(activations) == 1

    backbone_calls["rows"].clear()
    second = train(transfer_config(data, tmp_path / "second", strategy="linear", epochs=1))
    assert backbone_calls["exports"] == 1  # still only the first run's export
    assert sum(backbone_calls["rows"]) < 12  # the backbone did not run over the images again
    assert list((tmp_path / "cache" / "activations").iterdir()) == activations
    assert epochs_logged(second) == ["1"]

    trained, _ = load_model(first)
    pretrained = create_model("effnet-lite0")
    assert torch.equal(trained.backbone.blocks[15]._project_conv.weight, pretrained.backbone.blocks[15]._project_conv.weight)


@pytest.mark.slow  # a second backbone export
def test_finetune_unfreeze_1_trains_the_top_block_with_imagenet_batch_norm_statistics(data, tmp_path, backbone_calls):
    run = train(transfer_config(data, tmp_path / "run", strategy="finetune", unfreeze=1, epochs=1))
    assert epochs_logged(run) == ["1"]
    assert backbone_calls["exports"] == 1

    trained, _ = load_model(run)
    pretrained = create_model("effnet-lite0")
    top, frozen = trained.backbone.blocks[15], trained.backbone.blocks[14]
    assert not torch.equal(top._project_conv.weight, pretrained.backbone.blocks[15]._project_conv.weight)
    assert torch.equal(frozen._project_conv.weight, pretrained.backbone.blocks[14]._project_conv.weight)
    assert torch.equal(top._bn2.running_mean, pretrained.backbone.blocks[15]._bn2.running_mean)
    assert torch.equal(top._bn2.running_var, pretrained.backbone.blocks[15]._bn2.running_var)


def test_finetune_train_mode_keeps_batch_norm_in_eval_and_freezes_the_lower_blocks():
    net = create_model("effnet-lite0", pretrained=False)
    activations = np.zeros((4, 1, 1, 1), np.float16)  # never read here
    config = tiny_train_config(".", Path("unused") / "run", model="effnet-lite0", lr=1e-3)
    task = CachedActivationTask(net, 15, activations, np.array([0, 1, 0, 1]), np.arange(2), np.arange(2, 4), config)

    task.set_train_mode()
    assert net.training and net.head.training
    batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert batch_norms and not any(m.training for m in batch_norms)

    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in net.named_parameters() if name.startswith(("backbone.blocks.15.", "backbone.top.", "head."))}
    groups = task.parameter_groups(config)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3 * config.backbone_lr_scale]
    assert groups[0]["params"] == list(net.head.parameters())


def test_transfer_strategies_refuse_a_network_without_pretrained_weights_or_a_bad_unfreeze(tmp_path):
    with pytest.raises(ValueError, match="needs a pretrained backbone"):
        make_task(None, None, None, tiny_train_config(".", tmp_path / "r", strategy="linear"))
    with pytest.raises(ValueError, match="--unfreeze must be between 1 and 16"):
        make_task(None, None, None, transfer_config(".", tmp_path / "r", strategy="finetune", unfreeze=17))

