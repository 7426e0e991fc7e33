"""Decode each image once: preprocessed uint8 pixels on disk, memory-mapped, keyed by file content.

JPEG decoding costs more than a small network's forward pass on 2 cores, and an epoch reads
every image, so the training loop never decodes: it reads rows of a memory-mapped uint8 array.
The store is append-only (`pixels-<size>.u8`) with a SQLite index from content hash to row, so
renamed or duplicated files share a row, a killed build keeps what it finished, and broken files
are remembered with their reason instead of being decoded again. Memory stays bounded: pages of
the map are the kernel's to evict, and nothing holds a float copy of the set.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from asirra.images import UnusableImage, read_pixels
from asirra.runs import content_key  # noqa: F401  (the one content hash; imported from here by many)

# Bump when images.preprocess changes, so old pixels are never served for the new recipe.
PREPROCESS_VERSION = 1


def default_cache_dir() -> Path:
    return Path(os.environ.get("ASIRRA_CACHE", Path.home() / ".cache" / "asirra"))


@dataclass
class CachedImages:
    """The usable images of a listing, as rows of the pixel store, in the listing's order."""

    refs: list  # the usable ImageRefs
    rows: np.ndarray  # int64 row of each ref in the store
    keys: list[str]  # content key of each ref
    store: np.ndarray  # memmap (n_rows, size, size, 3) uint8
    unusable: list[dict] = field(default_factory=list)  # {"path", "reason"}

    def __len__(self) -> int:
        return len(self.refs)

    @property
    def labels(self) -> np.ndarray:
        return np.array([-1 if r.label is None else r.label for r in self.refs], dtype=np.int64)

    def pixels(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 (n, size, size, 3) for the given positions in this listing."""
        return np.asarray(self.store[self.rows[np.asarray(indices)]])


class PixelCache:
    def __init__(self, size: int, root: Path | None = None):
        self.size = size
        self.dir = Path(root or default_cache_dir()) / f"pixels-v{PREPROCESS_VERSION}-{size}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.store_path = self.dir / "pixels.u8"
        self.row_bytes = size * size * 3
        self._db = sqlite3.connect(self.dir / "index.sqlite")
        self._db.execute("CREATE TABLE IF NOT EXISTS image (key TEXT PRIMARY KEY, row INTEGER, reason TEXT)")

    def build(self, refs: Sequence, workers: int = 2, progress: bool = True) -> CachedImages:
        """One pass over the files: hash each, decode only what the store does not hold yet."""
        with self._lock():
            known = dict(self._db.execute("SELECT key, row FROM image"))
            keys = self._hash_and_fill(refs, known, workers, progress)
        return self._assemble(refs, keys, self._lookup(set(keys)))

    def _hash_and_fill(self, refs, known: dict, workers: int, progress: bool) -> list[str]:
        def read(ref):
            try:
                data = ref.read_bytes()
            except UnusableImage as exc:
                return None, None, exc.reason
            except OSError as exc:
                return None, None, f"cannot read file ({exc})"
            key = content_key(data)
            if key in known:
                return key, None, None
            try:
                return key, read_pixels(data, self.size), None
            except UnusableImage as exc:
                return key, None, exc.reason

        next_row = self.store_path.stat().st_size // self.row_bytes if self.store_path.exists() else 0
        keys: list[str] = []
        pending: list[tuple] = []
        bar = tqdm(total=len(refs), desc=f"caching pixels at {self.size}px", unit="img", disable=not progress)
        with open(self.store_path, "ab") as store, ThreadPoolExecutor(workers) as pool:
            # A torn tail (a build killed mid-write) is cut back to whole rows before appending.
            store.truncate(next_row * self.row_bytes)
            for start in range(0, len(refs), 256):  # bounded: at most 256 decoded images in flight
                for key, pixels, reason in pool.map(read, refs[start : start + 256]):
                    keys.append(key or reason)  # an unreadable file is "keyed" by its reason
                    if key is None or key in known:
                        continue
                    if pixels is None:
                        known[key] = None
                        pending.append((key, None, reason))
                    else:
                        store.write(pixels.tobytes())
                        known[key] = next_row
                        pending.append((key, next_row, None))
                        next_row += 1
                self._commit(store, pending)
                bar.update(min(256, len(refs) - start))
        bar.close()
        return keys

    def _lookup(self, keys: set[str]) -> dict[str, tuple[int | None, str | None]]:
        found = {}
        keys = list(keys)
        for i in range(0, len(keys), 900):  # SQLite's bound-parameter limit
            chunk = keys[i : i + 900]
            query = f"SELECT key, row, reason FROM image WHERE key IN ({','.join('?' * len(chunk))})"
            for key, row, reason in self._db.execute(query, chunk):
                found[key] = (row, reason)
        return found

    def _commit(self, store, pending: list) -> None:
        # Rows reach the disk before the index names them, so the index never points past the data.
        if not pending:
            return
        store.flush()
        os.fsync(store.fileno())
        self._db.executemany("INSERT OR REPLACE INTO image VALUES (?, ?, ?)", pending)
        self._db.commit()
        pending.clear()

    def _assemble(self, refs, keys, known) -> CachedImages:
        usable, rows, usable_keys, unusable = [], [], [], []
        for ref, key in zip(refs, keys):
            row, reason = known.get(key, (None, key))  # keys not in the index are read errors
            if row is None:
                unusable.append({"path": ref.source, "reason": reason})
            else:
                usable.append(ref)
                rows.append(row)
                usable_keys.append(key)
        n_rows = self.store_path.stat().st_size // self.row_bytes if self.store_path.exists() else 0
        store = (
            np.memmap(self.store_path, dtype=np.uint8, mode="r", shape=(n_rows, self.size, self.size, 3))
            if n_rows
            else np.zeros((0, self.size, self.size, 3), np.uint8)
        )
        return CachedImages(usable, np.array(rows, dtype=np.int64), usable_keys, store, unusable)

    def _lock(self):
        return FileLock(self.dir / "lock")


class FileLock:
    """One writer per cache folder: two training runs sharing a cache write in turn, not interleaved."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.handle = open(self.path, "w")
        fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
        return False
