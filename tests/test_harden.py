"""Hardened pools: valid pools the service serves, within epsilon on the files, measured, resumable."""

from __future__ import annotations

import json
import os

import httpx
import numpy as np
import pytest
import torch
from captcha_service_support import GENEROUS, make_pool
from PIL import Image
from scipy import ndimage
from typer.testing import CliRunner

from asirra.captcha.defend.config import HardenConfig, HardenError, parse_epsilon
from asirra.captcha.defend.derived_pool import MANIFEST, read_manifest
from asirra.captcha.defend.harden import Hardener, harden_pool, load_surrogate
from asirra.captcha.rendering import jpeg_straight_through
from asirra.captcha.safeguards import parse_safeguard
from asirra.captcha.service.app import create_app, usable_pool
from asirra.captcha.service.run import running
from asirra.cli import app
from asirra.data import ImageRef, scan
from asirra.images import load_image
from asirra.labels import CAT, DOG
from asirra.models import DEFAULT_MODEL_DIR, ModelConfig, SeedCNN, save_model
from asirra.runs import RunFolderError

runner = CliRunner()


@pytest.fixture(scope="module")
def toy_surrogate(tmp_path_factory):
    """An untrained seed-cnn saved as a model folder: cheap, and it has gradients like any network."""
    torch.manual_seed(0)
    folder = save_model(SeedCNN(), ModelConfig("seed-cnn", 128), tmp_path_factory.mktemp("toy") / "model")
    return load_surrogate(str(folder))


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=6, dogs=6)


def harden(refs, out, surrogate, progress=False, **options):
    options = {"method": "pgd", "epsilon": 4 / 255, "eot": 1, "surrogates": (surrogate.name,), **options}
    options.setdefault("steps", None if options["method"] == "fgsm" else 2)
    config = HardenConfig(**options)
    return harden_pool(refs, out, config, [surrogate], progress=progress)


def records(out):
    return [json.loads(line) for line in (out / MANIFEST).read_text().splitlines()]


def test_a_hardened_pool_scans_with_its_labels_and_is_served_end_to_end(pool, tmp_path, toy_surrogate):
    out = tmp_path / "hardened"
    summary = harden(pool, out, toy_surrogate)
    assert summary.written == 12 and not summary.unusable
    hardened = scan(out, labelled=True)
    assert sorted((r.label, r.id) for r in hardened) == sorted((r.label, r.id) for r in pool)
    assert all(r.source.endswith(".png") for r in hardened)

    web = create_app(usable_pool(hardened, progress=False), parse_safeguard("none"), GENEROUS)
    with running(web) as url, httpx.Client(base_url=url) as client:
        challenge = client.post("/api/challenge").json()
        images = [client.get(path) for path in challenge["images"]]
        assert all(r.status_code == 200 and r.headers["content-type"] == "image/jpeg" for r in images)
        assert all(load_image(r.content).size[0] > 0 for r in images)
        answer = sorted(web.state.store.peek(challenge["id"]).challenge.answer)
        verdict = client.post(f"/api/challenge/{challenge['id']}/answer", json={"selected": answer}).json()
    assert verdict["result"] == "pass"


@pytest.mark.parametrize("method", ["fgsm", "pgd", "random-target", "feature"])
def test_every_stored_file_is_within_epsilon_of_its_original(pool, tmp_path, toy_surrogate, method):
    out = tmp_path / method
    harden(pool[:6], out, toy_surrogate, method=method, epsilon=3 / 255)
    for record in records(out):
        stored = np.asarray(Image.open(out / record["file"]), dtype=np.int16)
        original = np.asarray(load_image(record["source"]), dtype=np.int16)
        assert stored.shape == original.shape  # the original's resolution
        assert np.abs(stored - original).max() <= 3
        assert np.abs(stored - original).max() == record["linf"]
    assert max(r["linf"] for r in records(out)) == 3  # the perturbation was applied, up to the bound


def test_the_perturbation_pushes_the_surrogate_away_from_the_true_label(pool, tmp_path, toy_surrogate):
    harden(pool, tmp_path / "out", toy_surrogate, method="pgd", epsilon=16 / 255, steps=3)
    moved = [(r["surrogate_p_dog_after"] - r["surrogate_p_dog_before"]) * (1 if r["label"] == "cat" else -1)
             for r in records(tmp_path / "out")]
    assert np.mean(moved) > 0


def _wang_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM written out from Wang et al. (2004): 11-tap Gaussian (sigma 1.5), borders dropped, channel mean."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    values = []
    for c in range(3):
        x, y = a[..., c].astype(np.float64), b[..., c].astype(np.float64)
        blur = lambda z: ndimage.gaussian_filter(z, 1.5, truncate=3.5)  # noqa: E731
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
        s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        values.append(s[5:-5, 5:-5].mean())
    return float(np.mean(values))


