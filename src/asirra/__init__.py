"""asirra: train cat-vs-dog CNNs and use them to measure, attack and defend Asirra-style CAPTCHAs."""

import functools
import os

# OpenMP threads that sleep when idle instead of spinning: on a 2-core machine shared with data
# loading, a server or other jobs, spinning threads steal the cores doing work (measured 1.9x
# faster training under load; see benchmarks/README.md). Set before torch loads, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

CAT, DOG = 0, 1
CLASS_NAMES = ("cat", "dog")


def solve(images, model=None, backend: str = "onnx"):
    """Which of the given challenge images are cats: a list of bools, one per image.

    `images` are paths, bytes or PIL images. An unreadable image raises UnusableImage naming it.
    backend="onnx-int8" runs the shipped model's int8 export: about twice as fast, with the same
    validation accuracy (README figures).
    """
    return _classifier(None if model is None else str(model), backend).solve(images)


@functools.lru_cache(maxsize=4)
def _classifier(model, backend):
    # Loading verifies the weights and opens an ONNX session (~1 s): once per model, not per call.
    from asirra.predict import load_classifier

    return load_classifier(model, backend=backend)


__all__ = ["CAT", "DOG", "CLASS_NAMES", "solve", "__version__"]
