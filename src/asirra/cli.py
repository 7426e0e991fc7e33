"""The `asirra` command line: one Typer app, thin wrappers over the package's functions.

Heavy imports (torch, onnxruntime, fastapi) happen inside commands so `asirra --help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    help="Train cat-vs-dog CNNs; measure, attack and defend Asirra-style CAPTCHAs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr, no traceback: how every command reports bad input."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


# ---- section: data (data.py, download.py) -------------------------------------------------


# ---- section: models, training, evaluation, prediction -----------------------------------


# ---- section: captcha simulate / defend (captcha/simulate.py, captcha/safeguards.py) --------


# ---- section: captcha serve / attack (captcha/service.py, captcha/attack.py) ----------------


if __name__ == "__main__":
    app()
