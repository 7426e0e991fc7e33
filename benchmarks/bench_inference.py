"""Inference speed, ONNX Runtime (fp32 and int8) vs PyTorch, through asirra.predict's Classifier.

    python benchmarks/bench_inference.py [--data PATH] [--model M] [--challenges 30] [--images 500] [--json]

(a) CAPTCHA latency: `Classifier.solve` on 12 JPEG byte strings from test1, from bytes to answer
    (decode, resize, network), median and p90 over --challenges challenges, with the split between
    decoding (`Classifier.pixels`) and the network (`Classifier.logits`);
(b) batch throughput: `predict_refs` over --images test1 images (batches of 64, files read from disk);
(c) agreement: max |P_onnx(dog) - P_torch(dog)| over those images, and how often `solve` differs;
    the same for the int8 export against fp32 ONNX (skipped if the model has no `model.int8.onnx`);
(d) ONNX Runtime thread settings (all cores spinning, as asirra runs it; all cores without
    spinning; one thread) on the network alone, one challenge's pixels at a time;
(e) the int8 kernel paths (asirra.cpu): where this CPU gets the fast ones (VNNI, AMX), the int8 export
    also runs on the exact uint8 x uint8 kernels (`onnx-int8 exact`, what ASIRRA_INT8_KERNELS=exact and
    CPUs without VNNI run) in the same interleaved run, with whether their logits are identical; where
    it gets the exact ones, the fast ones saturate and are not timed.

Every row names its kernel path, and the CPU (model, cores, the flags that decide) heads the output;
`--json` prints it all as one object, with int8_vs_fp32_speedup and fast_vs_exact_speedup.

Backends take turns on the same inputs, so load from other processes hits both alike. --model
defaults to the model shipped in the package; any run or model folder works, and the speed does not
depend on the weights' values (a random head benchmarks as well as a trained one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from report import cpu_line, table  # benchmarks/report.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEST = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats" / "test1"
CHALLENGE_SIZE = 12


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def milliseconds(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - started) * 1000


def bench_challenges(classifiers: dict, challenges: list[list[bytes]]) -> list[dict]:
    for clf in classifiers.values():  # warm-up: first-call allocations, thread pools, ORT arenas
        for challenge in challenges[:2]:
            clf.solve(challenge)
    times = {name: {"solve": [], "decode": [], "network": []} for name in classifiers}
    for i, challenge in enumerate(challenges):
        order = list(classifiers) if i % 2 == 0 else list(classifiers)[::-1]
        for name in order:
            clf = classifiers[name]
            times[name]["solve"].append(milliseconds(clf.solve, challenge))
            started = time.perf_counter()
            pixels = clf.pixels(challenge)
            times[name]["decode"].append((time.perf_counter() - started) * 1000)
            times[name]["network"].append(milliseconds(clf.logits, pixels))
    return [{"backend": name, "kernels": classifiers[name].engine["kernels"],
             "median_ms": statistics.median(t["solve"]), "p90_ms": percentile(t["solve"], 90),
             "max_ms": max(t["solve"]), "decode_ms": statistics.median(t["decode"]),
             "network_ms": statistics.median(t["network"])} for name, t in times.items()]


def bench_throughput(classifiers: dict, refs: list, repeats: int) -> tuple[list[dict], dict]:
    from asirra.predict import predict_refs

    seconds = {name: [] for name in classifiers}
    predictions = {}
    for _ in range(repeats):
        for name, clf in classifiers.items():
            started = time.perf_counter()
            predictions[name] = predict_refs(clf, refs, progress=False)
            seconds[name].append(time.perf_counter() - started)
    rows = [{"backend": name, "images": len(predictions[name].p_dog), "seconds": statistics.median(s),
             "img_s": len(predictions[name].p_dog) / statistics.median(s)} for name, s in seconds.items()]
    return rows, predictions


ORT_SETTINGS = {  # name -> (intra-op threads, allow spinning); export.onnx_session uses all cores, no spinning
    "all cores, spinning": (0, True),
    "all cores, no spinning (asirra)": (0, False),
    "1 thread": (1, True),
}


def bench_ort_settings(clf, challenges: list[list[bytes]]) -> list[dict]:
    """The network alone on one challenge's pixels, per ONNX Runtime thread setting."""
    from asirra.export import onnx_session

    # The package's own session settings (exact int8 kernels on CPUs without VNNI included), per threading.
    sessions = {name: onnx_session(clf.onnx_path(), threads=threads or None, spinning=spinning)
                for name, (threads, spinning) in ORT_SETTINGS.items()}
    input_name = next(iter(sessions.values())).get_inputs()[0].name
    feeds = [{input_name: np.ascontiguousarray(clf.pixels(c).transpose(0, 3, 1, 2), dtype=np.float32)} for c in challenges]
    times = {name: [] for name in sessions}
    for feed in feeds[:2]:  # warm-up
        for session in sessions.values():
            session.run(None, feed)
    for feed in feeds:
        for name, session in sessions.items():
            times[name].append(milliseconds(session.run, None, feed))
    return [{"setting": name, "median_ms": statistics.median(t), "p90_ms": percentile(t, 90)} for name, t in times.items()]