def test_the_manifest_ssim_is_measured_on_the_images(pool, tmp_path, toy_surrogate):
    harden(pool[:4], tmp_path / "zero", toy_surrogate, epsilon=0.0)
    assert all(r["ssim"] == pytest.approx(1.0) and r["psnr"] is None and r["linf"] == 0 for r in records(tmp_path / "zero"))

    medians = {}
    for eps in (2, 12):
        out = tmp_path / f"eps{eps}"
        harden(pool[:4], out, toy_surrogate, epsilon=eps / 255)
        for record in records(out):
            stored = np.asarray(Image.open(out / record["file"]))
            original = np.asarray(load_image(record["source"]))
            assert record["ssim"] == pytest.approx(_wang_ssim(original, stored), abs=1e-6)
            mse = np.mean((original.astype(float) - stored) ** 2)
            assert record["psnr"] == pytest.approx(10 * np.log10(255**2 / mse))
        medians[eps] = np.median([r["ssim"] for r in records(out)])
    assert medians[12] < medians[2] < 1.0


def test_a_resumed_run_skips_finished_images_and_completes_the_rest(pool, tmp_path, toy_surrogate):
    out = tmp_path / "out"
    first = harden(pool[:5], out, toy_surrogate)
    before = {r["file"]: os.stat(out / r["file"]).st_mtime_ns for r in records(out)}
    # A run killed mid-record leaves a torn line; a removed file is made again.
    with open(out / MANIFEST, "a") as manifest:
        manifest.write('{"file": "cat.5.png", "sour')
    (out / "cat.0.png").unlink()
    second = harden(pool, out, toy_surrogate)
    assert (first.this_run, second.this_run, second.written) == (5, 8, 12)
    assert len(read_manifest(out)) == 12
    kept = {name: os.stat(out / name).st_mtime_ns for name in before if name != "cat.0.png"}
    assert kept == {name: before[name] for name in kept}
    assert harden(pool, out, toy_surrogate).this_run == 0


def test_a_broken_input_is_skipped_and_reported(pool, tmp_path, toy_surrogate):
    broken = tmp_path / "pool" / "cat.99.jpg"
    broken.write_bytes(b"<html>not a photo</html>")
    summary = harden(scan(tmp_path / "pool"), tmp_path / "out", toy_surrogate)
    assert summary.written == 12
    assert summary.unusable == [{"source": str(broken), "reason": "not an image (HTML/XML text)"}]
    assert not (tmp_path / "out" / "cat.99.png").exists()
    assert harden(scan(tmp_path / "pool"), tmp_path / "out", toy_surrogate).this_run == 0  # not retried


def test_a_folder_made_with_other_settings_is_refused(pool, tmp_path, toy_surrogate):
    harden(pool[:2], tmp_path / "out", toy_surrogate)
    with pytest.raises(RunFolderError, match="derived pool made with other settings .*epsilon"):
        harden(pool[:2], tmp_path / "out", toy_surrogate, epsilon=8 / 255)


def test_label_independent_methods_give_a_cat_and_a_dog_the_same_noise(pool, toy_surrogate):
    """The same photo, labelled cat and then dog: fgsm's noise differs, random-target's and feature's do not."""
    original = np.asarray(load_image(pool[0].source))
    as_cat, as_dog = ImageRef("a.jpg", CAT, "0"), ImageRef("a.jpg", DOG, "0")

    def noise(method, ref):
        steps = None if method == "fgsm" else 2
        hardener = Hardener(HardenConfig(method=method, epsilon=8 / 255, steps=steps, eot=1), [toy_surrogate])
        return hardener(original, "0123456789abcdef", ref)[0]

    assert not np.array_equal(noise("fgsm", as_cat), noise("fgsm", as_dog))
    for method in ("random-target", "feature", "balanced-target"):
        assert np.array_equal(noise(method, as_cat), noise(method, as_dog))


def test_jpeg_straight_through_is_jpeg_forwards_and_identity_backwards():
    x = (torch.rand(1, 3, 32, 40) * 255).requires_grad_(True)
    y = jpeg_straight_through(x, 75)
    assert 0 < (y - x).abs().max() < 255  # the real codec changed the pixels
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))


def test_the_shipped_model_is_a_surrogate_only_when_named_shipped():
    if not (DEFAULT_MODEL_DIR / "model.safetensors").exists():
        pytest.skip("no shipped model in this installation")
    with pytest.raises(HardenError, match="shipped attacker model"):
        load_surrogate(str(DEFAULT_MODEL_DIR))


@pytest.mark.parametrize("text, value", [("4/255", 4 / 255), ("4", 4 / 255), ("0.0157", 0.0157), ("0", 0.0),
                                         (" 8/255 ", 8 / 255)])
def test_epsilon_parsing(text, value):
    assert parse_epsilon(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["4.0", "65", "abc", "-1/255", "1/0", "4/255/2", ""])
