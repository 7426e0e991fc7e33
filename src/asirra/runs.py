"""Output folders stamped with the settings that made them: claim a new one, resume it, or refuse it.

Every long command (train, cv, harden, distort, the attacker ladder, the study) writes into one
folder and can be killed and rerun. Rerunning it with the same settings continues the work; with
other settings it would mix two experiments in one folder, so it is refused, in one message that
names the settings that differ. The stamp is a JSON file of settings inside the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from asirra.errors import UserError
from asirra.fileio import write_json_atomic


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
