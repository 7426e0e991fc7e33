"""The int8 kernel path: exact uint8 x uint8 kernels exactly where the CPU would saturate fast ones.

The decision is a pure function of the CPU's flags (tested on flag sets of real CPUs of both kinds);
the flags are read from /proc/cpuinfo (or numpy's dispatch table); an operator can override; a 1 KB
canary confirms a fast path on the machine itself; and sessions ask ONNX Runtime for exact kernels iff
the choice says so.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_support import run_cli, save_spread_model

import asirra.cpu
from asirra.cpu import EXACT, KernelChoice, choose_int8_kernels, cpu_info, int8_kernels, numpy_cpu_flags, parse_cpuinfo
from asirra.errors import ConfigError
from asirra.export import onnx_session
from asirra.predict import load_classifier

AVX2 = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 fma bmi2"
CPUS = {  # abridged /proc/cpuinfo flag lines
    "epyc zen 3 (avx2 only)": (AVX2, EXACT),
    "skylake-sp (avx-512 without vnni)": (f"{AVX2} avx512f avx512bw avx512vl avx512dq avx512cd", EXACT),
    "cascade lake (avx-512 vnni)": (f"{AVX2} avx512f avx512bw avx512vl avx512_vnni", "avx512-vnni"),
    "alder lake (avx-vnni only)": (f"{AVX2} avx_vnni", "avx-vnni"),
    "epyc zen 5 (this session's machine)": (f"{AVX2} avx512f avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni",
                                           "avx512-vnni"),
    "sapphire rapids (amx)": (f"{AVX2} avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8 amx_bf16", "amx"),
    # VNNI without the AVX-512 BW/VL core it runs inside of in ONNX Runtime's dispatch: not used there.
    "avx512_vnni alone": (f"{AVX2} avx512f avx512_vnni", EXACT),
}


@pytest.mark.parametrize("cpu", CPUS)
def test_exact_kernels_exactly_where_fast_ones_would_saturate(cpu):
    flags, path = CPUS[cpu]
    choice = choose_int8_kernels(frozenset(flags.split()), "x86_64")
    assert choice.path == path
    assert choice.exact == (path == EXACT)


def test_unknown_flags_are_exact_and_other_architectures_are_left_alone():
    assert choose_int8_kernels(None, "x86_64") == KernelChoice(True, EXACT, choose_int8_kernels(None, "AMD64").reason)
    assert "unknown" in choose_int8_kernels(None, "x86_64").reason
    arm = choose_int8_kernels(frozenset({"asimd", "asimddp"}), "aarch64")
    assert not arm.exact and arm.path == "native"


def test_the_operator_overrides_the_flags_either_way():
    vnni, avx2 = frozenset(CPUS["cascade lake (avx-512 vnni)"][0].split()), frozenset(AVX2.split())
    assert choose_int8_kernels(vnni, "x86_64", "exact") == KernelChoice(True, EXACT, "ASIRRA_INT8_KERNELS=exact")
    forced = choose_int8_kernels(avx2, "x86_64", "fast")
    assert not forced.exact and forced.path == "u8s8-saturating"  # what runs is named for what it is
    assert choose_int8_kernels(vnni, "x86_64", " FAST ").path == "avx512-vnni"
    with pytest.raises(ConfigError, match="ASIRRA_INT8_KERNELS='quick': choose one of auto, exact, fast"):
        choose_int8_kernels(vnni, "x86_64", "quick")


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni
bugs\t\t: sysret_ss_attrs

processor\t: 1
model name\t: AMD EPYC 9B45
flags\t\t: fpu sse2
"""


def test_cpuinfo_gives_the_first_processors_model_and_flags(tmp_path):
    parsed = parse_cpuinfo(CPUINFO)
    assert parsed == {"model": "AMD EPYC 9B45", "flags": frozenset("fpu sse2 avx2 avx512f avx512bw avx512vl avx512_vnni".split())}
    assert parse_cpuinfo("processor : 0\n")["flags"] is None
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    info = cpu_info.__wrapped__(str(tmp_path / "cpuinfo"))
    assert info["flags_source"].endswith("cpuinfo") and "avx512_vnni" in info["flags"]


