"""The one way a public name is retired: it warns for one release, then it goes.

`deprecated(since, removed_in, instead)` wraps a function or method so that each call warns with a
FutureWarning (as scikit-learn does: unlike DeprecationWarning it is shown by default, in notebooks
and scripts alike) pointing at the caller's line. Every use is recorded in REGISTRY, and
tests/test_public_api.py fails once the package's version reaches an entry's `removed_in`: the
one-release rule enforces itself. Imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)

# "asirra.Classifier.predict_classes_proba" -> (since, removed_in, instead)
REGISTRY: dict[str, tuple[str, str, str]] = {}


def deprecated(since: str, removed_in: str, instead: str) -> Callable[[F], F]:
    """Mark a public function or method as deprecated: each call warns, naming what to use instead."""

    def wrap(function: F) -> F:
        name = f"{function.__module__.split('.')[0]}.{function.__qualname__}"
        message = f"{name} is deprecated since {since} and will be removed in {removed_in}; use {instead}"
        REGISTRY[name] = (since, removed_in, instead)

        @functools.wraps(function)
        def warned(*args, **kwargs):
            warnings.warn(message, FutureWarning, stacklevel=2)
            return function(*args, **kwargs)

        notice = f"Deprecated since {since}, removed in {removed_in}: use {instead}."
        warned.__doc__ = f"{notice}\n\n{function.__doc__ or ''}"
        return warned  # type: ignore[return-value]

    return wrap


def version_tuple(version: str) -> tuple[int, ...]:
    """"0.2.0" -> (0, 2, 0): versions compared as numbers, not strings ("0.10" > "0.9")."""
    return tuple(int(part) for part in version.split(".") if part.isdigit())
