"""ONNX export: ONNX Runtime and PyTorch give the same probabilities; exports are cached per weights."""

import json

import numpy as np
import pytest
import torch
from model_support import save_spread_model, varied_images
from safetensors.numpy import load_file as load_numpy

import asirra.export
from asirra.export import export_onnx, onnx_session, package_model, quantize_beside_weights, run_onnx, state_fingerprint
from asirra.images import read_pixels
from asirra.models import create_model, save_model
from asirra.predict import load_classifier


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def exports(monkeypatch):
    calls = []
    real = asirra.export.export_onnx

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(asirra.export, "export_onnx", counting)
    return calls


@pytest.mark.parametrize("name", ["seed-cnn", "effnet-lite0"])
def test_onnx_and_torch_backends_agree_on_probabilities(name, tmp_path):
    folder = save_spread_model(tmp_path / name, name)
    images = varied_images()
    p_torch = load_classifier(folder, backend="torch").predict_proba(images)[:, 1]
    p_onnx = load_classifier(folder, backend="onnx").predict_proba(images)[:, 1]

    assert p_torch.min() < 0.2 and p_torch.max() > 0.8  # the comparison covers confident outputs too
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4, rtol=0)


def test_the_onnx_file_is_exported_once_per_weights(isolated_cache, tmp_path, exports):
    folder = save_spread_model(tmp_path / "m")
    first = load_classifier(folder).onnx_path()
    assert len(exports) == 1 and first.parent == isolated_cache / "onnx"

    assert load_classifier(folder).onnx_path() == first
    assert len(exports) == 1

    recalibrated = save_spread_model(tmp_path / "other", temperature=2.0)  # same weights: the same file
    assert load_classifier(recalibrated).onnx_path() == first
    assert len(exports) == 1


def test_exported_module_takes_any_batch_size(tmp_path):
    net = create_model("seed-cnn").eval()
    path = export_onnx(net, tmp_path / "seed.onnx", 128, output_name="logit")
    session = onnx_session(path, threads=1)
    pixels = np.stack([read_pixels(im, 128) for im in varied_images()])
    for n in (1, 5):
        out = run_onnx(session, pixels[:n])
        assert out.shape == (n,)
        with torch.no_grad():
            expected = net(torch.from_numpy(pixels[:n]).permute(0, 3, 1, 2).float()).numpy()
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)
    assert [p.name for p in tmp_path.iterdir()] == ["seed.onnx"]  # written atomically, no temp file left


def test_state_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    net = create_model("seed-cnn")
    before = state_fingerprint(net)
    assert state_fingerprint(net) == before
    with torch.no_grad():
        net.classifier[-1].bias += 1e-3
    assert state_fingerprint(net) != before


@pytest.mark.slow  # quantizes a whole backbone (~30 s)
def test_int8_export_tracks_fp32_and_is_used_only_for_the_weights_it_came_from(tmp_path):
    folder = save_spread_model(tmp_path / "m", "effnet-lite0")
    with pytest.raises(ValueError, match="no int8 export of this model"):
        load_classifier(folder, backend="onnx-int8")

    fp32 = load_classifier(folder, backend="onnx")
    images = varied_images()
    pixels = fp32.pixels(images)
    quantize_beside_weights(fp32.model, folder, np.concatenate([pixels] * 4))
    int8 = load_classifier(folder, backend="onnx-int8")
    assert int8.onnx_path().name == "model.int8.onnx"
    z_fp32, z_int8 = fp32.logits(pixels), int8.logits(pixels)
    assert np.corrcoef(z_fp32, z_int8)[0, 1] > 0.95
    assert not np.allclose(z_fp32, z_int8, atol=1e-4)  # really the quantized network, not the fp32 one

    with torch.no_grad():
        fp32.model.head.bias += 1.0  # other weights: the int8 file no longer belongs to them
    save_model(fp32.model, fp32.config, folder)
    with pytest.raises(ValueError, match="no int8 export of this model"):
        load_classifier(folder, backend="onnx-int8")


def test_packaging_writes_fp16_weights_val_keys_card_and_a_fresh_int8_export(tmp_path):
    run = tmp_path / "run"
    folder = save_spread_model(run / "model")
    (run / "split.json").write_text(json.dumps({"train": ["a"], "val": ["b"], "val_names": ["cat.1.jpg"]}))
    calibration = load_classifier(folder).pixels(varied_images())

    dest = package_model(folder, tmp_path / "weights", calibration=calibration)
    assert json.loads((dest / "split.json").read_text()) == {"val": ["b"]}  # no training keys shipped
    assert all(t.dtype == np.float16 for t in load_numpy(dest / "model.safetensors").values() if t.dtype.kind == "f"
               and t.ndim > 1)
    assert "`model.int8.onnx` beside them (static int8, activation ranges from 7 calibration images)" in (
        dest / "MODEL_CARD.md").read_text()
    assert load_classifier(dest, backend="onnx-int8").onnx_path() == dest / "model.int8.onnx"

    package_model(folder, dest)  # again without calibration: no int8 file of the previous packaging survives
    assert not (dest / "model.int8.onnx").exists() and "int8" not in (dest / "MODEL_CARD.md").read_text()
    with pytest.raises(ValueError, match="already the packaged model"):
        package_model(dest, dest)


@pytest.mark.slow  # exports and quantizes a Lite0 (~45 s)
def test_a_copy_at_another_image_size_has_its_own_exports_and_answers(tmp_path, make_image):
    from asirra.errors import ConfigError
    from asirra.export import export_model

    folder = save_spread_model(tmp_path / "m", "effnet-lite0")  # at 224 px; pools globally, as Lite2 does
    for i in range(6):
        make_image(tmp_path / "calibration" / f"{i}.jpg", size=(90, 70), color=(40 * i, 90, 200 - 30 * i))
    report = export_model(folder, int8=True, calibration=tmp_path / "calibration", image_size=160, out=tmp_path / "at160")
    assert set(report.files) == {"onnx", "onnx-int8"} and report.calibration_images == 6
    copy = load_classifier(tmp_path / "at160")
    assert copy.image_size == 160 and copy.backend == "onnx-int8"
    assert copy._session.get_inputs()[0].shape[1:] == [3, 160, 160]
    original = load_classifier(folder, backend="torch")
    assert copy.config.temperature == original.config.temperature
    # The same weights, reading 160 px: its fp32 export computes what its torch module does at that size.
    same = load_classifier(tmp_path / "at160", backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(same.model.state_dict().values(), original.model.state_dict().values()))
    images = varied_images()
    np.testing.assert_allclose(load_classifier(tmp_path / "at160", backend="onnx").predict_proba(images),
                               same.predict_proba(images), atol=1e-4)
    with pytest.raises(ConfigError, match="--image-size and --out go together"):
        export_model(folder, image_size=160)
    with pytest.raises(ConfigError, match="the model's own folder"):
        export_model(folder, image_size=160, out=folder)
    with pytest.raises(ConfigError, match="only fit its own input size"):
        export_model(save_spread_model(tmp_path / "seed"), image_size=96, out=tmp_path / "seed96")
    assert not (tmp_path / "seed96").exists()  # refused before anything was written
