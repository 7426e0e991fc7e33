"""Hardened pools: seconds per image per method, SSIM / PSNR, and whether the noise carries the label.

    python benchmarks/bench_harden.py [--data PATH] [--ids 120] [--out runs/bench-harden]
                                      [--methods fgsm,pgd,random-target,feature] [--surrogates effnet-lite0]

The pool is cat.0..cat.{ids-1} and dog.0..dog.{ids-1} of --data (Kaggle's realistic photos, at their
native resolution), linked (never copied) into OUT/pool. Each method hardens it at its default
settings (`asirra captcha harden`, resumable: a rerun reuses finished images). Every image is then
served once as the service serves it (service.render_jpeg: random crop, size, JPEG quality) and read
by the shipped model, which gives per-image accuracy and its pooled backbone features.

The label-leak probe (the issue's calibration run) splits the pool by id: even ids train, odd ids
test, so no photo is on both sides. A logistic regression on the shipped model's pooled features
of the *hardened, served* training half is scored on
  - the hardened test half (what an attacker who buys labels for hardened images reaches),
  - the clean test half (below a clean-trained probe's accuracy: the probe learned the noise),
and a "noise-only" probe on feature differences (hardened - clean) says directly whether the
perturbation encodes the label (50% = it does not). The shipped model is the attacker's and never a
surrogate here. Timings are of one process on a machine other jobs share: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from report import table  # benchmarks/report.py, beside this script

ROOT = Path(__file__).resolve().parents[1]


def make_pool(data: Path, ids: int, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("cat", "dog"):
        for i in range(ids):
            link = folder / f"{kind}.{i}.jpg"
            if not link.exists():
                link.symlink_to((data / f"{kind}.{i}.jpg").resolve())
    return folder


def served_features(paths: list[Path], seed: int, net_backbone, head) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, logits) of the shipped model on one served copy of each image."""
    import torch

    from asirra.captcha.service import ServiceSettings, render_jpeg
    from asirra.images import load_image, read_pixels

    settings = ServiceSettings()
    feats = []
    for start in range(0, len(paths), 32):
        batch = []
        for i, path in enumerate(paths[start:start + 32], start):
            jpeg = render_jpeg(load_image(path), random.Random(seed * 100_003 + i), settings)
            batch.append(read_pixels(jpeg, 300))
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float()
        with torch.inference_mode():
            feats.append(net_backbone(x).numpy())
    features = np.concatenate(feats)
    with torch.inference_mode():
        logits = head(torch.from_numpy(features)).squeeze(1).numpy()
    return features, logits


def probe(train_x, train_y, tests: dict) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=5000))
    model.fit(train_x, train_y)
    return {name: float((model.predict(x) == y).mean()) for name, (x, y) in tests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/datasets/dogs-vs-cats/train")
    parser.add_argument("--ids", type=int, default=120, help="ids 0..ids-1 of each class")
    parser.add_argument("--out", type=Path, default=ROOT / "runs/bench-harden")
    parser.add_argument("--methods", default="fgsm,pgd,random-target,feature")
    parser.add_argument("--surrogates", default="effnet-lite0")
    parser.add_argument("--epsilon", default="4/255")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from asirra.captcha.harden import HardenConfig, harden_pool, load_surrogates, parse_epsilon
    from asirra.data import scan
    from asirra.models import load_model
    from asirra.predict import DEFAULT_MODEL_DIR

    os.environ.setdefault("ASIRRA_SURROGATES", str(ROOT / "runs/surrogates"))
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    pool = make_pool(args.data, args.ids, args.out / "pool")
    refs = scan(pool)
    surrogates = load_surrogates(args.surrogates.split(","))
    epsilon = parse_epsilon(args.epsilon)
    shipped, _ = load_model(DEFAULT_MODEL_DIR)
    backbone, head = shipped.backbone.eval(), shipped.head.eval()

    originals = [Path(ref.source) for ref in refs]
    labels = np.array([ref.label for ref in refs])
    ids = np.array([int(ref.id) for ref in refs])
    train, test = ids % 2 == 0, ids % 2 == 1
    clean_x, clean_z = served_features(originals, args.seed, backbone, head)
    rows = [{"method": "none (clean)", "shipped_acc": float(((clean_z > 0) == labels).mean()),
             **{f"probe_{k}": v for k, v in probe(clean_x[train], labels[train],
                                                  {"hardened_test": (clean_x[test], labels[test]),
                                                   "clean_test": (clean_x[test], labels[test])}).items()}}]
    for method in args.methods.split(","):
        config = HardenConfig(method=method, epsilon=epsilon, surrogates=tuple(args.surrogates.split(",")), seed=args.seed)
        start = time.perf_counter()
        result = harden_pool(refs, args.out / method, config, surrogates)
        wall = time.perf_counter() - start
        records = {r["source"]: r for r in map(json.loads, open(result.files["manifest"]))}
        made = [records[str(ref.source)] for ref in refs]
        hard_x, hard_z = served_features([args.out / method / r["file"] for r in made], args.seed, backbone, head)
        leak = probe(hard_x[train], labels[train], {"hardened_test": (hard_x[test], labels[test]),
                                                   "clean_test": (clean_x[test], labels[test])})
        noise = probe((hard_x - clean_x)[train], labels[train], {"noise_test": ((hard_x - clean_x)[test], labels[test])})
        seconds = [r["seconds"] for r in made]
        rows.append({"method": method, "steps": config.n_steps, "eot": config.eot,
                     "shipped_acc": float(((hard_z > 0) == labels).mean()),
                     **{f"probe_{k}": v for k, v in leak.items()}, "noise_probe_test": noise["noise_test"],
                     "ssim_median": statistics.median(r["ssim"] for r in made),
                     "psnr_median": statistics.median(r["psnr"] for r in made if r["psnr"] is not None),
                     "seconds_per_image": statistics.median(seconds),
                     "minutes_per_1000": statistics.median(seconds) * 1000 / 60,
                     "wall_this_run_s": round(wall, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    (args.out / "results.json").write_text(json.dumps({"eps": args.epsilon, "images": len(refs),
                                                       "train": int(train.sum()), "test": int(test.sum()),
                                                       "surrogates": args.surrogates, "rows": rows}, indent=2))
    columns = ["method", "steps", "eot", "shipped_acc", "probe_hardened_test", "probe_clean_test", "noise_probe_test",
               "ssim_median", "psnr_median", "seconds_per_image", "minutes_per_1000"]
    print(table([{c: _fmt(row.get(c, "")) for c in columns} for row in rows], [(c, c, "") for c in columns]))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
