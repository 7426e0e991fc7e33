"""The example notebooks run top to bottom, in quick mode, in a kernel of this project's own Python.

The notebooks are committed as jupytext `.py` files only (their outputs hold dataset photos, which
are never committed); the test builds each notebook, runs it with nbclient and keeps the executed
copy in test-artifacts/ for a person to read.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT, require_shared_data

import asirra
import asirra.captcha

EXAMPLES = PROJECT_ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.py"))
ARTIFACTS = PROJECT_ROOT / "test-artifacts"


def test_there_are_two_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01-cats-vs-dogs.py", "02-captcha-lab.py"]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_use_only_public_names(notebook):
    """Every asirra name a notebook uses is in asirra.__all__ or asirra.captcha.__all__."""
    public = {"asirra": set(asirra.__all__), "asirra.captcha": set(asirra.captcha.__all__)}
    tree = ast.parse(notebook.read_text())
    used = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asirra"):
            used += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            assert all(a.name in ("asirra", "asirra.captcha") or not a.name.startswith("asirra") for a in node.names)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "asirra":
            used.append(("asirra", node.attr))
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
              and getattr(node.value.value, "id", None) == "asirra" and node.value.attr == "captcha"):
            used.append(("asirra.captcha", node.attr))
    unknown = [f"{module}.{name}" for module, name in used
               if name != "captcha" and name not in public.get(module, set())]
    assert used and not unknown, unknown


def test_no_executed_notebook_is_committed():
    listed = subprocess.run(["git", "ls-files", "examples"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    assert not [name for name in listed.stdout.split() if name.endswith(".ipynb")]


def test_the_package_never_chooses_a_matplotlib_backend():
    """matplotlib.use() would switch a notebook's inline plots off for the rest of its session."""
    sources = (PROJECT_ROOT / "src" / "asirra").rglob("*.py")
    assert not [str(p) for p in sources if "matplotlib.use(" in p.read_text()]


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_quick_mode(notebook, tmp_path, monkeypatch, notebook_cache):
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    data = require_shared_data()
    monkeypatch.setenv("ASIRRA_QUICK", "1")
    monkeypatch.setenv("ASIRRA_DATA", str(data))
    monkeypatch.setenv("ASIRRA_CACHE", str(notebook_cache))  # the notebooks share decoded pixels and features
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = jupytext.read(notebook)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=900, startup_timeout=120,
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        nbformat.write(nb, ARTIFACTS / f"{notebook.stem}.ipynb")  # gitignored: its pictures are dataset photos
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs).strip()
    assert printed == sys.executable  # the kernel ran this project's interpreter, not another one
    images = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert images >= 2, "plots are shown inline"


@pytest.fixture(scope="session")
def notebook_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook-cache")
