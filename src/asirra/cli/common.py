"""What every command shares: the one place user errors become one line, the output helpers, and
the options several commands take, declared once so their spelling, help and defaults cannot drift."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import sys
from typing import Annotated, Callable, Optional

import typer

from asirra.config import DEFAULT_BACKEND  # noqa: F401  (the default every backend option shows)
from asirra.errors import UserError


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, no traceback: how every command reports bad input."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def guarded(command: Callable) -> Callable:
    """`command` with the package's user errors turned into one line and exit code 2.

    The one place they are caught: anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        _show_progress_messages()
        try:
            return command(*args, **kwargs)
        except UserError as exc:
            fail(str(exc))

    return run


def _show_progress_messages() -> None:
    """The library reports progress through `logging` (asirra.*); a command shows it on stderr."""
    logger = logging.getLogger("asirra")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a message is logged (a test runner swaps it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def add_command(app: typer.Typer, name: str, command: Callable, **options) -> None:
    """Register `command` as `name` on `app`, guarded."""
    app.command(name, **options)(guarded(command))


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def report_skips(unusable: list[dict]) -> None:
    """Each unreadable image a command skipped, one line each on stderr."""
    for item in unusable:
        typer.echo(f"skipped {item.get('path') or item.get('source')}: {item['reason']}", err=True)


def with_options_of(source: Callable, skip: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Give a command every option of `source` that it does not declare itself (nor in `skip`).

    Typer has no option groups; `cv` takes every `asirra train` option this way, so they are
    declared once (in `asirra train`) and cannot drift. The command takes them as **options.
    """

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        taken = {p.name for p in own} | set(skip)
        borrowed = [p for p in inspect.signature(source, eval_str=True).parameters.values() if p.name not in taken]
        command.__signature__ = inspect.Signature([*own, *borrowed])
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate


MODEL_HELP = "Run folder or model file (default: the model shipped with asirra)."
BACKEND_HELP = ("Inference engine: auto (onnx-int8 when the model has a fresh int8 export, as the shipped one does, "
                "else onnx), onnx (exact fp32, equals torch), onnx-int8 (needs `asirra export --int8`) or torch.")
DATA_PATH_HELP = "Folder or .zip of images (default: --data lookup: $ASIRRA_DATA, ./data/..., ../shared/...)."

ModelOption = Annotated[Optional[str], typer.Option("--model", help=MODEL_HELP, show_default=False)]
BackendOption = Annotated[str, typer.Option("--backend", help=BACKEND_HELP)]
TtaOption = Annotated[Optional[bool], typer.Option(
    "--tta/--no-tta", help="Average with the mirrored image (default: as the model was validated).", show_default=False)]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
SeedOption = Annotated[int, typer.Option("--seed", help="Seeds every random draw of the command.")]
