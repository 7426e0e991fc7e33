"""Writing a pool made image by image from another: hardened (harden.py) or distorted (distort.py).

OUT holds what any data folder holds, so `asirra.data.scan` and `asirra serve --data OUT` read it
unchanged: cat.N.png / dog.N.png (Kaggle names; N is the original's id when it has a numeric one),
lossless PNG at the original's resolution. Beside them:

  settings.json    how the pool was made; a resumed run must be asked for the same
  manifest.jsonl   one JSON record per input image: the output file, the original's content hash,
                   SSIM / PSNR / L-infinity against the original, seconds spent, and what the maker
                   adds; an unusable input gets a record with its reason instead
  summary.json     medians and totals over the manifest, rewritten at the end of each run
  compare.html     originals beside their changed versions (relative paths, for a browser)

Resuming: an input whose record is in the manifest and whose file exists is skipped. A record is
one write of one line, flushed and fsynced after its PNG is in place, so a killed run loses at most
the image it was working on; a torn last line is dropped when the manifest is read back.
"""

from __future__ import annotations

import html
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from asirra.cache import content_key
from asirra.captcha.defend.similarity import compare
from asirra.data import MEMBER_SEPARATOR
from asirra.errors import ConfigError
from asirra.fileio import atomic_path, write_json_atomic, write_text_atomic
from asirra.images import UnusableImage, load_image
from asirra.labels import CLASS_NAMES
from asirra.runs import claim

MANIFEST = "manifest.jsonl"
SETTINGS = "settings.json"
SUMMARY = "summary.json"
COMPARE_PAGE = "compare.html"
COMPARE_ROWS = 48  # enough pairs to judge by eye, few enough for one page

# (original uint8 (H, W, 3), its content key, its ImageRef) -> (changed uint8 (H, W, 3), fields for its record)
Maker = Callable[[np.ndarray, str, object], tuple[np.ndarray, dict]]


class PoolError(ConfigError):
    """An output folder that cannot be written as asked; the message is one line."""


@dataclass
class DerivedPoolSummary:
    """A hardened or distorted pool as written: what `asirra.harden` returns.

    The folder holds one lossless `cat.N.png` / `dog.N.png` per usable input (a labelled pool that
    `asirra.create_app` serves as it is), `manifest.jsonl` (one record per image: its source, the
    SSIM / PSNR / L-inf distance to the original, seconds), `summary.json` and `compare.html`
    (each original beside its copy, for people to judge).
    """

    out: Path
    """The pool's folder."""
    written: int
    """Images in the pool now, from this call and earlier (resumed) ones."""
    this_run: int
    """Images written by this call."""
    unusable: list[dict]
    """{"source", "reason"} of every input that could not be used, over the whole manifest."""
    files: dict[str, str]
    """"manifest", "summary" and "compare": the paths of those files."""


def labelled_sample(data: str | os.PathLike, limit: int | None, seed: int) -> list:
    """The labelled images under `data` a derived pool is made of: a uniformly random `limit` of them
    (all when None), in their folder's order."""
    from asirra.data import scan
    from asirra.stats import random_subset

    refs = scan(data, labelled=True)
    return [refs[i] for i in random_subset(len(refs), limit, seed)]


def output_names(refs: Sequence) -> list[str]:
    """The Kaggle file name each labelled ref gets: `cat.<id>.png`, or numbered by position when ids
    are not numeric or not unique per class (so two inputs never write one file)."""
    if any(ref.label is None for ref in refs):
        raise PoolError("every input image needs a label (cat or dog): the output is a labelled pool")
    keys = [(ref.label, ref.id) for ref in refs]
    keep_ids = all(ref.id.isdigit() for ref in refs) and len(set(keys)) == len(keys)
    return [f"{CLASS_NAMES[ref.label]}.{ref.id if keep_ids else i}.png" for i, ref in enumerate(refs)]


