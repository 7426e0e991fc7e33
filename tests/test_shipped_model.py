"""The shipped architecture, EfficientNet-Lite2 at 300 px with its top block fine-tuned and an int8
export: ONNX Runtime agrees with PyTorch on it, the int8 file answers as fp32 does, and `make model`'s
own recipe, run at toy scale, builds a run folder and an int8 export that loads and predicts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asirra.cpu import EXACT, KernelChoice, canary_exact
from asirra.data import scan
from asirra.export import onnx_session, run_onnx
from asirra.models import DEFAULT_MODEL_DIR
from asirra.predict import load_classifier

ROOT = Path(__file__).resolve().parents[1]
ASIRRA = Path(sys.executable).parent / "asirra"  # the installed console script, as the Makefile runs it


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIRRA_CACHE", str(tmp_path / "cache"))


def test_the_shipped_model_is_lite2_at_300_px_and_its_int8_export_belongs_to_its_weights():
    int8 = load_classifier(None, backend="onnx-int8")
    assert (int8.name, int8.image_size) == ("effnet-lite2", 300)
    assert int8.onnx_path() == DEFAULT_MODEL_DIR / "model.int8.onnx"  # stamped with these weights' fingerprint
    assert int8._session.get_inputs()[0].shape[1:] == [3, 300, 300]
    config = json.loads((DEFAULT_MODEL_DIR / "model.json").read_text())["extra"]["train_config"]
    assert (config["strategy"], config["unfreeze"]) == ("finetune", 1)


# ---- slow: agreement on shared photos ----------------------------------------------------------


def spread_sample(folder: Path, n: int) -> list[bytes]:
    """n photos spread evenly over the folder (never test1/, where the int8 ranges were calibrated)."""
    refs = scan(folder, labelled=True)
    return [refs[i].read_bytes() for i in np.linspace(0, len(refs) - 1, n).astype(int)]


@pytest.mark.slow
def test_onnx_fp32_equals_pytorch_and_both_int8_kernel_paths_give_the_same_answers_on_shared_photos(shared_data):
    photos = spread_sample(shared_data / "train", 32)
    torch_clf = load_classifier(None, backend="torch")
    fp32 = load_classifier(None, backend="onnx")  # exported into the (isolated) cache on first use
    int8 = load_classifier(None, backend="onnx-int8")
    pixels = torch_clf.pixels(photos)
    p_torch, p_fp32, p_int8 = (clf.proba_from_logits(clf.logits(pixels))[:, 1] for clf in (torch_clf, fp32, int8))

    assert p_torch.min() < 0.05 and p_torch.max() > 0.95  # confident outputs on both classes are compared
    # 7.1e-7 at most over 300 images (docs/results/performance.md); 1e-4 leaves room for thread-count
    # rounding, not for a wrong graph.
    assert np.abs(p_fp32 - p_torch).max() < 1e-4
    # int8 moves probabilities by ~5e-4 on average, 0.03-0.07 at most (docs/results/performance.md): no answer may flip.
    assert ((p_int8 >= 0.5) == (p_fp32 >= 0.5)).all(), np.c_[p_fp32, p_int8][(p_int8 >= 0.5) != (p_fp32 >= 0.5)]
    assert np.abs(p_int8 - p_fp32).mean() < 0.01 and np.abs(p_int8 - p_fp32).max() < 0.1
    assert not np.allclose(int8.logits(pixels), fp32.logits(pixels), atol=1e-4)  # it really is the quantized net

    # Both int8 kernel paths (asirra.cpu): the exact one answers as fp32 does on any CPU; the fast one is
    # bit-identical to it where the canary says fast kernels are exact (VNNI, AMX), and differs where it
    # says they saturate (AVX2 without VNNI), which is why such CPUs get the exact path.
    exact = run_onnx(onnx_session(int8.onnx_path(), kernels=KernelChoice(True, EXACT, "test")), pixels)
    fast = run_onnx(onnx_session(int8.onnx_path(), kernels=KernelChoice(False, "fast", "test")), pixels)
    p_exact = int8.proba_from_logits(exact.astype(np.float64))[:, 1]
    assert ((p_exact >= 0.5) == (p_fp32 >= 0.5)).all() and np.abs(p_exact - p_fp32).mean() < 0.01
    if canary_exact():
        assert np.array_equal(fast, exact)
    else:
        assert not np.array_equal(fast, exact)


# ---- slow: `make model` at toy scale -----------------------------------------------------------


def makefile_recipe(target: str) -> list[list[str]]:
    """The commands of a Makefile target, continuation lines joined, each split into words."""
    lines = (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    commands = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        commands.append(shlex.split(line.strip()))
    return commands


def with_option(args: list[str], option: str, value: str) -> list[str]:
    """args with `option` set to `value`, replacing the recipe's value if it has one."""
    if option in args:
        i = args.index(option)
        return args[: i + 1] + [value] + args[i + 2 :]
    return args + [option, value]


