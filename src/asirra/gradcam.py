"""Grad-CAM (Selvaraju et al., 2017): where in the picture a network found the evidence for its answer.

A short hook-based implementation, not captum or pytorch-grad-cam. The whole method is a forward
hook and one `torch.autograd.grad` call (below); captum would add a dependency for those lines,
and pytorch-grad-cam pulls in OpenCV and ttach. Doing it by hand also lets the backward pass start
at the target layer: its output is detached and made the only tensor requiring grad, so nothing
below it builds a graph and the cost is one inference-like forward pass plus a backward through
the head alone (no gradient ever reaches the weights).

The networks here return one logit per image, z = logit P(dog). The map explains the PREDICTED
class: the dog logit z for a dog call, -z for a cat call, so a wrong answer is explained for
what the model saw rather than for the class it missed (pytorch-grad-cam issue #428). Because
the score is +-z, one backward pass of z gives both classes' maps: for the channel weights
w = spatial mean of dz/dA, the dog map is ReLU(sum_k w_k A_k) and the cat map ReLU(-sum_k w_k A_k).
The temperature divides z by a positive constant, so it changes neither the call nor the map.
A model with N >= 3 classes returns N logits; the map of class c is that of its logit z_c (the
pre-softmax score, as in the paper), one backward pass of sum_i z_i[c_i] for a batch.

Target layers (`target_layer`, the one place that knows them): seed-cnn's last conv block
(`features[-1]`, after its pooling), EfficientNet-Lite's top 1x1 conv block (`backbone.top`,
stride 32: a 10x10 map at 300 px). Pixels come from `images.read_pixels` at the model's size,
the preprocessing everything else uses.
"""

from __future__ import annotations

import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asirra.calibration import describe_row, predicted_index, probabilities
from asirra.errors import DataError, ModelError
from asirra.images import ImageSource, UnusableImage, read_file, read_pixels
from asirra.labels import CAT, CLASS_NAMES, DOG

COLORMAP = "turbo"
OVERLAY_ALPHA = 0.6  # the heat map's opacity where the map peaks; it fades to none where the map is 0
GRID_MAX = 48  # more images than this make an unreadable grid; per-image PNGs still cover every image
DISPLAY_MIN = 224  # overlays are drawn at least this large (seed-cnn sees 128 px)
BATCH = 8


