"""What a training run is made of, as plain data: the one home of every training default.

This module imports nothing from the package but its errors, so anything (the CLI, the tuner, a
test) can read a default or build a config without pulling in torch. The CLI's options take their defaults from
here; a config saved in a run folder (config.json) rebuilds with `TrainConfig.from_dict`.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path

from asirra.errors import ConfigError


class Strategy(str, Enum):
    scratch = "scratch"  # every weight trains, on augmented pixels
    linear = "linear"  # a frozen ImageNet backbone; only the head trains (on cached features)
    finetune = "finetune"  # the top --unfreeze blocks and the head train (on cached activations below them)


class Schedule(str, Enum):
    plateau = "plateau"  # Keras' ReduceLROnPlateau on validation accuracy
    cosine = "cosine"
    onecycle = "onecycle"


# adamw: decoupled weight decay; sgd: momentum 0.9, weight_decay as classic L2; rmsprop: Keras' rho 0.9.
OPTIMIZERS = ("adamw", "sgd", "rmsprop")


@dataclass
class AugmentConfig:
    """The random changes made to each training image (Keras' ImageDataGenerator settings of the notebook)."""

    rotation_deg: float = 15.0
    shear: float = 0.1  # shear angle in radians (Keras' shear_range of 0.1 is in degrees; the notebook meant visible shear)
    zoom: float = 0.2  # scale drawn from [1 - zoom, 1 + zoom]
    shift: float = 0.1  # fraction of width / height
    hflip: bool = True


@dataclass
class TrainConfig:
    """Every setting of a training run: what `asirra.train` and `asirra train` take, and what a run's
    `config.json` holds (`TrainConfig.from_dict` rebuilds it; `asirra.train(config=...)` reruns it).

    Settings are checked when the config is made, so a bad one fails in a second, before any image
    is decoded. The defaults are the notebook's seed-cnn recipe; every command-line default is read
    from here.

    Examples:
        >>> config = asirra.TrainConfig(data="data/dogs-vs-cats/train", out="runs/probe", model="effnet-lite2",
        ...                             strategy="linear", views=1, epochs=30, schedule="cosine")
        >>> run = asirra.train(config=config)
    """

    data: str
    """Labelled images: Kaggle's cat.N.jpg / dog.N.jpg, PetImages, or one folder per class."""
    out: str
    """The run folder."""
    model: str = "seed-cnn"
    """seed-cnn (the notebook's CNN, from scratch), effnet-lite0 or effnet-lite2 (ImageNet-pretrained)."""
    image_size: int | None = None
    """Input side in pixels; None is the model's own (128 for seed-cnn, 224 / 300 for Lite0 / Lite2)."""
    model_options: dict = field(default_factory=dict)
    """Architecture settings, e.g. seed-cnn's {"widths": [32, 64], "dense": 256}."""
    strategy: Strategy = Strategy.scratch
    """scratch (every weight trains), linear (a frozen backbone: only the head) or finetune (the top
    `unfreeze` blocks and the head)."""
    epochs: int = 30
    """The most epochs to train; early stopping may end sooner."""
    batch_size: int = 64
    """Images per step, over all processes of a data-parallel run."""
    lr: float = 1e-3
    """Learning rate (the head's, for transfer strategies)."""
    backbone_lr_scale: float = 0.1
    """finetune: the backbone learns at lr times this."""
    weight_decay: float = 0.0
    """L2 on the weights (AdamW's decoupled form; classic L2 for SGD)."""
    optimizer: str = "adamw"
    """adamw, sgd (momentum 0.9) or rmsprop (Keras' rho 0.9)."""
    label_smoothing: float = 0.0
    """Targets moved this far from 0 and 1 (in [0, 1))."""
    schedule: Schedule = Schedule.plateau
    """plateau (Keras' ReduceLROnPlateau on validation accuracy), cosine or onecycle."""
    val_fraction: float = 0.2
    """The stratified share of the images that validates (and chooses the kept epoch)."""
    seed: int = 0
    """Seeds the split, the subset, the initial weights and the augmentation."""
    patience: int = 10
    """Early stopping: epochs without a better validation loss."""
    lr_patience: int = 2
    """plateau: epochs without a better validation accuracy before the learning rate is cut."""
    lr_factor: float = 0.5
    """plateau: what each cut multiplies the learning rate by."""
    min_lr: float = 1e-5
    """plateau: the learning rate is never cut below this."""
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    """Random rotation, shear, zoom, shift and flip of training images; None for none."""
    unfreeze: int = 1
    """finetune: how many top blocks of the backbone train (all: 16 for lite0, 21 for lite2)."""
    views: int = 2
    """Transfer: cached views per image (the image, its mirror, then random augmentations)."""
    tta: bool = False
    """Validate (and later predict) on the mean of the image's and its mirror's logits."""
    limit: int | None = None
    """Train on a stratified subset of this many images (quick runs)."""
    channels_last: bool = True
    """Memory layout of seed-cnn's activations (faster convolutions on CPU)."""
    # Autocast matmuls and convs to bfloat16. None: only where the CPU has native bf16 (AVX-512-BF16,
    # AMX); elsewhere it is emulated and a seed-cnn step ran 6x slower than fp32 (an AVX2 EPYC).
    bf16: bool | None = None
    """Compute in bfloat16; None: only where the CPU does it natively."""
    compile: bool = False
    """torch.compile the network: a slow start, faster epochs."""
    workers: int = 2
    """Threads decoding images into the pixel cache."""
    cache_dir: str | None = None
    """Where decoded pixels and backbone activations are cached; None is $ASIRRA_CACHE or ~/.cache/asirra."""

    def __post_init__(self):
        # Fail in a second, before the data is decoded or the backbone runs, not after.
        # (The model name is checked against the registry by asirra.training, which knows it.)
        self.strategy = _choice(Strategy, self.strategy, "strategy")
        self.schedule = _choice(Schedule, self.schedule, "schedule")
        checks = [
            (0 < self.val_fraction < 1, f"val_fraction must be between 0 and 1, got {self.val_fraction}"),
            (not (self.tta and self.strategy != Strategy.scratch and self.views < 2),
             "--tta needs --views 2 or more (the mirror view)"),
            (self.epochs >= 1 and self.batch_size >= 2, "epochs must be >= 1 and batch size >= 2"),
            (0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.lr > 0 and self.weight_decay >= 0, "lr must be positive and weight_decay non-negative"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict:
        """The settings as JSON-ready values (enums as their strings): what `config.json` holds.

        Returns:
            A dict `TrainConfig.from_dict` turns back into this config.
        """
        d = asdict(self)
        d["strategy"], d["schedule"] = self.strategy.value, self.schedule.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Rebuild a config from `to_dict`'s output (a run's `config.json`).

        Args:
            d: The settings; an unknown key is refused in one line.

        Returns:
            The config, checked as any new one is.

        Raises:
            ConfigError: An unknown setting or a value that cannot work.
        """
        d = dict(d)
        d["augment"] = AugmentConfig(**d["augment"]) if d.get("augment") is not None else None
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d)


# Settings a resumed run may change: how long it trains and how fast, never what it trains on or how.
RESUMABLE_CHANGES = ("out", "epochs", "patience", "workers", "cache_dir", "compile")


def read_config_file(path: str | Path) -> dict:
    """The settings in a training config JSON (a run's config.json, `asirra tune`'s best_config.json)."""
    try:
        settings = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the training config {path} ({exc})") from None
    if not isinstance(settings, dict):
        raise ConfigError(f"{path} is not a training config (expected a JSON object)")
    return settings


def default(name: str, of=None):
    """The default of one field of TrainConfig, or of the dataclass or function `of` (a keyword's default):
    what the CLI shows and uses when an option is not given, read from the one place it is written."""
    import inspect

    target = of or TrainConfig
    if not isinstance(target, type):
        parameter = inspect.signature(target).parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise KeyError(f"{target.__qualname__} has no default for {name!r}")
        return parameter.default
    for f in fields(target):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise KeyError(f"{target.__name__}.{name} has no default")
    raise KeyError(f"{target.__name__} has no field {name!r}")


def _choice(enum: type[Enum], value, what: str):
    try:
        return enum(value.value if isinstance(value, Enum) else value)
    except ValueError:
        choices = ", ".join(member.value for member in enum)
        raise ConfigError(f"unknown {what} {value!r}; choose {choices}") from None


# ---- inference --------------------------------------------------------------------------------

BACKENDS = ("auto", "onnx", "onnx-int8", "torch")
# What every command and asirra.solve run unless told otherwise. "auto" is resolved per model by
# asirra.predict.resolve_backend: the int8 export when the model folder has one made from its
# weights (twice as fast; same validation accuracy: docs/results/classifiers.md), else fp32 ONNX.
DEFAULT_BACKEND = "auto"
