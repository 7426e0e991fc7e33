"""asirra: train cat-vs-dog CNNs and use them to measure, attack and defend Asirra-style CAPTCHAs."""

import functools
import os

# OpenMP threads that sleep when idle instead of spinning: on a 2-core machine shared with data
# loading, a server or other jobs, spinning threads steal the cores doing work (measured 1.9x
# faster training under load; see benchmarks/README.md). Set before torch loads, which reads it once.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from asirra.config import DEFAULT_BACKEND  # noqa: E402  (imports nothing heavy; after the line above on purpose)
from asirra.labels import CAT, CLASS_NAMES, DOG  # noqa: E402

__version__ = "0.1.0"


def solve(images, model=None, backend: str = DEFAULT_BACKEND):
    """Which of the given challenge images are cats: a list of bools, one per image.

    `images` are paths, bytes or PIL images. An unreadable image raises UnusableImage naming it.
    The default backend runs the model's int8 export when it has one (the shipped model does):
    about twice as fast as fp32 with the same validation accuracy (README figures);
    backend="onnx" gives exact fp32 answers.
    """
    return _classifier(None if model is None else str(model), backend).solve(images)


def engine(model=None, backend: str = DEFAULT_BACKEND) -> dict:
    """What `solve(images, model, backend)` runs on: {"backend", "kernels", "threads", ...}.

    For the int8 backend, "kernels" is the int8 kernel path chosen for this CPU ("avx512-vnni", "avx-vnni",
    "amx": fast; "exact-u8u8" on CPUs without VNNI, or when ASIRRA_INT8_KERNELS=exact) and "reason" says why.
    """
    return _classifier(None if model is None else str(model), backend).engine


@functools.lru_cache(maxsize=4)
def _classifier(model, backend):
    # Loading verifies the weights and opens an ONNX session (~1 s): once per model, not per call.
    from asirra.predict import load_classifier

    return load_classifier(model, backend=backend)


__all__ = ["CAT", "DOG", "CLASS_NAMES", "engine", "solve", "__version__"]