def derive_pool(refs: Sequence, out: str | os.PathLike, settings: dict, make: Maker, progress: bool = True,
                clock: Callable[[], float] = time.perf_counter, desc: str = "deriving") -> DerivedPoolSummary:
    """Run `make` on every ref not done yet and write the pool in `out` (see the module docstring)."""
    out = Path(out)
    names = output_names(refs)
    claim_folder(out, settings)
    done = read_manifest(out)
    todo = [(ref, name) for ref, name in zip(refs, names) if not _finished(out, done.get(ref.source))]
    this_run = 0
    with open(out / MANIFEST, "a", encoding="utf-8") as manifest:
        for ref, name in tqdm(todo, desc=desc, unit="img", file=sys.stderr, disable=not progress):
            record = _derive_one(ref, name, out, make, clock)
            manifest.write(json.dumps(record) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            done[ref.source] = record
            this_run += "file" in record
    records = list(done.values())
    files = {"manifest": str(out / MANIFEST), "summary": str(write_json_atomic(out / SUMMARY, summarise(records))),
             "compare": str(write_compare_page(out, records))}
    unusable = [{"source": r["source"], "reason": r["reason"]} for r in records if "reason" in r]
    return DerivedPoolSummary(out, sum("file" in r for r in records), this_run, unusable, files)


def claim_folder(out: Path, settings: dict) -> bool:
    """Record `settings` in a new (or empty) folder, or accept one made with the same: True to resume."""
    return claim(out, settings, SETTINGS, "derived pool", fresh_only=True)


def read_manifest(out: str | os.PathLike) -> dict[str, dict]:
    """Records by source path; a torn last line (a run killed mid-write) is cut off the file."""
    path = Path(out) / MANIFEST
    if not path.exists():
        return {}
    records, good_bytes = {}, 0
    with open(path, "rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not line.endswith(b"\n"):
                break
            records[record["source"]] = record
            good_bytes += len(line)
    if good_bytes < path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(good_bytes)
    return records


def _finished(out: Path, record: dict | None) -> bool:
    return record is not None and ("reason" in record or (out / record["file"]).is_file())


def _derive_one(ref, name: str, out: Path, make: Maker, clock) -> dict:
    start = clock()
    try:
        data = ref.read_bytes()
        original = np.asarray(load_image(data), dtype=np.uint8)  # upright RGB at full resolution
    except UnusableImage as exc:
        return {"source": ref.source, "reason": exc.reason}
    key = content_key(data)
    changed, fields = make(original, key, ref)
    with atomic_path(out / name) as tmp:
        Image.fromarray(changed).save(tmp, format="PNG", compress_level=3)
    return {"file": name, "source": ref.source, "label": CLASS_NAMES[ref.label], "original_key": key,
            "width": original.shape[1], "height": original.shape[0], **fields, **compare(original, changed),
            "seconds": round(clock() - start, 4)}


def summarise(records: Sequence[dict]) -> dict:
    """Medians and extremes of the manifest's measurements."""
    made = [r for r in records if "file" in r]
    summary = {"images": len(made), "unusable": len(records) - len(made)}
    if made:
        psnrs = [r["psnr"] for r in made if r["psnr"] is not None]  # None: unchanged (infinite PSNR)
        seconds = [r["seconds"] for r in made]
        summary.update(
            ssim_median=statistics.median(r["ssim"] for r in made), ssim_min=min(r["ssim"] for r in made),
            psnr_median=statistics.median(psnrs) if psnrs else None, linf_max=max(r["linf"] for r in made),
            seconds_per_image_median=statistics.median(seconds), seconds_total=round(sum(seconds), 2),
        )
    return summary


def write_compare_page(out: Path, records: Sequence[dict], rows: int = COMPARE_ROWS) -> Path:
    """compare.html: original | changed, with SSIM and PSNR, for the first `rows` images."""
    cells = []
    for record in [r for r in records if "file" in r][:rows]:
        caption = html.escape(f"{record['file']}  SSIM {record['ssim']:.3f}  PSNR "
                              + ("inf" if record["psnr"] is None else f"{record['psnr']:.1f} dB")
                              + f"  L-inf {record['linf']}")
        original = _page_path(record["source"], out)
        left = (f'<img src="{html.escape(original)}" alt="original">' if original
                else "<span>original inside an archive</span>")
        cells.append(f'<figure>{left}<img src="{html.escape(record["file"])}" alt="changed">'
                     f"<figcaption>{caption}</figcaption></figure>")
    page = ("<!doctype html><meta charset='utf-8'><title>asirra: original beside changed</title>"
            "<style>body{font:14px sans-serif}figure{display:inline-block;margin:8px}"
            "img{height:200px;margin-right:4px}figcaption{font-size:12px}</style>"
            f"<h1>Original (left) and changed (right)</h1>{''.join(cells)}\n")
    return write_text_atomic(out / COMPARE_PAGE, page)


def _page_path(source: str, out: Path) -> str | None:
    if MEMBER_SEPARATOR in source:
        return None
    return Path(os.path.relpath(Path(source).resolve(), out.resolve())).as_posix()
