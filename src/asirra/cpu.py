"""What this CPU can do, and which int8 kernels ONNX Runtime should run on it.

ONNX Runtime multiplies uint8 activations by int8 weights with one of two kinds of x86 kernels:
- with VNNI (`vpdpbusd`, AVX-512 VNNI or AVX-VNNI) or AMX, products accumulate in 32 bits: exact;
- without it (SSE4.1, AVX2, AVX-512 without VNNI) with `vpmaddubsw`, whose 16-bit pair sums saturate:
  the int8 Lite networks then drift far from their QDQ graph (logit correlation 0.77 on a test model).
`session.x64quantprecision = 1` makes ONNX Runtime rewrite int8 weights to uint8 and run exact
uint8 x uint8 kernels instead. Current ONNX Runtime (1.32 here) reports "may overflow" on every AVX2
CPU, VNNI ones included, so the option no longer leaves VNNI CPUs alone: there it costs ~2x
(benchmarks/README.md) for bit-identical outputs. So we ask for exact kernels only where the CPU
lacks VNNI, decided here from the CPU's flags (`choose_int8_kernels`, pure and tested), confirmed
once per process by a 1 KB canary network whose exact answer a saturating kernel cannot give, and
overridable by the operator (ASIRRA_INT8_KERNELS=exact|fast).

Imports nothing heavy: onnx and onnxruntime only inside the canary.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from asirra.errors import ConfigError

log = logging.getLogger(__name__)

OVERRIDE_ENV = "ASIRRA_INT8_KERNELS"  # auto (default) | exact | fast: the operator's word beats the flags
OVERRIDES = ("auto", "exact", "fast")
EXACT = "exact-u8u8"  # the kernel path name when ONNX Runtime is asked for exact uint8 x uint8 kernels
X86 = ("x86_64", "amd64", "i386", "i686", "x86")
# The flags that decide, and those worth recording beside a benchmark figure (Linux /proc/cpuinfo names).
FLAGS_OF_NOTE = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8", "amx_bf16")
# numpy's runtime-dispatch names for the same features (it has none for AVX-VNNI or AMX).
NUMPY_FLAGS = {"AVX2": "avx2", "AVX512F": "avx512f", "AVX512BW": "avx512bw", "AVX512VL": "avx512vl",
               "AVX512VNNI": "avx512_vnni", "AVX512BF16": "avx512_bf16"}


@dataclass(frozen=True)
class KernelChoice:
    """Which int8 kernels to ask ONNX Runtime for, and why."""

    exact: bool  # set session.x64quantprecision = 1
    path: str  # the kernels that run: "avx512-vnni" | "avx-vnni" | "amx" | "exact-u8u8" | "u8s8-saturating" | "native"
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def choose_int8_kernels(flags: frozenset[str] | None, machine: str, override: str = "auto") -> KernelChoice:
    """The decision, from the CPU's flags (lower-case /proc/cpuinfo names; None if unknown) and architecture."""
    override = override.strip().lower() or "auto"
    if override not in OVERRIDES:
        raise ConfigError(f"{OVERRIDE_ENV}={override!r}: choose one of {', '.join(OVERRIDES)}")
    if machine.lower() not in X86:
        # The option is x86-only in ONNX Runtime; ARM's int8 kernels are its own business.
        return KernelChoice(False, "native", f"{machine}: not x86, the option does not apply")
    fast_path = _fast_path(flags or frozenset())
    if override == "exact":
        return KernelChoice(True, EXACT, f"{OVERRIDE_ENV}=exact")
    if override == "fast":
        return KernelChoice(False, fast_path or "u8s8-saturating", f"{OVERRIDE_ENV}=fast")
    if flags is None:
        return KernelChoice(True, EXACT, "cpu flags unknown: exact kernels are safe everywhere")
    if fast_path is None:
        return KernelChoice(True, EXACT, "no VNNI or AMX in the cpu flags: fast u8 x s8 kernels would saturate")
    return KernelChoice(False, fast_path, f"cpu flags: {fast_path.replace('-', '_')} (32-bit accumulation)")


def _fast_path(flags: frozenset[str]) -> str | None:
    """The non-saturating u8 x s8 kernel family the flags allow, best first, or None."""
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if {"avx512_vnni", "avx512bw", "avx512vl"} <= flags:  # MLAS uses VNNI inside its AVX-512 core branch only
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    return None


