"""The package's shape: imports run one way, the config module stands alone, the CLI's defaults are the config's."""

import ast
import subprocess
import sys
from pathlib import Path

from typer.main import get_command

from asirra.cli import app
from asirra.config import TrainConfig, default

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "asirra"


def package_imports() -> dict[str, set[str]]:
    """module -> the asirra modules it imports (at any depth of the file, lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("asirra", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asirra"):
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("asirra"))
        graph[module] = found
    return {module: {m for m in found if m in graph and m != module} for module, found in graph.items()}


def test_no_two_modules_import_each_other():
    graph = package_imports()
    pairs = sorted({tuple(sorted((a, b))) for a, deps in graph.items() for b in deps
                    if a in graph.get(b, set()) and "asirra" not in (a, b)})
    assert pairs == [], f"modules importing each other: {pairs}"


def test_the_training_modules_import_in_one_direction():
    graph = package_imports()
    assert "asirra.train" not in graph["asirra.tasks"] | graph["asirra.transfer"] | graph["asirra.splits"]
    assert "asirra.tasks" not in graph["asirra.transfer"]


def test_the_config_module_loads_nothing_else_of_the_package():
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, asirra.config; print(sorted(m for m in sys.modules if m.startswith('asirra')))"],
        capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['asirra', 'asirra.config']"
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, asirra.config; print(list(sys.modules))"],
                                         capture_output=True, text=True, check=True).stdout


def test_train_options_default_to_the_config_defaults():
    train = get_command(app).commands["train"]
    options = {p.name: p.default for p in train.params}
    for name in ("model", "epochs", "batch_size", "lr", "weight_decay", "unfreeze", "views", "label_smoothing",
                 "patience", "seed", "tta", "image_size"):
        assert options[name] == default(name), name
    assert options["strategy"] == default("strategy") and options["schedule"] == default("schedule")


def test_a_config_round_trips_through_json_with_its_enums_as_strings(tmp_path):
    config = TrainConfig(data="d", out="o", strategy="finetune", schedule="cosine", model_options={"dense": 64})
    saved = config.to_dict()
    assert saved["strategy"] == "finetune" and saved["schedule"] == "cosine"
    assert TrainConfig.from_dict(saved) == config


def test_a_config_refuses_unknown_choices_and_settings_in_one_line():
    import pytest

    with pytest.raises(ValueError, match="unknown strategy 'deep'; choose scratch, linear, finetune"):
        TrainConfig(data="d", out="o", strategy="deep")
    with pytest.raises(ValueError, match="unknown training settings: colour"):
        TrainConfig.from_dict({"data": "d", "out": "o", "colour": "blue"})
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(data="d", out="o", label_smoothing=1.5)
