"""One Asirra challenge: twelve labelled pet photos, and how far a response is from its answer.

Asirra (Elson et al., 2007) shows 12 photos and asks the user to select every cat; a response
is judged only by which indices were selected, so an answer is just the set of cat indices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from asirra.errors import UserError
from asirra.labels import CAT

if TYPE_CHECKING:  # only for annotations: challenges need nothing from a ref but its label
    from asirra.data import ImageRef

CHALLENGE_SIZE = 12
SIMULATED_CHALLENGES = 10_000  # random challenges a simulation or an evaluation draws unless told


class ChallengeError(UserError):
    """A challenge cannot be drawn from the given pool."""


@dataclass(frozen=True)
class Challenge:
    refs: tuple[ImageRef, ...]

    @property
    def answer(self) -> frozenset[int]:
        """Indices of the cats: the one correct response."""
        return frozenset(i for i, ref in enumerate(self.refs) if ref.label == CAT)


def draw_indices(pool_size: int, rng: np.random.Generator, size: int = CHALLENGE_SIZE) -> np.ndarray:
    """`size` distinct positions in a pool of `pool_size`: the images shown in one challenge."""
    if size < 1:
        raise ChallengeError(f"a challenge needs at least 1 image, got size={size}")
    if pool_size < size:
        raise ChallengeError(f"a challenge needs {size} images but the pool holds only {pool_size}")
    return rng.choice(pool_size, size=size, replace=False)


def draw_challenge(pool: Sequence[ImageRef], rng: np.random.Generator, size: int = CHALLENGE_SIZE) -> Challenge:
    """A random challenge of `size` distinct images from a labelled pool."""
    unlabelled = sum(1 for ref in pool if ref.label is None)
    if unlabelled:
        raise ChallengeError(f"challenges need labelled images; {unlabelled} of {len(pool)} in the pool have no label")
    picks = draw_indices(len(pool), rng, size)
    return Challenge(refs=tuple(pool[int(i)] for i in picks))


def count_mistakes(selected: Iterable[int], answer: frozenset[int], size: int = CHALLENGE_SIZE) -> int:
    """Images the response got wrong: cats left unselected plus non-cats selected.

    Indices outside 0..size-1 are refused rather than counted, because they mean the client
    answered a different challenge (or is probing the server).
    """
    chosen = set()
    for index in selected:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise ChallengeError(f"a selected image must be an integer index, got {index!r}")
        if not 0 <= index < size:
            raise ChallengeError(f"selected index {index} is outside the challenge's 0..{size - 1}")
        chosen.add(int(index))
    return len(chosen ^ answer)
