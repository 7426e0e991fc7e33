"""The documentation stays true: the site builds in strict mode, its API reference lists exactly the
public names, its CLI reference every command, every `asirra ...` command shown in the docs or the
README parses against the real command line, the README's links resolve, and the headline table is
the same on the README and the site's home page."""

from __future__ import annotations

import re
import shlex
import zlib
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT
from typer.main import get_command

import asirra
import asirra.captcha
from asirra.cli import app

DOCS = PROJECT_ROOT / "docs"
README = PROJECT_ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def test_the_site_builds_in_strict_mode(built_site):
    assert (built_site / "index.html").is_file() and (built_site / "guides" / "train-evaluate" / "index.html").is_file()
    assert (built_site / "notebooks" / "01-cats-vs-dogs.ipynb").is_file()  # built from the .py, without outputs
    assert '"outputs": []' in (built_site / "notebooks" / "01-cats-vs-dogs.ipynb").read_text()


def test_every_page_is_in_the_navigation():
    nav = (PROJECT_ROOT / "mkdocs.yml").read_text()
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert not [p for p in pages if p not in nav]


def _inventory(site: Path) -> set[str]:
    blob = (site / "objects.inv").read_bytes()
    body = zlib.decompress(blob.split(b"\n", 4)[4]).decode()
    return {line.split()[0] for line in body.splitlines() if line.startswith("asirra")}


def test_the_api_reference_lists_exactly_the_public_names(built_site):
    names = _inventory(built_site)
    top = {n.removeprefix("asirra.") for n in names if n.count(".") == 1} - {"captcha"}
    assert top == set(asirra.__all__)
    captcha = {n.removeprefix("asirra.captcha.") for n in names
               if n.startswith("asirra.captcha.") and n.count(".") == 2}
    internal = {"attack", "challenge", "defend", "experiments", "rendering", "safeguards", "service"}
    assert captcha - internal == set(asirra.captcha.__all__)
    html = (built_site / "reference" / "api" / "index.html").read_text()
    assert 'id="asirra.train"' in html and 'id="asirra.api.train"' not in html  # shown under its public name


def _command_paths(command, prefix=("asirra",)):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        if not sub.hidden:
            yield from _command_paths(sub, (*prefix, name))


def test_the_cli_reference_has_every_command(built_site):
    html = (built_site / "reference" / "cli" / "index.html").read_text()
    paths = [p for p in _command_paths(get_command(app)) if len(p) > 1]  # the root is the page's own heading
    missing = [" ".join(p) for p in paths if f'id="{"-".join(p)}"' not in html]
    assert not missing


def parse_command(line: str) -> str:
    """The command path `line` (an `asirra ...` command) names, parsed as the real command line would;
    click raises a UsageError for an unknown command or option, a bad value or a missing argument."""
    args = shlex.split(line, comments=True)[1:]
    command, name, path = get_command(app), "asirra", ["asirra"]
    while True:
        ctx = command.make_context(name, list(args))
        if not hasattr(command, "commands"):
            return " ".join(path)
        name, command, args = command.resolve_command(ctx, getattr(ctx, "_protected_args", []) + ctx.args)
        path.append(name)


def documented_commands() -> list[tuple[str, str]]:
    """(file, command) for every `asirra ...` line in a fenced block of the docs or the README."""
    found = []
    for path in [README, *sorted(DOCS.rglob("*.md"))]:
        for _, body in FENCE.findall(path.read_text()):
            for line in body.replace("\\\n", " ").splitlines():
                if line.strip().startswith("asirra "):
                    found.append((str(path.relative_to(PROJECT_ROOT)), line.strip()))
    return found


def test_the_docs_show_commands():
    assert len(documented_commands()) >= 30


@pytest.mark.parametrize("where, command", documented_commands())
def test_every_documented_command_parses(where, command):
    parse_command(command)


@pytest.mark.parametrize("line, words", [
    ("asirra train --epoch 3", "No such option"),
    ("asirra captcha hardn --data x", "No such command"),
    ("asirra captcha harden --data x", "Missing"),
    ("asirra train --epochs three", "valid integer"),
])
def test_a_wrong_command_in_the_docs_would_be_caught(line, words):
    with pytest.raises(Exception, match=words):
        parse_command(line)


def test_the_readme_links_and_pictures_resolve():
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert local and not [t for t in local if not (PROJECT_ROOT / t).exists()]
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert pictures and all(p.startswith(("docs/assets/", "src/asirra/weights/")) for p in pictures)


def _headline(path: Path) -> str:
    text = path.read_text()
    return text[text.index("<!-- headline"):text.index("<!-- /headline -->")]


def test_the_headline_table_is_the_same_on_the_readme_and_the_site():
    table = _headline(README)
    assert table == _headline(DOCS / "index.md")
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert 2 <= len(rows) - 1 <= 10  # a header and at most ten rows
    assert "](" not in table  # links differ between the two places: they go below the table
