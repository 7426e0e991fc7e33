"""Atomic writes: every output and checkpoint appears whole or not at all.

A run killed mid-write must leave the previous file intact, and a reader (a resumed run, a
browser polling a plot) must never see half a file: write a sibling, then rename over the target.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of `target` to write; on success it replaces `target` in one rename.

    The sibling is created fresh by whoever writes it (not by mkstemp, whose 0600 mode would
    stick to the result), with a unique name so concurrent writers never collide.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")
