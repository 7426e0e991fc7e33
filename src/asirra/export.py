"""ONNX export and the ONNX Runtime session that runs it.

On 2 CPU cores ONNX Runtime runs EfficientNet-Lite several times faster than eager PyTorch
(fused conv+BN+ReLU6, tuned depthwise kernels), so it serves inference and the frozen part of
the backbone during transfer learning. Exports use the dynamo exporter: the legacy TorchScript
exporter mistranslates the asymmetric "same" padding of these weights.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asirra.errors import DataError, ModelError
from asirra.fileio import atomic_path, write_text_atomic


def export_onnx(module: nn.Module, path: Path, image_size: int, output_name: str = "out") -> Path:
    """Export `module` (float pixels (N, 3, S, S) in [0, 255] -> anything) with a dynamic batch size."""
    module = module.eval().float().to(memory_format=torch.contiguous_format)
    example = torch.rand(2, 3, image_size, image_size) * 255
    batch = torch.export.Dim("batch", min=1, max=4096)
    with atomic_path(Path(path)) as tmp, warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(module, (example,), input_names=["pixels"], output_names=[output_name],
                                    dynamic_shapes={"x": {0: batch}}, dynamo=True, external_data=False)
        program.save(str(tmp))
    return Path(path)


ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


def export_beside_weights(module: nn.Module, folder: Path, image_size: int) -> Path:
    """model.onnx next to model.safetensors, with the weights' fingerprint so a stale file is never used.

    The output is the network's: (n,) logits for a two-class model, (n, N) for N classes.
    """
    path = export_onnx(module, Path(folder) / ONNX_FILES["onnx"], image_size, output_name="logit")
    _stamp(module, path)
    return path


def quantize_beside_weights(module: nn.Module, folder: Path, calibration: np.ndarray) -> Path:
    """model.int8.onnx: weights int8 per channel, activations uint8 with ranges measured on `calibration`.

    Static quantization (QDQ) of the fp32 export. The Lite networks were designed for it (ReLU6,
    no squeeze-excite): on AVX-512 VNNI cores it runs ~2x faster at the same validation accuracy
    (docs/results/performance.md). CPUs without VNNI need exact kernels to compute what this file says (asirra.cpu,
    onnx_session).
    `calibration` is uint8 pixels (N, S, S, 3) of typical images; a few hundred suffice.
    """
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32 = onnx_beside_weights(module, folder) or export_beside_weights(module, folder, calibration.shape[1])

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.starts = iter(range(0, len(calibration), 16))

        def get_next(self):
            start = next(self.starts, None)
            if start is None:
                return None
            x = calibration[start : start + 16].transpose(0, 3, 1, 2)
            return {"pixels": np.ascontiguousarray(x, dtype=np.float32)}

    path = Path(folder) / ONNX_FILES["onnx-int8"]
    with tempfile.TemporaryDirectory() as scratch, atomic_path(path) as tmp, _quiet():
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        quantize_static(str(prepared), str(tmp), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    _stamp(module, path)
    return path


@contextmanager
def _quiet():
    """Silence the quantizer, which warns and logs about every node it leaves in float."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def calibration_pixels(folder: Path, image_size: int, n: int = 256, seed: int = 0) -> np.ndarray:
    """A seeded sample of n readable images under `folder` as uint8 pixels; unreadable ones are skipped."""
    from asirra.data import scan
    from asirra.images import UnusableImage, read_pixels

    refs = scan(folder)
    pixels = []
    for i in np.random.default_rng(seed).permutation(len(refs)):
        try:
            pixels.append(read_pixels(refs[i].read_bytes(), image_size))
        except (OSError, UnusableImage):
            continue
        if len(pixels) == n:
            break
    if not pixels:
        raise DataError(f"no readable images in {folder} to calibrate int8 with")
    return np.stack(pixels)


def _stamp(module: nn.Module, path: Path) -> None:
    write_text_atomic(Path(f"{path}.weights"), state_fingerprint(module))


def onnx_beside_weights(module: nn.Module, folder: Path | None, backend: str = "onnx") -> Path | None:
    """The exported ONNX file for `backend` in `folder` if it was made from exactly these weights."""
    if folder is None:
        return None
    path = Path(folder) / ONNX_FILES[backend]
    stamp = Path(f"{path}.weights")
    fresh = path.exists() and stamp.exists() and stamp.read_text().strip() == state_fingerprint(module)
    return path if fresh else None