# ---- reading the flags ---------------------------------------------------------------------------


def parse_cpuinfo(text: str) -> dict:
    """The first processor's model name and flags in a /proc/cpuinfo text (flags None if it has none)."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = frozenset(value.lower().split())
        if model is not None and flags is not None:
            break
    return {"model": model, "flags": flags}


def numpy_cpu_flags() -> frozenset[str] | None:
    """x86 features as numpy's own runtime dispatch found them (CPUID + XGETBV), in /proc/cpuinfo names."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features  # numpy 2; private, so guarded
    except ImportError:
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as features  # numpy 1.x
        except ImportError:
            return None
    return frozenset(name for key, name in NUMPY_FLAGS.items() if features.get(key))


def _macos_flags() -> frozenset[str] | None:
    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.features", "machdep.cpu.leaf7_features"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = set(out.lower().split())
    names = {"avx2": "avx2", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
             "avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "amx_tile": "amx_tile", "amx_int8": "amx_int8"}
    return frozenset(name for word, name in names.items() if word in words) if words else None


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """This CPU: {"model", "machine", "cores", "flags" (frozenset or None), "flags_source"}.

    Linux: /proc/cpuinfo, which lists what the kernel (and any hypervisor) lets this machine execute;
    macOS: sysctl; elsewhere numpy's runtime dispatch table, which knows AVX-512 VNNI but not AVX-VNNI or AMX.
    """
    info = {"model": platform.processor() or None, "flags": None, "flags_source": None}
    path = Path(cpuinfo)
    if path.exists():
        info.update(parse_cpuinfo(path.read_text(errors="replace")), flags_source=str(path))
    elif sys.platform == "darwin":
        info.update(flags=_macos_flags(), flags_source="sysctl")
    if info["flags"] is None:
        info.update(flags=numpy_cpu_flags(), flags_source="numpy")
    return {**info, "machine": platform.machine(), "cores": os.cpu_count()}


def describe_cpu() -> dict:
    """What a benchmark records beside its figures: the CPU model, cores, and the flags that matter."""
    info = cpu_info()
    flags = info["flags"]
    return {"model": info["model"], "machine": info["machine"], "cores": info["cores"],
            "flags": None if flags is None else [f for f in FLAGS_OF_NOTE if f in flags],
            "int8_kernels": int8_kernels().to_dict()}


# ---- the canary: does a fast kernel on this machine compute exactly? -----------------------------

CANARY_K = 64  # 32 pairs of 255 * 127: each pair overflows 16 bits, the 32-bit sum does not


def canary_exact(exact_kernels: bool = False) -> bool:
    """Run a 1 KB MatMulInteger network (uint8 255s x int8 127s, K = 64) and check its answer is exact.

    Exact kernels give 255 * 127 * 64 = 2,072,640; saturating `vpmaddubsw` pairs give 32,767 * 32 =
    1,048,544. Costs a few milliseconds, once per process.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    m, n = 8, 16
    weights = numpy_helper.from_array(np.full((CANARY_K, n), 127, np.int8), "B")
    graph = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "canary",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, [m, CANARY_K])],
                              [helper.make_tensor_value_info("Y", TensorProto.INT32, [m, n])], initializer=[weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    if exact_kernels:
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    result = session.run(None, {"A": np.full((m, CANARY_K), 255, np.uint8)})[0]
    return bool((result == 255 * 127 * CANARY_K).all())


@functools.cache
def int8_kernels() -> KernelChoice:
    """This process's choice: the flags decide, the operator may override, the canary confirms a fast path."""
    info = cpu_info()
    choice = choose_int8_kernels(info["flags"], info["machine"], os.environ.get(OVERRIDE_ENV, "auto"))
    if choice.exact or choice.reason.startswith(OVERRIDE_ENV) or info["machine"].lower() not in X86:
        return choice
    if not canary_exact():
        log.warning(f"the cpu flags allow fast int8 kernels ({choice.path}) but they saturate on this machine; "
                    "using exact kernels")
        return KernelChoice(True, EXACT, f"{choice.reason}, but the canary saturated")
    return KernelChoice(False, choice.path, f"{choice.reason}; canary exact")