def agreement(predictions: dict, a: str, b: str) -> dict:
    first, second = predictions[a], predictions[b]
    assert [r.source for r in first.refs] == [r.source for r in second.refs]
    diff = np.abs(first.p_dog - second.p_dog)
    return {"pair": f"{a} vs {b}", "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "answers_differ": int(((first.p_dog < 0.5) != (second.p_dog < 0.5)).sum()), "images": len(diff),
            "identical": "yes" if np.array_equal(first.logits, second.logits) else "no"}


def load_classifiers(model, kernels) -> tuple[dict, dict]:
    """name -> Classifier, and name -> seconds to load. `onnx-int8` runs this machine's kernel path; where that
    is a fast one, `onnx-int8 exact` runs the exact kernels too (where it is exact, fast ones would saturate)."""
    from asirra.cpu import EXACT, KernelChoice
    from asirra.predict import load_classifier

    variants = {"onnx-int8": ("onnx-int8", None)}
    if not kernels.exact:
        exact = KernelChoice(True, EXACT, "benchmark: the exact path beside the fast")
        variants["onnx-int8 exact"] = ("onnx-int8", exact)
    variants.update({"onnx": ("onnx", None), "torch": ("torch", None)})
    classifiers, load_s = {}, {}
    for name, (backend, choice) in variants.items():
        started = time.perf_counter()
        try:
            clf = load_classifier(model, backend=backend)
        except ValueError as exc:
            if backend == "onnx-int8":  # optional: only models exported with --int8 have it
                print(f"skipping {name}: {exc}", file=sys.stderr)
                continue
            sys.exit(f"error: {exc}")
        if choice is not None:
            from asirra.predict import Classifier

            clf = Classifier(clf.model, clf.config, backend=backend, folder=clf.folder, kernels=choice)
        classifiers[name] = clf
        load_s[name] = time.perf_counter() - started  # onnx: includes the export on first use
    return classifiers, load_s


