"""The package's shape: layers that import one way, the CAPTCHA side's rules, light modules that stay light,
and the CLI's defaults read from the library.

The import graph is read from the source (ast), imports inside functions included, so a lazy import
cannot hide a dependency; imports under `if TYPE_CHECKING:` are annotations only and are left out.
"""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from typer.main import get_command

from asirra.cli import app
from asirra.config import TrainConfig, default

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "asirra"

# Bottom to top: a module may import its own layer and the layers below it, never one above.
BASE = {"asirra.labels", "asirra.errors", "asirra.config", "asirra.fileio", "asirra.stats", "asirra.runs",
        "asirra.deprecation"}
RULES = {"asirra.captcha.challenge", "asirra.captcha.rendering", "asirra.captcha.safeguards"}
# The package's face: the public API's two namespaces (lazy re-exports of asirra.api and the types it
# returns) and `python -m asirra`.
TOP = {"asirra", "asirra.captcha", "asirra.__main__"}


def layer(module: str) -> str:
    """base < CAPTCHA rules < core < service < defend < attack < experiments < api < demo < cli < package
    (what each is for: docs/reference/internals.md, asirra/captcha/__init__.py)."""
    if module in BASE:
        return "base"
    if module in TOP:
        return "package"
    if module == "asirra.api":
        return "api"
    if module == "asirra.demo":
        return "demo"
    if module in RULES:
        return "captcha.rules"
    parts = module.split(".")
    if parts[1] == "cli":
        return "cli"
    if parts[1] == "captcha":
        return f"captcha.{parts[2]}"
    return "core"


ORDER = ["base", "captcha.rules", "core", "captcha.service", "captcha.defend", "captcha.attack", "captcha.experiments",
         "api", "demo", "cli", "package"]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip.update(id(child) for child in ast.walk(node))
    return skip


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def package_imports() -> dict[str, set[str]]:
    """module -> the asirra modules it imports (at any depth of the file, lazy imports included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(("asirra", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        skip = _type_checking_only(tree)
        found = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asirra"):
                # `from asirra import data` imports the module asirra.data; `from asirra import CAT` the package
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    found.add(submodule if _is_module(submodule) else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names if alias.name.startswith("asirra"))
        graph[module] = found
    return {module: {m for m in found if m in graph and m != module} for module, found in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one node (Tarjan): each is an import cycle."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the layout, as "importer -> imported: rule"."""
    found = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            a, b = layer(importer), layer(target)
            if ORDER.index(b) > ORDER.index(a):
                found.append(f"{importer} -> {target}: {a} may not import {b} (a higher layer)")
            if a == "core" and b.startswith("captcha") and target != "asirra.captcha.challenge":
                found.append(f"{importer} -> {target}: the core imports only asirra.captcha.challenge of the CAPTCHA")
            if a in ("captcha.defend", "captcha.attack") and b == "captcha.service":
                found.append(f"{importer} -> {target}: {a} never imports the service")
            if a == "captcha.defend" and b == "captcha.attack":
                found.append(f"{importer} -> {target}: the defender does not know the attacker")
            if a.startswith("captcha") and a != "captcha.experiments" and target in TRAINING:
                found.append(f"{importer} -> {target}: only experiments train models on the CAPTCHA side")
    layers: dict[str, set[str]] = {}
    for importer, imported in graph.items():
        layers.setdefault(layer(importer), set()).update(layer(t) for t in imported if layer(t) != layer(importer))
    found += [f"layers importing each other in a circle: {' <-> '.join(group)}" for group in cycles(layers)]
    found += [f"modules importing each other in a circle: {' <-> '.join(group)}" for group in cycles(graph)]
    return found


TRAINING = {"asirra.training", "asirra.tasks", "asirra.transfer", "asirra.crossval", "asirra.tuning", "asirra.ablate"}


def test_every_import_keeps_to_the_layout():
    assert violations(package_imports()) == []


@pytest.mark.parametrize("importer, target, rule", [
    ("asirra.captcha.defend.harden", "asirra.captcha.service.app", "never imports the service"),
    ("asirra.captcha.attack.bot", "asirra.captcha.service.settings", "never imports the service"),
    ("asirra.evaluation", "asirra.captcha.safeguards", "the core imports only asirra.captcha.challenge"),
    ("asirra.captcha.attack.bot", "asirra.training", "only experiments train models"),
    ("asirra.captcha.defend.distort", "asirra.captcha.attack.counter", "does not know the attacker"),
    ("asirra.images", "asirra.predict", "modules importing each other in a circle"),
    ("asirra.stats", "asirra.data", "base may not import core"),
    ("asirra.captcha.challenge", "asirra.data", "captcha.rules may not import core"),
    ("asirra.api", "asirra.cli.common", "api may not import cli"),
    ("asirra.training", "asirra.api", "core may not import api"),
])
def test_a_wrong_import_is_caught(importer, target, rule):
    graph = package_imports()
    graph[importer] = graph[importer] | {target}
    assert any(rule in v and (importer in v or "circle" in v) for v in violations(graph)), violations(graph)