def test_bad_epsilons_are_refused_in_one_line(tmp_path, text):
    with pytest.raises(HardenError):
        parse_epsilon(text)
    make_pool(tmp_path / "pool")
    result = runner.invoke(app, ["captcha", "harden", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                 "--epsilon", text])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_the_cli_hardens_a_pool_with_a_surrogate_folder(pool, tmp_path, toy_surrogate):
    result = runner.invoke(app, ["captcha", "harden", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                 "--method", "fgsm", "--epsilon", "2/255", "--surrogates", toy_surrogate.folder,
                                 "--limit", "12", "--eot", "1"])
    assert result.exit_code == 0, result.output
    assert len(scan(tmp_path / "out")) == 12
    assert {r["epsilon_255"] for r in records(tmp_path / "out")} == {2}
    assert (tmp_path / "out" / "compare.html").read_text().count("<figure>") == 12


def test_the_cli_names_an_untrained_registry_surrogate_in_one_line(pool, tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_SURROGATES", str(tmp_path / "none"))
    result = runner.invoke(app, ["captcha", "harden", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                 "--surrogates", "effnet-lite0"])
    assert result.exit_code == 2
    assert "error: no surrogate effnet-lite0" in result.stderr and "asirra train" in result.stderr


@pytest.mark.parametrize("method", ["universal", "universal-uncertain"])
def test_universal_adds_one_pattern_to_every_image_within_epsilon(tmp_path, toy_surrogate, method):
    pool = make_pool(tmp_path / "pool", cats=3, dogs=3)
    crafting = tmp_path / "crafting"
    make_pool(crafting, cats=3, dogs=3, seed=7)  # images of their own: drawn with another seed
    out = tmp_path / method
    summary = harden(pool, out, toy_surrogate, method=method, epsilon=6 / 255, crafting=str(crafting), steps=1)
    assert summary.written == 6
    noises = []
    for record in records(out):
        stored = np.asarray(Image.open(out / record["file"]), dtype=np.int16)
        original = np.asarray(load_image(record["source"]), dtype=np.int16)
        assert stored.shape == original.shape and np.abs(stored - original).max() <= 6
        assert np.abs(stored - original).max() == record["linf"]
        noises.append(stored - original)
    # Label-free by construction: the noise where nothing clipped at 0 or 255 is the same pattern for all.
    pattern = np.load(out / "universal-perturbation.npy")[0].transpose(1, 2, 0)
    assert np.abs(pattern).max() > 0
    for noise, record in zip(noises, records(out)):
        original = np.asarray(load_image(record["source"]), dtype=np.int16)
        expected = torch.nn.functional.interpolate(torch.from_numpy(pattern.transpose(2, 0, 1)).unsqueeze(0),
                                                   size=original.shape[:2], mode="bilinear",
                                                   align_corners=False)[0].permute(1, 2, 0).numpy()
        free = (original > 6) & (original < 249)
        assert np.abs(noise[free] - expected[free]).max() <= 0.5 + 1e-4
    done = json.loads((out / "summary.json").read_text())
    assert done["crafting_images"] == 6 and done["crafting_skipped_in_pool"] == 0
    assert done["crafting_seconds"] > 0 and done["crafting_seconds_per_image"] == pytest.approx(done["crafting_seconds"] / 6, abs=1e-3)
    assert harden(pool, out, toy_surrogate, method=method, epsilon=6 / 255, crafting=str(crafting), steps=1).this_run == 0


def test_universal_never_crafts_on_pool_images(pool, tmp_path, toy_surrogate):
    out = tmp_path / "out"
    with pytest.raises(HardenError, match="no usable image outside the pool"):
        harden(pool, out, toy_surrogate, method="universal", crafting=str(tmp_path / "pool"), steps=1)
    with pytest.raises(HardenError, match="crafting set"):
        HardenConfig(method="universal")


def test_balanced_target_pushes_each_image_towards_its_coin_flip(pool, tmp_path, toy_surrogate):
    out = tmp_path / "out"
    harden(pool, out, toy_surrogate, method="balanced-target", epsilon=16 / 255, steps=3)
    made = records(out)
    assert {r["target"] for r in made} == {"cat", "dog"} and all(r["linf"] <= 16 for r in made)
    moved = [(r["surrogate_p_dog_after"] - r["surrogate_p_dog_before"]) * (1 if r["target"] == "dog" else -1) for r in made]
    assert np.mean(moved) > 0


def test_the_cli_hardens_with_a_universal_pattern(pool, tmp_path, toy_surrogate):
    make_pool(tmp_path / "crafting", cats=2, dogs=2, seed=3)
    result = runner.invoke(app, ["captcha", "harden", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "out"),
                                 "--method", "universal-uncertain", "--epsilon", "2/255", "--surrogates", toy_surrogate.folder,
                                 "--crafting", str(tmp_path / "crafting"), "--steps", "1", "--eot", "1"])
    assert result.exit_code == 0, result.output
    assert len(scan(tmp_path / "out")) == 12
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["crafting_images"] == 4
    missing = runner.invoke(app, ["captcha", "harden", "--data", str(tmp_path / "pool"), "--out", str(tmp_path / "o2"),
                                  "--method", "universal", "--surrogates", toy_surrogate.folder])
    assert missing.exit_code == 2 and "needs a crafting set" in missing.stderr
