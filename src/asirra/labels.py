"""The label convention of the cat/dog task, and the one rule for "is this task binary".

Kaggle's submission says 1 = dog, so CAT = 0 and DOG = 1 everywhere: in file names, model outputs
(one logit z = logit P(dog)), figures and CSVs. Any other task's labels index its sorted class names
(`asirra.data.class_names`). Nothing here imports anything: every layer may use it.
"""

from __future__ import annotations

from typing import Sequence

CAT: int = 0
"""The label of cats in the cat/dog task (Kaggle's submissions say 0 = cat)."""
DOG: int = 1
"""The label of dogs in the cat/dog task (1 = dog)."""
CLASS_NAMES: tuple[str, ...] = ("cat", "dog")
"""The class names of the cat/dog task in label order: column i of `predict_proba` is class i."""


def is_binary(classes: Sequence[str]) -> bool:
    """Two classes: one logit, P(class 1) = sigmoid(z / T), binary cross-entropy, AUC and ROC in reports.

    The one rule training, evaluation, prediction and cross-validation use; N >= 3 classes get N logits
    and a softmax.
    """
    return len(classes) == 2


def is_cat_dog(classes: Sequence[str]) -> bool:
    """The cat/dog task itself (classes exactly ("cat", "dog")): CAPTCHA figures and Kaggle submissions."""
    return tuple(str(c) for c in classes) == CLASS_NAMES
