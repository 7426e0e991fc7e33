"""Output folders stamped with the settings that made them, and caches keyed by the content of their inputs.

Every long command (train, cv, harden, distort, the attacker ladder, the study) writes into one
folder and can be killed and rerun. Rerunning it with the same settings continues the work; with
other settings it would mix two experiments in one folder, so it is refused, in one message that
names the settings that differ. The stamp is a JSON file of settings inside the folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable

from asirra.errors import UserError
from asirra.fileio import write_json_atomic

log = logging.getLogger(__name__)


class RunFolderError(UserError):
    """An output folder that holds other work than the command would write."""


def as_json(settings: dict) -> dict:
    """Settings as they read back from their stamp (tuples as lists, paths and enums as strings)."""
    return json.loads(json.dumps(settings, default=str))


def stamped(folder: str | os.PathLike, stamp: str) -> dict | None:
    """The settings stamped in `folder` (None when it has no stamp)."""
    path = Path(folder) / stamp
    return json.loads(path.read_text()) if path.exists() else None


def differences(before: dict, now: dict, keys: Iterable[str] | None = None) -> list[str]:
    """The settings (among `keys`, default all of either) that differ; nested ones named "train.epochs"."""
    now = as_json(now)
    changed = []
    for key in (sorted(set(before) | set(now)) if keys is None else keys):
        old, new = before.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{key}.{k}" for k in differences(old, new, sorted(set(old) | set(new)))]
        elif old != new:
            changed.append(key)
    return sorted(changed)


def refuse(where, what: str, changed: list[str], instead: str = "--out") -> RunFolderError:
    """The one message for work of other settings found where this work was to go."""
    return RunFolderError(f"{where} holds a {what} made with other settings ({', '.join(changed)}); "
                          f"rerun it with the same settings or choose another {instead}")


def check_stamp(folder: str | os.PathLike, settings: dict, stamp: str, what: str,
                keys: Iterable[str] | None = None) -> dict | None:
    """The stamp of `folder` if its `keys` (default: every key of either) equal `settings`; None without a stamp.

    Refuses, naming what differs, a folder stamped with other settings.
    """
    before = stamped(folder, stamp)
    if before is None:
        return None
    changed = differences(before, settings, keys)
    if changed:
        raise refuse(folder, what, changed)
    return before


def claim(folder: str | os.PathLike, settings: dict, stamp: str, what: str, keys: Iterable[str] | None = None,
          fresh_only: bool = False, restamp: bool = False) -> bool:
    """Make `folder` hold this `what`: stamp a new one, or accept an existing one stamped alike.

    Returns True when the folder already held it (the caller resumes). `fresh_only` refuses a
    non-empty folder without a stamp (a command that could overwrite someone's files); `restamp`
    rewrites the stamp on a resume (settings outside `keys` may change from run to run).
    """
    folder = Path(folder)
    resumed = check_stamp(folder, settings, stamp, what, keys) is not None
    if not resumed and fresh_only and folder.exists() and any(folder.iterdir()):
        raise RunFolderError(f"{folder} is not empty and holds no {stamp}; choose a new or empty folder")
    if restamp or not resumed:
        write_json_atomic(folder / stamp, settings)
    return resumed


# ---- caches keyed by the content of their inputs ----------------------------------------------

# The libraries whose numbers a cached result depends on (an int8 kernel fix changed answers once).
KEYED_LIBRARIES = ("asirra", "numpy", "torch", "onnxruntime", "pillow", "scikit-learn")


def content_key(data: bytes) -> str:
    """The content hash of a file's bytes: how every cache, split and pool names an image."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_key(path: str | os.PathLike) -> str:
    return content_key(Path(path).read_bytes())


def folder_key(path: str | os.PathLike) -> str:
    """The files under `path` by relative name and content (a model folder, a pool): equal iff they are."""
    root = Path(path)
    digest = hashlib.blake2b(digest_size=16)
    for item in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(root).as_posix()}\t{file_key(item)}\n".encode())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Key:
    """A cached result's name: `hex` hashes `manifest` ({"kind", "version", "inputs", "code"})."""

    hex: str
    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    def __str__(self) -> str:
        return f"{self.kind}/{self.hex}"


