"""asirra: train CNNs to tell cats from dogs, then measure, attack and defend image CAPTCHAs with them.

The public API is `asirra.__all__` and `asirra.captcha.__all__`; every other module and name may
change in any release without notice. `import asirra` is light: PyTorch, ONNX Runtime and FastAPI
load on first use of a name that needs them.

Examples:
    >>> import asirra
    >>> model = asirra.load_model()  # the shipped EfficientNet-Lite2
    >>> model.predict_proba(["cat.jpg", "dog.jpg"])  # (2, 2): columns model.classes
    >>> run = asirra.train("data/dogs-vs-cats/train", model="seed-cnn", epochs=8, limit=3000)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that sleep when idle instead of spinning: on a 2-core machine shared with data
# loading, a server or other jobs, spinning threads steal the cores doing work (measured 1.9x
# faster training under load; see benchmarks/README.md). Set before torch loads, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asirra.config import TrainConfig  # noqa: E402  (imports nothing heavy; after the line above on purpose)
from asirra.errors import UserError  # noqa: E402
from asirra.labels import CAT, CLASS_NAMES, DOG  # noqa: E402

__version__: str = "0.2.0"
"""The version of asirra (the one place it is written; pyproject.toml reads it)."""

if TYPE_CHECKING:  # what type checkers and the API reference see; at run time __getattr__ loads them
    from asirra.api import (
        EvaluationResult,
        ExplainReport,
        TrainResult,
        attack,
        check_data,
        create_app,
        cross_validate,
        engine,
        evaluate,
        explain,
        harden,
        load_model,
        show_data,
        solve,
        train,
        tune,
    )
    from asirra.images import ImageSource
    from asirra.predict import Classifier

# Names that import torch (or FastAPI) when first used: loaded from asirra.api then.
_LAZY = ("Classifier", "EvaluationResult", "ExplainReport", "ImageSource", "TrainResult", "attack", "check_data",
         "create_app", "cross_validate", "engine", "evaluate", "explain", "harden", "load_model", "show_data",
         "solve", "train", "tune")

__all__ = ["__version__", "CAT", "DOG", "CLASS_NAMES", "ImageSource", "UserError", "TrainConfig", "Classifier",
           "load_model", "check_data", "show_data", "train", "TrainResult", "evaluate", "EvaluationResult",
           "cross_validate", "tune", "explain", "ExplainReport", "solve", "engine", "create_app", "attack", "harden"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from asirra import api

        value = getattr(api, name)
        globals()[name] = value  # once: later lookups never come here
        return value
    raise AttributeError(f"module 'asirra' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