def test_numpy_names_its_features_as_cpuinfo_does(monkeypatch):
    flags = numpy_cpu_flags()
    assert flags is not None and flags <= set(asirra.cpu.NUMPY_FLAGS.values())
    # Where both sources exist (Linux x86) they agree on what numpy knows about.
    proc = cpu_info()["flags"]
    if proc is not None and "avx2" in proc:
        assert flags == proc & set(asirra.cpu.NUMPY_FLAGS.values())


def test_exact_kernels_pass_the_canary():
    # The canary's check itself: exact kernels compute 255 * 127 * 64 everywhere. (On a CPU without VNNI the
    # fast kernels give 1,048,544 instead; where the flags allow VNNI they must be exact: the test below.)
    assert asirra.cpu.canary_exact(exact_kernels=True)


def test_the_machines_choice_follows_its_flags_and_the_canary(monkeypatch):
    int8_kernels.cache_clear()
    monkeypatch.delenv("ASIRRA_INT8_KERNELS", raising=False)
    try:
        choice = int8_kernels()
        info = cpu_info()
        assert choice.exact == choose_int8_kernels(info["flags"], info["machine"]).exact or "canary" in choice.reason
        if not choice.exact and choice.path != "native":
            assert "canary exact" in choice.reason and asirra.cpu.canary_exact()
        int8_kernels.cache_clear()
        monkeypatch.setattr(asirra.cpu, "canary_exact", lambda exact_kernels=False: False)
        monkeypatch.setattr(asirra.cpu, "cpu_info", lambda: {**info, "machine": "x86_64",
                                                             "flags": frozenset({"avx512bw", "avx512vl", "avx512_vnni"})})
        saturated = int8_kernels()  # the flags say fast, the machine says otherwise: exact, and why
        assert saturated.exact and saturated.path == EXACT and "canary saturated" in saturated.reason
        int8_kernels.cache_clear()
        monkeypatch.setenv("ASIRRA_INT8_KERNELS", "exact")
        assert int8_kernels() == KernelChoice(True, EXACT, "ASIRRA_INT8_KERNELS=exact")
    finally:
        int8_kernels.cache_clear()


def _identity_model(path):
    import onnx
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None]) for name in ("pixels", "out")]
    graph = helper.make_graph([helper.make_node("Identity", ["pixels"], ["out"])], "identity", io[:1], io[1:])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _asks_for_exact(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.x64quantprecision") == "1"
    except RuntimeError:  # the entry was never set
        return False


def test_sessions_ask_for_exact_kernels_iff_the_choice_says_so(tmp_path, monkeypatch):
    model = _identity_model(tmp_path / "id.onnx")
    assert _asks_for_exact(onnx_session(model, threads=1, kernels=KernelChoice(True, EXACT, "test")))
    assert not _asks_for_exact(onnx_session(model, threads=1, kernels=KernelChoice(False, "avx512-vnni", "test")))
    # By default, the machine's choice.
    monkeypatch.setattr(asirra.cpu, "int8_kernels", lambda: KernelChoice(True, EXACT, "test"))
    assert _asks_for_exact(onnx_session(model, threads=1))
    monkeypatch.setattr(asirra.cpu, "int8_kernels", lambda: KernelChoice(False, "amx", "test"))
    assert not _asks_for_exact(onnx_session(model, threads=1))


def test_solve_and_predict_name_the_engine_and_kernel_path(tmp_path, make_image, isolated_cache):
    import asirra

    engine = asirra.engine()
    choice = int8_kernels()
    assert engine["backend"] == "onnx-int8" and engine["kernels"] == choice.path
    assert engine["exact_int8"] == choice.exact and engine["threads"] >= 1
    small = save_spread_model(tmp_path / "seed")
    assert load_classifier(small, backend="onnx").engine["kernels"] == "fp32"
    assert load_classifier(small, backend="torch").engine["kernels"] == "torch"

    image = make_image(tmp_path / "cat.jpg", size=(120, 100))
    out = json.loads(run_cli("predict", str(image), "--json").stdout)
    assert out["engine"] == engine and out["label"] in ("cat", "dog")
    assert np.isclose(sum(out["proba"].values()), 1.0)
    (tmp_path / "folder").mkdir()
    make_image(tmp_path / "folder" / "1.jpg", size=(120, 100))
    folder = json.loads(run_cli("predict", str(tmp_path / "folder"), "--out", str(tmp_path / "s.csv"), "--json").stdout)
    assert folder["predictions"] == 1 and folder["out"] == str(tmp_path / "s.csv") and folder["engine"] == engine