def toy_model_commands(data: Path, run: Path, calibration: Path) -> tuple[list[str], list[str]]:
    """`make model`'s train and export commands, pointed at a toy subset and a temporary run folder.

    The export drops --package, which would overwrite the model shipped in src/asirra/weights/.
    """
    recipe = makefile_recipe("model")
    [train] = [c for c in recipe if c[:2] == ["$(BIN)/asirra", "train"]]
    [export] = [c for c in recipe if c[:2] == ["$(BIN)/asirra", "export"]]
    assert "--package" in export and "--int8" in export

    def localise(command):
        words = [str(ASIRRA) if w == "$(BIN)/asirra" else w.replace("$(DATA)", str(data)) for w in command]
        return [str(run) if w == "runs/default-model" else w for w in words]

    train = with_option(with_option(localise(train), "--epochs", "2"), "--limit", "48")
    export = with_option([w for w in localise(export) if w != "--package"], "--calibration", str(calibration))
    return train, export


def run_command(args: list[str], env: dict) -> str:
    completed = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, f"{shlex.join(args)}\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


def shipped_files() -> dict[str, str]:
    return {p.name: hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest() for p in DEFAULT_MODEL_DIR.iterdir()}


@pytest.mark.slow
def test_make_model_recipe_at_toy_scale_builds_a_run_and_an_int8_export_that_predicts(shared_data, tmp_path):
    run = tmp_path / "default-model"
    calibration = tmp_path / "calibration"  # 32 of test1's images (make model samples 256 of all 500)
    calibration.mkdir()
    for source in sorted((shared_data / "test1").glob("*.jpg"))[:32]:
        (calibration / source.name).symlink_to(source)
    train, export = toy_model_commands(shared_data, run, calibration)
    assert ASIRRA.is_file(), f"no {ASIRRA}: install the project (make install)"
    env = {**os.environ, "ASIRRA_CACHE": str(tmp_path / "cache")}
    shipped_before = shipped_files()

    run_command(train, env)
    expected_files = {"config.json", "env.json", "split.json", "metrics.csv", "curves.png", "checkpoint.pt", "model",
                      "metrics.json", "unusable.json", "timings.json"}
    assert expected_files <= {p.name for p in run.iterdir()}
    config = json.loads((run / "config.json").read_text())
    recipe = {"model": "effnet-lite2", "strategy": "finetune", "unfreeze": 1, "views": 2, "schedule": "cosine",
              "label_smoothing": 0.1, "weight_decay": 1e-4, "lr": 1e-3, "seed": 0, "epochs": 2, "limit": 48}
    assert {k: config[k] for k in recipe} == recipe
    split = json.loads((run / "split.json").read_text())
    assert (len(split["train"]), len(split["val"])) == (38, 10) and not set(split["train"]) & set(split["val"])
    assert (run / "metrics.csv").read_text().count("\n") == 1 + 2  # a header and one row per epoch
    assert "backbone_features" in json.loads((run / "timings.json").read_text())

    model = json.loads((run / "model" / "model.json").read_text())
    assert (model["name"], model["image_size"]) == ("effnet-lite2", 300)
    assert model["temperature"] > 0 and model["extra"]["val"]["n"] == 10
    assert model["extra"]["train_config"]["strategy"] == "finetune"

    stdout = run_command(export, env)
    assert "calibrated on 32 images" in stdout
    assert {"model.onnx", "model.int8.onnx"} <= {p.name for p in (run / "model").iterdir()}
    assert shipped_files() == shipped_before  # the toy run never touches the shipped model

    photos = spread_sample(shared_data / "train", 16)
    int8 = load_classifier(run, backend="onnx-int8")
    assert int8.onnx_path() == run / "model" / "model.int8.onnx"
    torch_clf = load_classifier(run, backend="torch")
    pixels = torch_clf.pixels(photos)
    z_int8, z_torch = int8.logits(pixels), torch_clf.logits(pixels)
    p_int8, p_torch = int8.proba_from_logits(z_int8)[:, 1], torch_clf.proba_from_logits(z_torch)[:, 1]
    assert p_int8.shape == (16,) and np.isfinite(p_int8).all() and ((0 <= p_int8) & (p_int8 <= 1)).all()
    # Probabilities are not compared: the temperature fitted on 10 validation images is tiny (~0.1)
    # and multiplies every int8 logit error. The int8 logits track fp32's, and no confident answer flips.
    assert np.corrcoef(z_int8, z_torch)[0, 1] > 0.95
    confident = np.abs(p_torch - 0.5) > 0.25
    assert confident.sum() >= 4 and ((p_int8 >= 0.5) == (p_torch >= 0.5))[confident].all()