def test_every_module_is_placed_in_a_layer():
    assert {layer(m) for m in package_imports()} <= set(ORDER)


def _loaded(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_the_config_module_loads_nothing_else_of_the_package():
    loaded = _loaded("import asirra.config")
    assert {m for m in loaded if m.startswith("asirra")} == {"asirra", "asirra.config", "asirra.errors", "asirra.labels"}
    assert "torch" not in loaded


def test_the_http_bot_and_the_service_stay_light():
    bot = _loaded("import asirra.captcha.attack.bot")
    assert not {"torch", "sklearn", "matplotlib", "fastapi"} & bot  # a bot needs httpx, Pillow and numpy
    service = _loaded("import asirra.captcha.service.app")
    assert not {"torch", "sklearn", "matplotlib"} & service
    cli = _loaded("import asirra.cli")  # `asirra --help` answers without loading any of them
    assert not {"torch", "sklearn", "matplotlib", "onnxruntime", "fastapi", "optuna"} & cli


def test_train_options_default_to_the_config_defaults():
    train = get_command(app).commands["train"]
    options = {p.name: p.default for p in train.params}
    for name in ("model", "epochs", "batch_size", "lr", "weight_decay", "unfreeze", "views", "label_smoothing",
                 "patience", "seed", "tta", "image_size"):
        assert options[name] == default(name), name
    assert options["strategy"] == default("strategy") and options["schedule"] == default("schedule")


def test_captcha_options_default_to_the_library_defaults():
    from asirra.captcha.defend.config import HardenConfig, parse_epsilon
    from asirra.captcha.experiments.defend_grid import DEFAULT_CHALLENGES, HUMAN_FLOOR
    from asirra.captcha.experiments.simulate import HUMAN_CHALLENGE_SUCCESS
    from asirra.captcha.service.settings import DEFAULT_SAFEGUARD, ServiceSettings

    commands = get_command(app).commands
    captcha = commands["captcha"].commands
    harden = {p.name: p.default for p in captcha["harden"].params}
    assert (harden["method"], harden["eot"], harden["crafting_limit"]) == (
        HardenConfig().method, HardenConfig().eot, HardenConfig().crafting_limit)
    assert parse_epsilon(harden["epsilon"]) == HardenConfig().epsilon
    assert tuple(harden["surrogates"].split(",")) == HardenConfig().surrogates
    defend = {p.name: p.default for p in captcha["defend"].params}
    assert (defend["challenges"], defend["human"], defend["human_floor"]) == (
        DEFAULT_CHALLENGES, HUMAN_CHALLENGE_SUCCESS, HUMAN_FLOOR)
    serve = {p.name: p.default for p in commands["serve"].params}
    assert (serve["ttl"], serve["challenge_rate"], serve["safeguard"]) == (
        ServiceSettings().ttl_seconds, ServiceSettings().challenge_rate, DEFAULT_SAFEGUARD)


def test_the_old_spelling_of_a_renamed_command_still_works_but_is_hidden():
    captcha = get_command(app).commands["captcha"]
    assert captcha.commands["attacker"].hidden and not captcha.commands["build-attacker"].hidden
    old, new = (inspect.unwrap(captcha.commands[name].callback) for name in ("attacker", "build-attacker"))
    assert (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__) == ("asirra.cli.captcha",
                                                                                       "captcha_build_attacker")


def test_a_config_round_trips_through_json_with_its_enums_as_strings(tmp_path):
    config = TrainConfig(data="d", out="o", strategy="finetune", schedule="cosine", model_options={"dense": 64})
    saved = config.to_dict()
    assert saved["strategy"] == "finetune" and saved["schedule"] == "cosine"
    assert TrainConfig.from_dict(saved) == config


def test_a_config_refuses_unknown_choices_and_settings_in_one_line():
    with pytest.raises(ValueError, match="unknown strategy 'deep'; choose scratch, linear, finetune"):
        TrainConfig(data="d", out="o", strategy="deep")
    with pytest.raises(ValueError, match="unknown training settings: colour"):
        TrainConfig.from_dict({"data": "d", "out": "o", "colour": "blue"})
    with pytest.raises(ValueError, match="label_smoothing"):
        TrainConfig(data="d", out="o", label_smoothing=1.5)


def test_registering_a_second_model_under_one_name_is_refused():
    from asirra.models import register

    with pytest.raises(ValueError, match="'seed-cnn' is already registered"):
        register("seed-cnn", image_size=64)(lambda **kw: None)


@pytest.mark.parametrize("command, extra, module", [
    (["tune", "--trials", "1"], "tune", "optuna"),
    (["serve", "--data", "."], "serve", "fastapi"),
])
def test_a_missing_optional_part_is_named_in_one_line(monkeypatch, command, extra, module):
    from typer.testing import CliRunner

    monkeypatch.setitem(sys.modules, module, None)  # as if it were not installed: importing it raises ImportError
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and f"asirra[{extra}]" in result.output, result.output