def onnx_session(path: Path, threads: int | None = None, spinning: bool = False, kernels=None):
    """An ONNX Runtime session on the CPU; `kernels` (asirra.cpu.KernelChoice) says whether int8 graphs run on
    exact uint8 x uint8 kernels, by default this machine's choice (`asirra.cpu.int8_kernels`)."""
    import onnxruntime as ort

    from asirra.cpu import int8_kernels

    kernels = kernels or int8_kernels()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep rather than spin: faster on 2 busy cores (benchmarks/README.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if kernels.exact:
        # CPUs without VNNI saturate uint8 x int8 pair sums: exact kernels there (asirra.cpu says why and where).
        # fp32 graphs have no quantized nodes for the option to touch.
        options.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> the model's output, batch-first."""
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def state_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights and structure: the key for anything derived from them.

    The structure (its repr: layers, paddings) counts because two networks with equal weights but
    different padding give different outputs.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(repr(module).encode())
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def package_model(model_path: Path, dest: Path, calibration: np.ndarray | None = None) -> Path:
    """Install a trained model as the package's default: fp16 weights, config, validation split, model card,
    and with `calibration` pixels its int8 export, made from the fp16 weights as they will be served."""
    import json
    import shutil

    from asirra.fileio import write_json_atomic, write_text_atomic
    from asirra.labels import CLASS_NAMES
    from asirra.models import load_model, pretrained_sources, resolve_model_folder, save_model

    folder = resolve_model_folder(model_path)
    if folder.resolve() == Path(dest).resolve():
        raise ModelError(f"{folder} is already the packaged model; pass the run folder it came from")
    net, config = load_model(folder)
    if tuple(config.classes) != CLASS_NAMES:
        # The default model answers the CAPTCHA (asirra.solve, the demo, the attack): it must be the cat/dog one.
        raise ModelError(f"only a cat/dog model can be the package's default; {folder} has classes "
                         f"{', '.join(map(str, config.classes))}")
    stale_files = ["split.json", "curves.png", "MODEL_CARD.md"] + [f"{f}{x}" for f in ONNX_FILES.values() for x in ("", ".weights")]
    for stale in stale_files:
        (Path(dest) / stale).unlink(missing_ok=True)  # nothing of the previous model may survive beside the new one
    save_model(net, config, dest, half=True)
    run = folder.parent
    if (run / "split.json").exists():
        # Only the validation keys: evaluations of the default model can then exclude its training images.
        split = json.loads((run / "split.json").read_text())
        write_json_atomic(dest / "split.json", {"val": split["val"]})
    for name in ("curves.png",):
        if (run / name).exists():
            with atomic_path(dest / name) as tmp:
                shutil.copyfile(run / name, tmp)
    int8_note = None
    if calibration is not None:
        quantize_beside_weights(load_model(dest)[0], dest, calibration)
        int8_note = f"static int8, activation ranges from {len(calibration)} calibration images"
    write_text_atomic(dest / "MODEL_CARD.md", model_card(config, run, pretrained_sources(net), int8_note))
    return dest


def model_card(config, run: Path, weights_source: str, int8_note: str | None = None) -> str:
    import json

    extra = config.extra or {}
    train_config = extra.get("train_config", {})
    val = extra.get("val", {})
    timings = json.loads((run / "timings.json").read_text()) if (run / "timings.json").exists() else {}
    env = json.loads((run / "env.json").read_text()) if (run / "env.json").exists() else {}
    lines = [
        f"# Model card: {config.name} (the default asirra model)",
        "",
        f"- **Architecture**: {config.name}, {config.image_size} px input, one logit z = logit P(dog); "
        f"P(dog) = sigmoid(z / T) with temperature T = {config.temperature:.4f} fitted on the validation split.",
        f"- **Pretrained weights**: {weights_source}.",
        f"- **Data**: `{train_config.get('data')}` (Kaggle Dogs vs. Cats photos, Asirra/Petfinder; research use), "
        f"stratified split with {train_config.get('val_fraction')} held out for validation, seed {train_config.get('seed')}. "
        "`split.json` lists the content hashes of the validation images.",
        f"- **Training**: strategy `{train_config.get('strategy')}`"
        + (f", top {train_config.get('unfreeze')} blocks unfrozen" if train_config.get("strategy") == "finetune" else "")
        + f", {train_config.get('views')} cached view(s) per image, epochs {train_config.get('epochs')}, lr {train_config.get('lr')}, "
        f"schedule {train_config.get('schedule')}, weight decay {train_config.get('weight_decay')}, "
        f"label smoothing {train_config.get('label_smoothing')}.",
        "- **Command**: `make model`",
        f"- **Validation** ({val.get('n')} images, {'mean of image and mirror' if config.tta else 'single view, as served'}): accuracy {val.get('accuracy', float('nan')):.4f}, "
        f"log loss {val.get('log_loss', float('nan')):.4f} (uncalibrated {extra.get('val_log_loss_uncalibrated', float('nan')):.4f}), "
        f"AUC {val.get('auc', float('nan')):.5f}.",
        f"- **Wall time**: {', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) or 'not recorded'}.",
        f"- **Trained**: {env.get('started', 'unknown')} with torch {env.get('torch')} on {env.get('threads')} threads.",
        "- **Stored**: fp16 safetensors + this JSON config, never pickled"
        + (f"; `model.int8.onnx` beside them ({int8_note})" if int8_note else "")
        + ". ONNX files are stamped with the fingerprint of the weights they came from; the fp32 one is "
        "exported into the cache on first use.",
        "- **Limits**: trained on Kaggle's pet photos; other sources (studio shots, drawings, unusual breeds) may score lower. "
        "Labels in the Kaggle data are sometimes wrong, which caps measured accuracy.",
        "",
    ]
    return "\n".join(lines)


@dataclass
class ExportReport:
    """What `asirra export` wrote: files by kind ("onnx", "onnx-int8", "default model"), and the int8 calibration."""

    files: dict[str, Path]
    calibration_images: int | None = None

    def summary_lines(self) -> list[str]:
        note = f" (calibrated on {self.calibration_images} images)" if self.calibration_images else ""
        return [f"{kind} -> {path}" + (note if kind != "onnx" else "") for kind, path in self.files.items()]


def export_model(model: str | Path | None = None, *, onnx: bool = True, int8: bool = False,
                 calibration: str | Path | None = None, package: bool = False, image_size: int | None = None,
                 out: str | Path | None = None) -> ExportReport:
    """`asirra export`: the ONNX files of a model folder (the shipped model when None), or with `package`
    the model installed as the package's default (with `int8`, its int8 export too), or with `image_size`
    a copy of the model in `out` that reads images at that size (same weights and temperature; its exports,
    int8 calibrated at that size, beside it): e.g. EfficientNet-Lite2 at its native 260 px instead of 300,
    ~1.4x faster per challenge for some accuracy (benchmarks/solve_options.py measures both)."""
    import dataclasses

    from asirra.errors import ConfigError
    from asirra.models import (
        DEFAULT_MODEL_DIR,
        class_option,
        create_model,
        default_model_path,
        load_model,
        resolve_model_folder,
        save_model,
    )

    if int8 and calibration is None:
        raise ConfigError("--int8 needs --calibration: a folder of typical images (a few hundred are sampled)")
    if (image_size is None) != (out is None):
        raise ConfigError("--image-size and --out go together: the copy at another size needs a folder of its own")
    if image_size is not None and (package or image_size < 32):
        raise ConfigError("--image-size makes a copy in --out (at least 32 px); it cannot be --package'd at once")
    folder = resolve_model_folder(model) if model else default_model_path()
    net, config = load_model(folder)
    if image_size is not None:
        if Path(out).resolve() == folder.resolve():
            raise ConfigError(f"--out {out} is the model's own folder; choose a new one")
        config = dataclasses.replace(config, image_size=image_size)
        resized = create_model(config.name, pretrained=False, image_size=image_size,
                               **{**config.options, **class_option(len(config.classes))})
        try:  # a network whose head depends on the input size (seed-cnn's dense layer) cannot read another size
            resized.load_state_dict(net.state_dict())
        except RuntimeError:
            raise ConfigError(f"{config.name}'s weights only fit its own input size; --image-size needs a network "
                              "that pools globally (the EfficientNet-Lite ones)") from None
        folder = save_model(resized.eval(), config, Path(out))
        net = resized.eval()
    # Read before anything is written: a bad calibration folder must not leave a half-made export.
    pixels = calibration_pixels(Path(calibration), config.image_size) if int8 else None
    report = ExportReport({}, None if pixels is None else len(pixels))
    if package:
        report.files["default model"] = package_model(folder, DEFAULT_MODEL_DIR, calibration=pixels)
        return report
    if onnx:
        report.files["onnx"] = export_beside_weights(net, folder, config.image_size)
    if pixels is not None:
        report.files["onnx-int8"] = quantize_beside_weights(net, folder, pixels)
    return report
