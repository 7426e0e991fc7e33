"""`asirra data check|show|digits` and `asirra download`: looking at a data set before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from asirra.cli.common import DATA_PATH_HELP, JsonFlag, emit_json


def data_check(
    path: Optional[Path] = typer.Argument(None, help=DATA_PATH_HELP, show_default=False),
    as_json: JsonFlag = False,
    workers: int = typer.Option(2, min=1, help="Decoding threads."),
) -> None:
    """Decode every image: counts per class, size statistics, each unusable file with its reason."""
    from asirra.data import check_folder

    report = check_folder(path, workers=workers)
    if as_json:
        emit_json(report.to_json())
    else:
        typer.echo(report.to_text())


def data_show(
    path: Optional[Path] = typer.Argument(None, help=DATA_PATH_HELP, show_default=False),
    out: Path = typer.Option(..., "--out", help="PNG file to write."),
    n: int = typer.Option(16, "--n", min=1, help="How many images."),
    seed: int = typer.Option(0, help="Which random sample."),
) -> None:
    """Write a PNG grid of randomly drawn images titled with their class and id."""
    from asirra.data import show_folder

    typer.echo(str(show_folder(path, out, n=n, seed=seed)))


def data_digits(
    out: Path = typer.Option(..., "--out", help="Folder to write 0/ ... 9/ class folders of PNGs into."),
    size: int = typer.Option(32, "--size", min=8, help="Image side in pixels (the originals are 8x8)."),
) -> None:
    """Write scikit-learn's bundled handwritten digits (1,797 images, 10 classes) as class folders."""
    from asirra.sample_data import write_digits

    counts = write_digits(out, size=size)
    typer.echo(f"{out}: {sum(counts.values())} images in {len(counts)} classes "
               f"({', '.join(f'{k}: {v}' for k, v in counts.items())})\nnext: asirra train --data {out}")


def download_command(
    dest: Path = typer.Option(Path("data"), help="Folder to put the archive in."),
    url: Optional[str] = typer.Option(None, help="Archive URL (default: Microsoft's PetImages zip).", show_default=False),
    size: Optional[int] = typer.Option(None, help="Expected size in bytes."),
    sha256: Optional[str] = typer.Option(None, help="Expected SHA-256 (hex)."),
) -> None:
    """Fetch Microsoft's PetImages zip (resumable); it is then usable in place as data."""
    from asirra import download

    path = download.download(url or download.PETIMAGES_URL, dest, expected_size=size, sha256=sha256)
    typer.echo(f"{path}\nnext: asirra data check {path}")
