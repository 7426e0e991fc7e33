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
    rotation_deg: float = 15.0
    shear: float = 0.1  # shear angle in radians (Keras' shear_range of 0.1 is in degrees; the notebook meant visible shear)
    zoom: float = 0.2  # scale drawn from [1 - zoom, 1 + zoom]
    shift: float = 0.1  # fraction of width / height
    hflip: bool = True


@dataclass
class TrainConfig:
    data: str
    out: str
    model: str = "seed-cnn"
    image_size: int | None = None  # input side in px; None: the model's registered size
    model_options: dict = field(default_factory=dict)  # architecture settings, e.g. seed-cnn {"widths": [32, 64], "dense": 256}
    strategy: Strategy = Strategy.scratch
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1  # finetune: backbone learns at lr * this
    weight_decay: float = 0.0  # L2 on the weights (AdamW's decoupled form)
    optimizer: str = "adamw"  # one of OPTIMIZERS
    label_smoothing: float = 0.0
    schedule: Schedule = Schedule.plateau
    val_fraction: float = 0.2
    seed: int = 0
    patience: int = 10  # early stopping on validation loss
    lr_patience: int = 2  # plateau of validation accuracy
    lr_factor: float = 0.5
    min_lr: float = 1e-5
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None: no augmentation
    unfreeze: int = 1  # finetune: how many top blocks of the backbone train (all: 16 for lite0, 21 for lite2)
    views: int = 2  # transfer: cached views per image (original, mirror, then random augmentations)
    tta: bool = False  # validate (and predict) on the mean of original and mirrored logits
    limit: int | None = None  # stratified subset of the data, for quick runs
    channels_last: bool = True
    # Autocast matmuls and convs to bfloat16. None: only where the CPU has native bf16 (AVX-512-BF16,
    # AMX); elsewhere it is emulated and a seed-cnn step ran 6x slower than fp32 (an AVX2 EPYC).
    bf16: bool | None = None
    compile: bool = False
    workers: int = 2
    cache_dir: str | None = None

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
        """JSON-ready: enums as their strings."""
        d = asdict(self)
        d["strategy"], d["schedule"] = self.strategy.value, self.schedule.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
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
# weights (twice as fast; same validation accuracy, README), else fp32 ONNX.
DEFAULT_BACKEND = "auto"
