"""MkDocs hooks: the command-line reference from the Typer app itself, and the example notebooks
served beside the pages (the .py as committed, the .ipynb built from it without outputs).

Typer's own generator (`typer asirra.cli utils docs`) writes the CLI reference, so it cannot drift from
`asirra --help`; mkdocs-typer2 does not work with the Typer this project uses (its click is vendored).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
CLI_MARKER = "<!-- asirra-cli-reference -->"


def on_files(files, config):
    import jupytext

    for path in sorted((ROOT / "examples").glob("*.py")):
        files.append(File.generated(config, f"notebooks/{path.name}", abs_src_path=str(path)))
        notebook = jupytext.writes(jupytext.read(path), fmt="ipynb")  # no outputs: only what is committed
        files.append(File.generated(config, f"notebooks/{path.stem}.ipynb", content=notebook))
    return files


def on_page_markdown(markdown, page, config, files):
    if CLI_MARKER not in markdown:
        return markdown
    generated = subprocess.run(
        [sys.executable, "-m", "typer", "asirra.cli", "utils", "docs", "--name", "asirra", "--title", "Commands"],
        cwd=ROOT, capture_output=True, text=True, check=True).stdout
    # One level down: the page's own title is the only h1.
    return markdown.replace(CLI_MARKER, "\n".join("#" + line if line.startswith("#") else line
                                                  for line in generated.splitlines()))