def speedup(rows: list[dict], slow: str, fast: str, key: str) -> float | None:
    by_name = {row["backend"]: row for row in rows}
    return by_name[slow][key] / by_name[fast][key] if slow in by_name and fast in by_name else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_TEST), help="images: a folder such as Kaggle's test1, or a Kaggle root")
    parser.add_argument("--model", default=None, help="run or model folder; default: the package's model")
    parser.add_argument("--challenges", type=int, default=30)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2, help="passes of the throughput test per backend")
    parser.add_argument("--cache-dir", default="/tmp/asirra-bench-cache", help="where exported ONNX files go")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ["ASIRRA_CACHE"] = args.cache_dir  # before asirra reads it

    from asirra.cpu import describe_cpu, int8_kernels
    from asirra.data import scan
    from asirra.errors import DataError

    try:
        refs = scan(args.data, labelled=False)[: args.images]  # a Kaggle root gives its test1/
    except DataError as exc:
        sys.exit(f"error: {exc}")
    n_challenge = min(args.challenges, len(refs) // CHALLENGE_SIZE)
    challenges = [[refs[i * CHALLENGE_SIZE + j].read_bytes() for j in range(CHALLENGE_SIZE)] for i in range(n_challenge)]

    load_before = os.getloadavg()
    classifiers, load_s = load_classifiers(args.model, int8_kernels())
    latency = bench_challenges(classifiers, challenges)
    throughput, predictions = bench_throughput(classifiers, refs, args.repeats)
    pairs = [("onnx", "torch"), ("onnx-int8", "onnx"), ("onnx-int8 exact", "onnx"), ("onnx-int8", "onnx-int8 exact")]
    agree = [agreement(predictions, a, b) for a, b in pairs if a in predictions and b in predictions]
    ort_settings = bench_ort_settings(classifiers["onnx"], challenges)
    load_after = os.getloadavg()

    clf = classifiers["onnx"]
    kernels = int8_kernels()
    summary = {
        "cpu": describe_cpu(), "model": clf.name, "image_size": clf.image_size, "load_before": load_before,
        "load_after": load_after, "engines": {name: c.engine for name, c in classifiers.items()},
        "load_seconds": load_s, "latency": latency, "throughput": throughput, "agreement": agree,
        "ort_threads": ort_settings,
        "int8_vs_fp32_speedup": {"solve": speedup(latency, "onnx", "onnx-int8", "median_ms"),
                                 "network": speedup(latency, "onnx", "onnx-int8", "network_ms")},
        "fast_vs_exact_speedup": {"solve": speedup(latency, "onnx-int8 exact", "onnx-int8", "median_ms"),
                                  "network": speedup(latency, "onnx-int8 exact", "onnx-int8", "network_ms")},
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print("\n" + cpu_line(summary["cpu"], load_before, load_after))
    print(f"model {clf.name} ({args.model or 'package default'}), {clf.image_size} px")
    print("load_classifier: " + ", ".join(f"{b} {s:.1f} s" for b, s in load_s.items()) + " (onnx includes any export)")
    print(f"\n(a) one {CHALLENGE_SIZE}-image challenge, JPEG bytes -> answer, over {n_challenge} challenges\n")
    print(table(latency, [("backend", "backend", ""), ("kernels", "kernels", ""), ("median_ms", "median ms", ".1f"),
                          ("p90_ms", "p90 ms", ".1f"), ("max_ms", "max ms", ".1f"), ("decode_ms", "of which decode", ".1f"),
                          ("network_ms", "network", ".1f")]))
    print(f"\n(b) predict_refs throughput (median of {args.repeats})\n")
    print(table(throughput, [("backend", "backend", ""), ("images", "images", "d"), ("seconds", "seconds", ".1f"),
                             ("img_s", "img/s", ".1f")]))
    print(f"\n(c) agreement of P(dog) over {agree[0]['images']} images\n")
    print(table(agree, [("pair", "backends", ""), ("max_abs_diff", "max |dP|", ".2e"), ("mean_abs_diff", "mean |dP|", ".2e"),
                        ("answers_differ", "answers differ", "d"), ("identical", "logits identical", "")]))
    print(f"\n(d) ONNX Runtime threads: the network alone on one challenge ({n_challenge} challenges)\n")
    print(table(ort_settings, [("setting", "setting", ""), ("median_ms", "median ms", ".1f"), ("p90_ms", "p90 ms", ".1f")]))
    fast, int8 = summary["fast_vs_exact_speedup"], summary["int8_vs_fp32_speedup"]
    if fast["solve"]:
        print(f"\n(e) int8 kernels: fast ({kernels.path}) vs exact: {fast['solve']:.2f}x per challenge, "
              f"{fast['network']:.2f}x on the network")
    else:
        print(f"\n(e) int8 kernels: {kernels.path} on this CPU; fast kernels saturate here, not timed")
    if int8["solve"]:
        print(f"    int8 ({kernels.path}) vs fp32: {int8['solve']:.2f}x per challenge, "
              f"{int8['network']:.2f}x on the network")


if __name__ == "__main__":
    main()