def target_layer(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the layer Grad-CAM reads in this network: its last convolutional feature map."""
    from asirra.models import PretrainedClassifier, SeedCNN

    if isinstance(model, SeedCNN):
        return "features[-1]", model.features[-1]
    if isinstance(model, PretrainedClassifier):
        return "backbone.top", model.backbone.top
    raise ModelError(f"no Grad-CAM target layer is known for {type(model).__name__}")


# ---- the method -------------------------------------------------------------------------------


@dataclass
class CamResult:
    maps: np.ndarray  # (N, S, S) float32 in [0, 1], each image's map scaled to its own peak (all 0: no evidence)
    logits: np.ndarray  # raw, before temperature (averaged with the mirror under tta): (N,) logit P(dog), or (N, C)
    targets: np.ndarray  # (N,) the class index each map explains (CAT or DOG for the one-logit models)

    def peaks(self) -> list[tuple[int, int] | None]:
        """(row, col) of each map's maximum in input pixels; None for an all-zero map."""
        return [None if m.max() <= 0 else tuple(int(v) for v in np.unravel_index(np.argmax(m), m.shape))
                for m in self.maps]


@contextmanager
def _inference_setup(model: nn.Module) -> Iterator[None]:
    """Eval mode (batch norm uses its running statistics) and no weight gradients; restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _forward_keeping(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits with their graph above `layer`, the layer's output as the leaf the backward pass stops at).

    The forward hook swaps the layer's output for a detached copy that requires grad, so the
    gradient of the logits with respect to it is all autograd computes. Call under _inference_setup
    and enable_grad.
    """
    captured: list[torch.Tensor] = []

    def keep(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    handle = layer.register_forward_hook(keep)
    try:
        z = model(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"the target layer ran {len(captured)} times in one forward pass; expected once")
    return z, captured[0]


def _check_targets(targets, n: int, n_classes: int) -> np.ndarray:
    chosen = np.asarray(targets, dtype=np.int64).reshape(-1)
    if n_classes == 2 and (len(chosen) != n or not np.isin(chosen, (CAT, DOG)).all()):
        raise ValueError(f"targets must be {n} classes, each {CAT} (cat) or {DOG} (dog)")
    if len(chosen) != n or chosen.min(initial=0) < 0 or chosen.max(initial=0) >= n_classes:
        raise ValueError(f"targets must be {n} class indices, each 0..{n_classes - 1}")
    return chosen


def gradcam(model: nn.Module, pixels: np.ndarray, targets: Sequence[int] | None = None, tta: bool = False,
            layer: nn.Module | None = None) -> CamResult:
    """Grad-CAM maps of uint8 pixels (N, S, S, 3) for `targets` (default: each image's predicted class).

    With `tta` (as a model validated on image + mirror predicts), the logit and the weighted sum
    are averaged over the image and its mirror (flipped back), so the map explains the same
    averaged logit the classifier decides on; the predicted class is that of the averaged logits.
    """
    layer = layer if layer is not None else target_layer(model)[1]
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(0, 3, 1, 2).float()  # a copy: decoded pixels are read-only
    views = [x, torch.flip(x, dims=[3])] if tta else [x]
    with _inference_setup(model), torch.enable_grad():
        outputs = [_forward_keeping(model, layer, view) for view in views]
        z = (sum(out.detach() for out, _ in outputs) / len(outputs)).double().numpy()
        one_logit = z.ndim == 1
        n_classes = 2 if one_logit else z.shape[1]
        chosen = predicted_index(probabilities(z)) if targets is None else _check_targets(targets, len(x), n_classes)
        index = torch.from_numpy(chosen)[:, None]
        # One logit: the map of z, signed below per class. N logits: each image's target logit.
        # Images (and views) are independent in eval mode, so the gradient of the sum is each one's own.
        score = sum((out if one_logit else out.gather(1, index)).sum() for out, _ in outputs)
        grads = torch.autograd.grad(score, [leaf for _, leaf in outputs])
    cams = [(g.mean((2, 3), keepdim=True) * leaf.detach()).sum(1) for g, (_, leaf) in zip(grads, outputs)]
    cam = cams[0] if not tta else (cams[0] + torch.flip(cams[1], dims=[2])) / 2
    sign = torch.from_numpy(np.where(chosen == DOG, 1.0, -1.0) if one_logit else np.ones(len(chosen))).float()
    maps = F.relu(sign[:, None, None] * cam)  # ReLU at the layer's resolution, then upsample, as in the paper
    maps = F.interpolate(maps[:, None], size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = maps.amax((1, 2), keepdim=True)
    maps = torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))
    return CamResult(maps.numpy().astype(np.float32), z, chosen)


# ---- pictures ---------------------------------------------------------------------------------


def overlay(picture: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The heat map blended over a uint8 (H, W, 3) picture, opacity growing with the map's value."""
    import matplotlib
    from PIL import Image

    h, w = picture.shape[:2]
    if cam.shape != (h, w):
        cam = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((w, h), Image.Resampling.BILINEAR))
    cam = np.clip(cam, 0.0, 1.0)
    heat = matplotlib.colormaps[COLORMAP](cam)[..., :3] * 255.0
    a = (alpha * cam)[..., None]
    return np.clip(picture * (1 - a) + heat * a, 0, 255).astype(np.uint8)


def gradcam_overlays(model: nn.Module, image_size: int, sources: Sequence[ImageSource],
                     targets: Sequence[int] | None = None, tta: bool = False,
                     display_size: int | None = None) -> list[np.ndarray]:
    """Each image with its Grad-CAM overlay (uint8, display_size px, default the model's), for image grids.

    `targets` default to the predicted classes; an unreadable source raises UnusableImage.
    """
    display_size = display_size or image_size
    out: list[np.ndarray] = []
    for start in range(0, len(sources), BATCH):
        chunk = list(sources[start:start + BATCH])
        blobs = [_bytes_or_source(s) for s in chunk]
        result = gradcam(model, np.stack([read_pixels(b, image_size) for b in blobs]),
                         None if targets is None else list(targets[start:start + BATCH]), tta=tta)
        out += [overlay(read_pixels(b, display_size), m) for b, m in zip(blobs, result.maps)]
    return out


def _bytes_or_source(source: ImageSource):
    # A path is read once and decoded twice (model size, display size).
    return read_file(source) if isinstance(source, (str, Path)) else source


def plot_overlay(picture: np.ndarray, cam: np.ndarray, title: str, out: Path,
                 peak: tuple[int, int] | None = None) -> Path:
    """One explained image as a PNG: the overlay, the peak marked, a colour bar, `title` above."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from asirra.plots import save_figure

    fig = Figure(figsize=(4.6, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.imshow(overlay(picture, cam))
    if peak is not None:
        scale = picture.shape[0] / cam.shape[0]
        ax.plot((peak[1] + 0.5) * scale, (peak[0] + 0.5) * scale, "+", color="white", markersize=14, mew=2)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.colorbar(ScalarMappable(Normalize(0, 1), COLORMAP), ax=ax, fraction=0.046, label="Grad-CAM (of its peak)")
    return save_figure(fig, out)


# ---- the command: images in, PNGs + JSON out ----------------------------------------------------


@dataclass
class ExplainReport:
    """What `asirra.explain` drew: one record per image, the files written, and what Grad-CAM cost."""

    images: list[dict]
    """One record per explained image: name, source, file (its overlay PNG), predicted class and its
    probability, the explained class, the map's peak as fractions of the picture's width and height,
    and label / correct when the image is labelled."""
    skipped: list[dict]
    """Images that could not be read: {"path", "reason"}."""
    files: dict[str, Path] = field(default_factory=dict)
    """The files written: "grid" (the first 24 overlays) and "json" (explain.json)."""
    seconds_per_image: float | None = None
    """Grad-CAM's forward + backward per image, drawing excluded."""


def collect_refs(paths: Sequence[str | Path], limit: int | None = None, seed: int = 0,
                 classes: Sequence[str] | None = None) -> list:
    """ImageRefs for files and folders (or .zip) in order; `limit` keeps a random sample, order kept.

    With the model's `classes`, a labelled folder's labels are mapped to them by name (a class the
    model does not know leaves its images unlabelled: they are still explained, just not marked).
    """
    from asirra.data import ImageRef, align_labels, class_names, scan
    from asirra.errors import DataError

    refs = []
    for path in map(Path, paths):
        if path.is_dir() or path.suffix.lower() == ".zip":
            found = scan(path)
            refs += found if classes is None else align_labels(found, class_names(path), classes, strict=False)
        elif path.is_file():
            refs.append(ImageRef(source=str(path), label=None, id=path.stem))
        else:
            raise DataError(f"no such file or folder: {path}")
    if limit is not None and limit < len(refs):
        keep = np.sort(np.random.default_rng(seed).choice(len(refs), size=limit, replace=False))
        refs = [refs[i] for i in keep]
    return refs


def explain_refs(model: nn.Module, config, refs: Sequence, out_dir: Path, tta: bool | None = None,
                 progress: bool = True, clock=time.perf_counter, target_class: str | None = None) -> ExplainReport:
    """Grad-CAM of the predicted class (or of `target_class` for every image) for every readable ref:
    per-image PNGs, grid.png, explain.json.

    `config` is the model's asirra.models.ModelConfig (input size, temperature, tta, classes). Unreadable
    images are skipped and listed, never fatal.
    """
    from tqdm import tqdm

    from asirra.fileio import write_json_atomic
    from asirra.plots import plot_image_grid

    out_dir = Path(out_dir)
    tta = config.tta if tta is None else tta
    classes = tuple(str(c) for c in config.classes)
    if target_class is not None and target_class not in classes:
        raise ModelError(f"no class {target_class!r} to explain: the model's classes are {', '.join(classes)}")
    target = None if target_class is None else classes.index(target_class)
    layer_name, _ = target_layer(model)
    display = max(config.image_size, DISPLAY_MIN)
    items, skipped, thumbs, cam_seconds = [], [], [], 0.0
    bar = tqdm(total=len(refs), desc="Grad-CAM", unit="img", disable=not progress)
    for start in range(0, len(refs), BATCH):  # decoded batch by batch: a folder of any size fits in memory
        readable, unreadable = _decode(refs[start:start + BATCH], config.image_size)
        skipped += unreadable
        bar.update(len(readable) + len(unreadable))
        if not readable:
            continue
        started = clock()
        result = gradcam(model, np.stack([pixels for _, _, pixels in readable]), tta=tta,
                         targets=None if target is None else [target] * len(readable))
        cam_seconds += clock() - started
        proba = probabilities(result.logits, config.temperature)
        for (ref, blob, _), cam, row, explained, peak in zip(readable, result.maps, proba, result.targets,
                                                             result.peaks()):
            picture = read_pixels(blob, display)
            file = out_dir / _file_name(len(items), ref.name)
            title = f"{ref.name}: {describe_row(row, classes)}" + ("" if target is None else f" (map: {target_class})")
            plot_overlay(picture, cam, title, file, peak)
            items.append(_image_record(ref, row, classes, int(explained), peak, config.image_size, file))
            if len(thumbs) < GRID_MAX:
                thumbs.append(overlay(picture, cam))
    bar.close()
    if not items:
        raise DataError(f"none of the {len(refs)} images could be read"
                        + (f" (first: {skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""))
    seconds = cam_seconds / len(items)  # forward + backward, drawing excluded
    shown = items[:GRID_MAX]
    extra = f" (first {GRID_MAX} of {len(items)})" if len(items) > GRID_MAX else ""
    what = "the predicted class" if target is None else f"class {target_class!r}"
    files = {"grid": plot_image_grid(
        thumbs, [f"{i['name']}: {i['predicted']} {i['probability']:.2f}" for i in shown], out_dir / "grid.png",
        colors=[("red" if i.get("correct") is False else "black") for i in shown],
        title=f"Grad-CAM of {what}, {config.name}{extra}")}
    report = ExplainReport(items, skipped, files, seconds)
    score = "dog: +logit, cat: -logit" if len(classes) == 2 else "the class's logit"
    files["json"] = write_json_atomic(out_dir / "explain.json", {
        "model": config.name, "image_size": config.image_size, "temperature": config.temperature, "tta": tta,
        "classes": list(classes), "target_layer": layer_name, "method": f"Grad-CAM of {what} ({score})",
        "gradcam_seconds_per_image": seconds, "images": items, "skipped": skipped,
        "files": {k: str(v) for k, v in files.items()}})
    return report


def _decode(refs: Sequence, size: int) -> tuple[list[tuple], list[dict]]:
    """[(ref, bytes, pixels)] of the readable refs, and {"path", "reason"} of the others."""
    readable, skipped = [], []
    for ref in refs:
        try:
            blob = ref.read_bytes()
            readable.append((ref, blob, read_pixels(blob, size)))
        except UnusableImage as exc:
            skipped.append({"path": ref.source, "reason": exc.reason})
    return readable, skipped


def _image_record(ref, proba_row: np.ndarray, classes: tuple[str, ...], target: int, peak, size: int,
                  file: Path) -> dict:
    predicted = int(predicted_index(proba_row[None])[0])
    # The cat/dog model keeps its P(dog) field; other models list every class's probability.
    probs = {"p_dog": float(proba_row[DOG])} if classes == CLASS_NAMES else {
        "probabilities": {c: float(p) for c, p in zip(classes, proba_row)}}
    record = {
        "name": ref.name, "source": ref.source, "file": str(file),
        "predicted": classes[predicted], "probability": float(proba_row[predicted]),
        **probs, "explained_class": classes[target],
        # Fractions of the picture's width and height from its top-left corner: the model sees the whole
        # frame squashed to a square, so they hold for the original photo as well.
        "peak": None if peak is None else {"x": (peak[1] + 0.5) / size, "y": (peak[0] + 0.5) / size,
                                           "input_px": [peak[1], peak[0]]},
    }
    if ref.label is not None and ref.label < len(classes):  # model indices once collect_refs(classes=) aligned them
        record.update(label=classes[ref.label], correct=bool(ref.label == predicted))
    return record


def _file_name(index: int, name: str) -> str:
    # The position keeps names unique (two folders may both hold cat.1.jpg) and in input order.
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem) or "image"
    return f"{index:03d}_{stem}.png"


def summary_lines(report: ExplainReport) -> list[str]:
    """What `asirra explain` prints: one line per image, then the files."""
    lines = []
    for item in report.images:
        peak = item["peak"]
        where = "no positive evidence" if peak is None else f"peak at x={peak['x']:.2f}, y={peak['y']:.2f}"
        lines.append(f"{item['name']}: {item['predicted']} {item['probability']:.2f} ({where}) -> {item['file']}")
    lines += [f"{name}: {path}" for name, path in report.files.items()]
    if report.seconds_per_image is not None:
        lines.append(f"{len(report.images)} images explained, Grad-CAM {report.seconds_per_image:.2f} s per image")
    return lines


__all__ = ["CamResult", "ExplainReport", "collect_refs", "explain_refs", "gradcam", "gradcam_overlays", "overlay",
           "plot_overlay", "summary_lines", "target_layer"]
