"""ONNX export and the ONNX Runtime session that runs it.

On 2 CPU cores ONNX Runtime runs EfficientNet-Lite0 several times faster than eager PyTorch
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
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch
from torch import nn

from asirra.models import atomic_path


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


def onnx_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session, pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) -> the model's output, batch-first."""
    x = np.ascontiguousarray(pixels.transpose(0, 3, 1, 2), dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def state_fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights: the key for anything derived from them."""
    digest = hashlib.blake2b(digest_size=8)
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
