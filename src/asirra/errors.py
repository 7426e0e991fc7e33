"""The errors a user can cause, under one base class.

`UserError` is bad input a person can fix (a data folder, an option, a file, a model name): the
command line catches it in one place (`asirra.cli.common.guarded`) and prints its one-line message.
Anything else raised inside the package is a bug and keeps its traceback. Each module's own error
(DataError, HardenError, ...) derives from UserError; UserError is a ValueError, so callers that
caught ValueError before still catch every one of them.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(ValueError):
    """Bad input a person can fix; the message is one line."""


class ConfigError(UserError):
    """Settings or options that cannot work together."""


class DataError(UserError):
    """A data set that cannot be used as asked."""


class DataNotFound(DataError):
    """No data where it was looked for; the message says how to get some."""


class ModelError(UserError):
    """An unknown model name, a missing or unreadable model file, or a model unfit for the task."""


class MissingExtra(UserError):
    """An optional part of asirra that is not installed."""


def require(module: str, extra: str) -> ModuleType:
    """Import `module`, or say in one line which extra installs it (`pip install 'asirra[serve]'`)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"this needs {module.split('.')[0]}, which comes with asirra[{extra}]: "
                           f"pip install 'asirra[{extra}]' (make installs everything)") from None
