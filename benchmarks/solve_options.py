"""`asirra.solve` against a 50 ms budget: the shipped engine and what else would be faster, at what cost in accuracy.

    python benchmarks/solve_options.py [--data ROOT] [--challenges 30] [--val-limit N] [--json]

Engines, alternated on the same 12-photo challenges from test1 (as `asirra.solve` is called: JPEG bytes
to an answer), each with its median wall time, its CPU time per solve (what load from other processes
does not inflate) and its decode / network split:
- int8 at 300 px on this CPU's kernel path (the default: `asirra.solve(files)`),
- int8 at 300 px on the exact kernels (ASIRRA_INT8_KERNELS=exact; what CPUs without VNNI run),
- fp32 at 300 px (`backend="onnx"`),
- int8 at 260 px, EfficientNet-Lite2's native resolution: the shipped weights re-exported at 260 and
  re-calibrated on 256 test1 photos (as `make model` calibrates), no retraining: what
  `asirra export --image-size 260 --out FOLDER --int8 --calibration test1/` makes, for
  `asirra.solve(files, model=FOLDER)`,
- int8 at 300 px with one ONNX Runtime thread instead of all cores.
Accuracy: each engine's on the shipped model's validation images (src/asirra/weights/split.json: never
trained on), with Wilson 95% intervals, and the share of simulated 12-image challenges it passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from bench_inference import CHALLENGE_SIZE, percentile  # benchmarks/, beside this script
from report import cpu_line, table

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats"


def native_resolution_model(out: Path, size: int, calibration: Path) -> Path:
    """The shipped weights as a model folder for `size` px with its own int8 export, as
    `asirra export --image-size SIZE --out FOLDER --int8 --calibration test1/` makes it (made once, then reused)."""
    from asirra.export import export_model, onnx_beside_weights
    from asirra.models import load_model

    folder = out / f"lite2-{size}"
    if (folder / "model.json").exists():
        net, _ = load_model(folder)
        if onnx_beside_weights(net, folder, "onnx-int8") is not None:
            return folder
    export_model(None, int8=True, calibration=calibration, image_size=size, out=folder)
    return folder


def engines(folder_260: Path) -> dict:
    from asirra.cpu import EXACT, KernelChoice
    from asirra.predict import Classifier, load_classifier

    default = load_classifier(None)
    exact = Classifier(default.model, default.config, backend="onnx-int8", folder=default.folder,
                       kernels=KernelChoice(True, EXACT, "benchmark: exact kernels"))
    one_thread = load_classifier(None)
    from asirra.export import onnx_session

    one_thread._session = onnx_session(one_thread.onnx_path(), threads=1, kernels=one_thread.kernels)
    found = {"int8 300 px (default)": default, "int8 300 px, exact kernels": exact,
             "fp32 300 px": load_classifier(None, backend="onnx"), "int8 260 px": load_classifier(folder_260),
             "int8 300 px, 1 thread": one_thread}
    if default.kernels.exact:  # the default already is the exact path here
        del found["int8 300 px, exact kernels"]
    return found


def time_solves(classifiers: dict, challenges: list) -> list[dict]:
    for clf in classifiers.values():
        for challenge in challenges[:2]:
            clf.solve(challenge)
    times = {name: {"wall": [], "cpu": [], "decode": [], "network": []} for name in classifiers}
    for i, challenge in enumerate(challenges):
        for name in list(classifiers) if i % 2 == 0 else list(classifiers)[::-1]:
            clf, t = classifiers[name], times[name]
            wall, cpu = time.perf_counter(), time.process_time()
            clf.solve(challenge)
            t["wall"].append((time.perf_counter() - wall) * 1000)
            t["cpu"].append((time.process_time() - cpu) * 1000)
            started = time.perf_counter()
            pixels = clf.pixels(challenge)
            t["decode"].append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            clf.logits(pixels)
            t["network"].append((time.perf_counter() - started) * 1000)
    return [{"engine": name, "kernels": classifiers[name].engine["kernels"],
             "threads": classifiers[name].engine["threads"], "median_ms": statistics.median(t["wall"]),
             "p90_ms": percentile(t["wall"], 90), "cpu_ms": statistics.median(t["cpu"]),
             "decode_ms": statistics.median(t["decode"]), "network_ms": statistics.median(t["network"])}
            for name, t in times.items()]


def accuracy(classifier, data: Path, limit: int | None, out: Path) -> dict:
    from asirra.evaluation import evaluate_data
    from asirra.models import default_model_path
    from asirra.stats import wilson_interval

    report = evaluate_data(classifier, data, out, split=default_model_path(), limit=limit, explain=False,
                           progress=False).report.to_json()
    n, right = report["n"], round(report["accuracy"] * report["n"])
    low, high = wilson_interval(right, n)
    return {"images": n, "accuracy": report["accuracy"], "accuracy_ci": [low, high], "mistakes": n - right,
            "log_loss": report["log_loss"], "challenge_solve_rate": report["challenge_solve_rate"],
            "challenge_ci": [report["ci_low"], report["ci_high"]], "p12": report["p12"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED,
                        help="a Kaggle root: test1/ for timing, train/ for accuracy")
    parser.add_argument("--challenges", type=int, default=30)
    parser.add_argument("--val-limit", type=int, default=None,
                        help="score a stratified sample of the validation images")
    parser.add_argument("--out", type=Path, default=Path("/tmp/asirra-solve-options"), help="the 260 px model, scores")
    parser.add_argument("--cache-dir", default="/tmp/asirra-bench-cache", help="where the fp32 export goes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    os.environ["ASIRRA_CACHE"] = args.cache_dir
    if not (args.data / "test1").is_dir() or not (args.data / "train").is_dir():
        sys.exit(f"error: {args.data} needs test1/ and train/ (a Kaggle root); pass --data ROOT")

    from asirra.cpu import describe_cpu
    from asirra.data import scan

    load_before = os.getloadavg()
    folder_260 = native_resolution_model(args.out, 260, args.data / "test1")
    classifiers = engines(folder_260)
    refs = sorted(scan(args.data / "test1", labelled=False), key=lambda r: int(r.id))
    challenges = [[refs[i * CHALLENGE_SIZE + j].read_bytes() for j in range(CHALLENGE_SIZE)]
                  for i in range(min(args.challenges, len(refs) // CHALLENGE_SIZE))]
    speed = time_solves(classifiers, challenges)
    scored = {"int8 300 px (default)", "int8 260 px", "fp32 300 px", "int8 300 px, exact kernels"}
    scores = {name: accuracy(clf, args.data, args.val_limit, args.out / "scores" / name.replace(" ", "-"))
              for name, clf in classifiers.items() if name in scored}
    for row in speed:
        row.update({k: scores[row["engine"]][k] for k in ("accuracy", "mistakes", "challenge_solve_rate")}
                   if row["engine"] in scores else {"accuracy": None, "mistakes": None, "challenge_solve_rate": None})
    summary = {"cpu": describe_cpu(), "load_before": load_before, "load_after": os.getloadavg(),
               "challenges": len(challenges), "speed": speed, "accuracy": scores, "model_260": str(folder_260)}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    print(f"\n{cpu_line(summary['cpu'], load_before, summary['load_after'])}; {len(challenges)} challenges\n")
    shown = [{**r, "acc": "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%",
              "pass": "-" if r["challenge_solve_rate"] is None else f"{100 * r['challenge_solve_rate']:.1f}%"}
             for r in speed]
    print(table(shown, [("engine", "engine", ""), ("kernels", "kernels", ""), ("threads", "threads", "d"),
                        ("median_ms", "median ms", ".1f"), ("p90_ms", "p90 ms", ".1f"), ("cpu_ms", "CPU ms", ".1f"),
                        ("decode_ms", "decode", ".1f"), ("network_ms", "network", ".1f"), ("acc", "val accuracy", ""),
                        ("pass", "challenges passed", "")]))
    for name, s in scores.items():
        print(f"{name}: {s['images']} validation images, accuracy {100 * s['accuracy']:.2f}% "
              f"[{100 * s['accuracy_ci'][0]:.2f}, {100 * s['accuracy_ci'][1]:.2f}] ({s['mistakes']} mistakes), "
              f"log loss "
              f"{s['log_loss']:.4f}; challenges passed {100 * s['challenge_solve_rate']:.1f}% "
              f"[{100 * s['challenge_ci'][0]:.1f}, {100 * s['challenge_ci'][1]:.1f}]")


if __name__ == "__main__":
    main()