def library_versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in KEYED_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def describe_input(value):
    """An input as JSON a key can hash: files (Path) by content, folders by their files, other keys by
    their hex, dataclasses by their fields (those marked metadata={"key": False} left out), enums by value."""
    if isinstance(value, Key):
        return {"key": value.hex}
    if isinstance(value, Path):
        if value.is_dir():
            return {"folder": folder_key(value)}
        return {"file": file_key(value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: describe_input(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("key", True)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): describe_input(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [describe_input(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cannot key an input of type {type(value).__name__}: give a Path, a Key, settings or values")


def input_key(kind: str, *, version: int = 1, **inputs) -> Key:
    """The key of a `kind` of result computed from `inputs` by this code (`version`: the stage's own)."""
    manifest = {"kind": kind, "version": version, "inputs": {k: describe_input(v) for k, v in sorted(inputs.items())},
                "code": library_versions()}
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return Key(hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), manifest)


def explain(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between two manifests, one "path: old -> new" line per changed leaf."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for name in sorted(set(old) | set(new)):
            lines += explain(old.get(name), new.get(name), f"{prefix}.{name}" if prefix else str(name))
        return lines
    if old == new:
        return []
    short = lambda v: (json.dumps(v, sort_keys=True)[:60])  # noqa: E731
    return [f"{prefix}: {short(old)} -> {short(new)}"]


class KeyedCache:
    """Results under their keys: ROOT/KIND/HEX/ holds inputs.json (the manifest) and the result.

    A result is either JSON (`get_or_compute`) or a folder the caller fills (`folder` + `finish`; a
    folder without its `done` mark is unfinished work a rerun continues). With a `label`, the cache
    remembers the label's last key and logs what changed when it has to compute again. `stats`
    counts, per kind, results computed and reused by this object: how a rerun shows what it redid.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.stats: dict[str, dict[str, int]] = {}

    def folder(self, key: Key) -> Path:
        folder = self.root / key.kind / key.hex
        if not (folder / "inputs.json").exists():
            write_json_atomic(folder / "inputs.json", key.manifest)
        return folder

    def done(self, key: Key) -> bool:
        return (self.root / key.kind / key.hex / "done").exists()

    def finish(self, key: Key) -> None:
        (self.folder(key) / "done").write_text("")

    def get(self, key: Key):
        path = self.root / key.kind / key.hex / "result.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: Key, result) -> None:
        write_json_atomic(self.folder(key) / "result.json", result)

    def get_or_compute(self, key: Key, compute: Callable[[], object], label: str | None = None):
        cached = self.get(key)
        if cached is not None:
            self._count(key, "reused")
            return cached
        self.note_miss(key, label)
        result = compute()
        self.put(key, result)
        return result

    def note_miss(self, key: Key, label: str | None) -> None:
        """Count a computation, and say what changed since the label's last key (if it had one)."""
        self._count(key, "computed")
        if label is None:
            return
        index = self.root / key.kind / "labels" / f"{label.replace('/', '_')}.json"
        if index.exists():
            previous = json.loads(index.read_text())
            if previous["hex"] != key.hex:
                old = self.root / key.kind / previous["hex"] / "inputs.json"
                if old.exists():
                    changes = explain(json.loads(old.read_text()), key.manifest)
                    log.info(f"{key.kind} {label}: recomputing, inputs changed: {'; '.join(changes) or 'unknown'}")
        write_json_atomic(index, {"hex": key.hex})

    def reused(self, key: Key) -> None:
        self._count(key, "reused")

    def _count(self, key: Key, what: str) -> None:
        counts = self.stats.setdefault(key.kind, {"computed": 0, "reused": 0})
        counts[what] += 1
