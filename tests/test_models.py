"""The model registry and model files: safetensors + JSON, fp16, folder lookup, offline pretrained weights."""

import json
import socket

import numpy as np
import pytest
import torch
from model_support import save_spread_model, varied_images
from safetensors.numpy import load_file as load_numpy

from asirra.images import read_pixels
from asirra.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ModelConfig,
    available_models,
    create_model,
    image_size_of,
    load_model,
    resolve_model_folder,
    save_model,
)


def seed_cnn_with_statistics() -> torch.nn.Module:
    """A seed-cnn whose batch-norm statistics are not the defaults, so a round trip must carry them."""
    torch.manual_seed(0)
    model = create_model("seed-cnn")
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 128, 128) * 255)
    return model.eval()


def pixels(n: int = 3, size: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 255


def test_registry_lists_both_networks_with_their_input_sizes():
    assert {"seed-cnn", "effnet-lite0"} <= set(available_models())
    assert image_size_of("seed-cnn") == 128
    assert image_size_of("effnet-lite0") == 224


def test_unknown_model_name_is_a_clear_value_error():
    with pytest.raises(ValueError, match=r"unknown model 'resnet-9000'; available: .*seed-cnn"):
        create_model("resnet-9000")
    with pytest.raises(ValueError, match="unknown model"):
        image_size_of("resnet-9000")


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model = seed_cnn_with_statistics()
    config = ModelConfig("seed-cnn", 128, temperature=1.7, extra={"seed": 3})
    save_model(model, config, tmp_path / "m")

    loaded, loaded_config = load_model(tmp_path / "m")
    assert loaded_config == config
    assert not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels()), model(pixels()), rtol=0, atol=0)


def test_model_files_are_safetensors_and_json_without_pickle(tmp_path):
    model = seed_cnn_with_statistics()
    save_model(model, ModelConfig("seed-cnn", 128), tmp_path)

    # Readable by safetensors' NumPy loader and the json module alone: nothing is unpickled.
    tensors = load_numpy(tmp_path / WEIGHTS_FILE)
    assert set(tensors) == set(model.state_dict())
    np.testing.assert_array_equal(tensors["features.0.1.running_var"], model.state_dict()["features.0.1.running_var"].numpy())
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["name"] == "seed-cnn"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files left behind


def test_half_precision_files_are_half_the_size_and_give_close_logits(tmp_path):
    model, config = load_model(save_spread_model(tmp_path / "fp32"))
    save_model(model, config, tmp_path / "fp16", half=True)

    stored = load_numpy(tmp_path / "fp16" / WEIGHTS_FILE)
    assert stored["classifier.1.weight"].dtype == np.float16
    assert stored["features.0.1.running_var"].dtype == np.float32  # tiny variances would underflow in fp16
    size = lambda name: (tmp_path / name / WEIGHTS_FILE).stat().st_size  # noqa: E731
    assert size("fp16") < 0.55 * size("fp32")

    loaded, _ = load_model(tmp_path / "fp16")
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.from_numpy(np.stack([read_pixels(im, 128) for im in varied_images()])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        expected, got = model(x), loaded(x)
    assert expected.std() > 1  # logits spread over several units, so the tolerance below is meaningful
    torch.testing.assert_close(got, expected, atol=0.02, rtol=0.01)


def test_resolve_model_folder_accepts_run_folder_model_folder_and_files(tmp_path):
    run = tmp_path / "run"
    folder = save_model(create_model("seed-cnn"), ModelConfig("seed-cnn", 128), run / "model")
    for path in (run, folder, folder / CONFIG_FILE, folder / WEIGHTS_FILE, str(run)):
        assert resolve_model_folder(path) == folder


def test_missing_or_mismatched_model_is_a_clear_value_error(tmp_path):
    with pytest.raises(ValueError, match="no model at"):
        resolve_model_folder(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / CONFIG_FILE).write_text("{}")  # weights missing
    with pytest.raises(ValueError, match="no model at"):
        load_model(tmp_path / "half")

    save_model(create_model("seed-cnn"), ModelConfig("effnet-lite0", 224), tmp_path / "wrong")
    with pytest.raises(ValueError, match="do not match effnet-lite0"):
        load_model(tmp_path / "wrong")


def test_effnet_lite0_loads_imagenet_weights_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket, "socket", no_network)
    pretrained = create_model("effnet-lite0")
    again = create_model("effnet-lite0")
    random = create_model("effnet-lite0", pretrained=False)

    stem = lambda net: net.backbone.stem[0].weight  # noqa: E731
    assert torch.equal(stem(pretrained), stem(again))  # the same file, not a random draw
    assert not torch.equal(stem(pretrained), stem(random))
    # ImageNet statistics, not batch norm's defaults of mean 0 / variance 1.
    running_var = pretrained.backbone.stem[1].running_var
    assert not torch.allclose(running_var, torch.ones_like(running_var))


def test_features_below_then_from_equals_pooled_features():
    backbone = create_model("effnet-lite0", pretrained=False).eval().backbone
    x = pixels(2, size=64)  # fully convolutional: a smaller input keeps the test fast
    with torch.no_grad():
        whole = backbone(x)
        assert whole.shape == (2, backbone.n_features)
        for k in (0, 1, 8, backbone.n_blocks):
            torch.testing.assert_close(backbone.features_from(backbone.features_below(x, k), k), whole, msg=f"k={k}")


def test_effnet_lite2_is_fed_above_its_training_resolution():
    net = create_model("effnet-lite2", pretrained=False).eval()
    assert (net.backbone.variant, net.backbone.size, image_size_of("effnet-lite2")) == ("lite2", 300, 300)
    with torch.no_grad():
        assert net(pixels(2, size=300)).shape == (2,)


def test_effnet_weights_saved_before_the_backbone_module_still_load(tmp_path):
    from safetensors.torch import save_file

    net = create_model("effnet-lite0", pretrained=False).eval()
    old_names = {k.removeprefix("backbone."): v.contiguous() for k, v in net.state_dict().items()}
    save_model(net, ModelConfig("effnet-lite0", 224), tmp_path / "m")
    save_file(old_names, str(tmp_path / "m" / WEIGHTS_FILE))  # the layout asirra wrote before

    loaded, _ = load_model(tmp_path / "m")
    x = pixels(1, size=64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
