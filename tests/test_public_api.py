"""The public API: the names in `asirra.__all__` and `asirra.captcha.__all__`, each documented and typed;
`import asirra` light; deprecations that warn and expire; the Classifier's contract; the functions
doing what the commands do, with the same defaults.

Documentation is read as the API reference reads it (griffe, static), so constants' docstrings count;
type hints are resolved at run time (typing.get_type_hints), so a name imported only for type
checkers fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import inspect
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
from model_support import save_spread_model, tiny_train_config, varied_images, write_pattern_dataset
from typer.main import get_command

import asirra
import asirra.captcha
from asirra.cli import app as cli
from asirra.deprecation import REGISTRY, deprecated, version_tuple
from asirra.errors import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"
PUBLIC = {"asirra": asirra, "asirra.captcha": asirra.captcha}


def public_names() -> list[str]:
    return [f"{module}.{name}" for module, mod in PUBLIC.items() for name in mod.__all__]


@pytest.fixture(scope="module")
def griffe_package():
    griffe = pytest.importorskip("griffe")
    return griffe.load("asirra", search_paths=[str(SRC)], resolve_aliases=True, resolve_external=False)


def _object(qualname: str):
    module, _, name = qualname.rpartition(".")
    return getattr(PUBLIC[module], name)


def _node(package, qualname: str):
    node = package
    for part in qualname.split(".")[1:]:
        node = node[part]
    return node.final_target if node.is_alias else node


def _documented_parameters(node) -> set[str]:
    sections = node.docstring.parse("google") if node.docstring else []
    return {p.name.lstrip("*") for s in sections if s.kind.value in ("parameters", "other parameters") for p in s.value}


def _check_callable(qualname: str, function, node) -> None:
    signature = inspect.signature(function)
    parameters = [p for p in signature.parameters.values() if p.name not in ("self", "cls")]
    bare = [p.name for p in parameters if p.annotation is inspect.Parameter.empty]
    assert not bare, f"{qualname}: parameters without type hints: {bare}"
    assert function.__name__ == "__init__" or signature.return_annotation is not inspect.Signature.empty, \
        f"{qualname}: no return type"
    typing.get_type_hints(function)  # every hint resolves at run time
    undocumented = {p.name for p in parameters} - _documented_parameters(node)
    assert not undocumented, f"{qualname}: parameters missing from its Args section: {sorted(undocumented)}"


def _public_members(cls) -> dict[str, object]:
    return {name: member for name, member in vars(cls).items() if not name.startswith("_")}


@pytest.mark.parametrize("qualname", public_names())
def test_every_public_name_is_documented_and_typed(qualname, griffe_package):
    obj, node = _object(qualname), _node(griffe_package, qualname)
    assert node.docstring is not None and node.docstring.value.strip(), f"{qualname}: no docstring"
    if node.is_attribute:  # constants and type aliases: documented (above) and annotated
        assert node.annotation is not None, f"{qualname}: no annotation"
        return
    if node.is_function:
        _check_callable(qualname, obj, node)
        return
    assert inspect.isclass(obj), qualname
    typing.get_type_hints(obj)  # the fields' annotations resolve
    if dataclasses.is_dataclass(obj):  # each field explained, as an attribute docstring or in Attributes
        listed = {a.name for s in node.docstring.parse("google") if s.kind.value == "attributes" for a in s.value}
        bare = [f.name for f in dataclasses.fields(obj)
                if f.name not in listed and not (f.name in node.members and node.members[f.name].docstring)]
        assert not bare, f"{qualname}: fields without a docstring: {bare}"
    elif "__init__" in vars(obj):
        _check_callable(f"{qualname}.__init__", obj.__init__, node)  # documented in the class docstring's Args
    for name, member in _public_members(obj).items():
        function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
        if not callable(function):
            continue
        member_node = node.members[name]
        assert member_node.docstring, f"{qualname}.{name}: no docstring"
        if isinstance(member, property):
            assert inspect.signature(function).return_annotation is not inspect.Signature.empty, f"{qualname}.{name}"
        else:
            _check_callable(f"{qualname}.{name}", inspect.unwrap(function), member_node)


def test_the_lists_hold_no_name_twice_and_nothing_private():
    for mod in PUBLIC.values():
        assert len(set(mod.__all__)) == len(mod.__all__)
        assert all(not name.startswith("_") or name == "__version__" for name in mod.__all__)
    assert not set(asirra.__all__) & set(asirra.captcha.__all__)


def _loaded(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_import_asirra_is_light():
    heavy = {"torch", "onnxruntime", "fastapi", "sklearn", "matplotlib", "optuna"}
    assert not heavy & _loaded("import asirra, asirra.captcha; asirra.TrainConfig, asirra.CAT, asirra.UserError")
    assert "torch" in _loaded("import asirra; asirra.load_model")  # a name that needs it loads it


def test_a_public_function_stays_the_function_after_its_internals_load():
    import asirra.gradcam  # noqa: F401
    import asirra.training  # noqa: F401

    assert callable(asirra.train) and callable(asirra.explain) and callable(asirra.evaluate) and callable(asirra.tune)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fit'"):
        asirra.fit  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        asirra.captcha.nothing  # noqa: B018


def test_the_package_ships_its_type_marker():
    assert (importlib.resources.files("asirra") / "py.typed").is_file()


def test_the_version_is_written_once():
    project = (SRC.parent / "pyproject.toml").read_text().split("[project]")[1].split("\n[")[0]
    assert 'dynamic = ["version"]' in project and "\nversion" not in project


# ---- deprecation ------------------------------------------------------------------------------


def test_no_deprecated_name_outlives_its_release():
    overdue = [f"remove {name} now (deprecated since {since}, due in {removed})"
               for name, (since, removed, _) in REGISTRY.items()
               if version_tuple(removed) <= version_tuple(asirra.__version__)]
    assert not overdue
    assert "asirra.Classifier.predict_classes_proba" in REGISTRY  # the registry is filled as modules load


def test_a_deprecated_call_warns_at_the_callers_line_and_still_works():
    @deprecated(since="0.2.0", removed_in="0.3.0", instead="new()")
    def old(x: int) -> int:
        """Double x."""
        return 2 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert old(4) == 8
    (warning,) = caught
    assert warning.category is FutureWarning and Path(warning.filename) == Path(__file__)
    assert "old is deprecated since 0.2.0 and will be removed in 0.3.0; use new()" in str(warning.message)
    assert inspect.signature(old).parameters["x"].annotation == "int"  # the signature is kept
    REGISTRY.pop(f"tests.{old.__qualname__}", None)


# ---- the Classifier's contract ------------------------------------------------------------------


@pytest.fixture(scope="module")
def seed_model(tmp_path_factory) -> Path:
    return save_spread_model(tmp_path_factory.mktemp("model") / "seed")


def test_classifier_contract(seed_model):
    model = asirra.load_model(seed_model, backend="torch")
    images = varied_images()
    proba = model.predict_proba(images)
    assert proba.shape == (len(images), 2) and np.allclose(proba.sum(1), 1)
    assert list(model.classes_) == list(model.classes) == ["cat", "dog"]
    assert set(model.predict(images)) <= set(model.classes)
    assert list(model.predict(images)) == [model.classes[i] for i in proba.argmax(1)]
    maps = model.explain(images[:3])
    assert maps.shape == (3, model.image_size, model.image_size) and maps.dtype == np.float32
    assert 0 <= maps.min() and maps.max() <= 1
    cat_maps, dog_maps = model.explain(images[:3], target="cat"), model.explain(images[:3], target="dog")
    assert not np.allclose(cat_maps, dog_maps)  # each class's evidence, not one map relabelled
    with pytest.raises(asirra.UserError, match="no class 'horse'"):
        model.explain(images[:1], target="horse")
    with pytest.raises(TypeError, match="list of images"):
        model.predict_proba(images[0] if isinstance(images[0], str) else "one.jpg")
    assert "seed-cnn" in repr(model)


# ---- the functions do what the commands do -------------------------------------------------------


def test_train_then_evaluate_from_python(tmp_path, isolated_cache):
    data = write_pattern_dataset(tmp_path / "data", per_class=24)
    settings = tiny_train_config(data, tmp_path / "run").to_dict()
    options = {k: settings[k] for k in ("model", "epochs", "batch_size", "workers", "cache_dir", "bf16")}
    run = asirra.train(data, out=tmp_path / "run", **options, augment=False, image_size=64)
    assert isinstance(run, asirra.TrainResult) and Path(run) == tmp_path / "run"  # path-like: its run folder
    assert run.config.augment is None and run.config.image_size == 64 and run.config.data == str(data)
    assert len(run.history) == 1 and run.history[0]["epoch"] == 1
    assert {"config", "curves", "metrics", "history", "model", "split"} <= set(run.files)
    assert 0 <= run.metrics["val"]["accuracy"] <= 1
    model = run.load_model(backend="torch")
    assert model.image_size == 64
    result = asirra.evaluate(model, data, split=run, out=tmp_path / "eval", challenges=100, explain=False)
    assert len(result.names) == run.metrics["val"]["n"]  # only the run's validation images
    assert result.proba.shape == (len(result.names), 2) and result.labels.shape == (len(result.names),)
    assert result.metrics["accuracy"] == pytest.approx(run.metrics["val"]["accuracy"])
    assert result.files["confusion"].is_file() and result.summary_lines()[0].startswith(f"{len(result.names)} images")
    again = asirra.train(config=run.files["config"], out=tmp_path / "again", epochs=1)
    assert again.config.image_size == 64 and again.config.data == str(data)  # the file's settings stand


def test_an_unknown_option_is_named_with_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown training option epoch; valid: .*epochs"):
        asirra.train(tmp_path, epoch=3)
    with pytest.raises(ConfigError, match="unknown harden option eps"):
        asirra.harden(tmp_path, tmp_path / "out", eps=4)


COMMANDS = {  # public function -> (command path, {parameter: option name} where they differ)
    "evaluate": (("evaluate",), {"data": "path"}),
    "explain": (("explain",), {"target": "class_name"}),
    "attack": (("attack",), {"n": "challenges"}),
    "tune": (("tune",), {}),
    "cross_validate": (("cv",), {}),
    "harden": (("captcha", "harden"), {}),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_functions_and_commands_share_their_defaults(name):
    path, renamed = COMMANDS[name]
    command = get_command(cli)
    for part in path:
        command = command.commands[part]
    options = {p.name: p.default for p in command.params}
    compared = 0
    for parameter in inspect.signature(getattr(asirra, name)).parameters.values():
        option = renamed.get(parameter.name, parameter.name)
        if parameter.default is inspect.Parameter.empty or option not in options or parameter.default is None:
            continue
        expected = options[option]
        if isinstance(parameter.default, (str, Path)) and isinstance(expected, Path):
            expected = str(expected)
        assert parameter.default == expected, f"asirra.{name}({parameter.name}=...) vs `{' '.join(path)}`"
        compared += 1
    assert compared or name == "harden"  # harden's defaults are HardenConfig's, checked in test_structure
