"""Hardened pools: seconds per image per method, SSIM / PSNR, and whether the noise carries the label.

    python benchmarks/bench_harden.py [--data PATH] [--ids 120] [--out runs/bench-harden]
                                      [--methods fgsm,pgd,random-target,feature] [--surrogates effnet-lite0]
                                      [--epsilon 4/255] [--crafting-ids 200]

Methods are harden.METHODS plus `random-sign`, a control that is no attack: uniform random +-eps per
pixel, seeded by the image's content. The universal methods craft their one pattern on
cat/dog.{crafting-ids}..{crafting-ids + 31} (linked into OUT/crafting; never a scored photo).

The pool is cat.0..cat.{ids-1} and dog.0..dog.{ids-1} of --data (Kaggle's realistic photos, at their
native resolution), linked (never copied) into OUT/pool. Each method hardens it at its default
settings (`asirra captcha harden`, resumable: a rerun reuses finished images). Every image is then
served once as the service serves it (asirra.captcha.rendering: random crop, size, JPEG quality) and read
by the shipped model, which gives per-image accuracy and its pooled backbone features.

The label-leak probe (the issue's calibration run) splits the pool by id: even ids train, odd ids
test, so no photo is on both sides. A logistic regression on the shipped model's pooled features
of the *hardened, served* training half is scored on
  - the hardened test half (what an attacker who buys labels for hardened images reaches),
  - the clean test half (below a clean-trained probe's accuracy: the probe learned the noise),
and a "noise-only" probe on feature differences (hardened - clean) says directly whether the
perturbation encodes the label (50% = it does not). That probe sees the image through the noise, so
any damage that pulls features towards the class boundary shows up in it (the random-sign control
gives its floor); `pixel_noise_probe` reads the noise alone (128 + the stored pixel difference,
scaled to +-96, through the shipped model's backbone): what the perturbation itself says about the
label, 50% for identical noise. The shipped model is the attacker's and never a surrogate here. Timings are of one process on a machine other jobs share: compare ratios.
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

    from asirra.captcha.rendering import RenderSettings, render_jpeg
    from asirra.images import load_image, read_pixels

    settings = RenderSettings()
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


def noise_features(pairs: list[tuple[Path, Path]], eps: int, net_backbone) -> np.ndarray:
    """The shipped model's pooled features of each perturbation alone, amplified onto mid-grey."""
    import torch
    from PIL import Image

    from asirra.images import load_image

    feats = []
    for start in range(0, len(pairs), 32):
        batch = []
        for original, hardened in pairs[start:start + 32]:
            diff = np.asarray(load_image(hardened), np.float32) - np.asarray(load_image(original), np.float32)
            shown = np.clip(128 + diff * (96 / max(1, eps)), 0, 255).astype(np.uint8)
            batch.append(np.asarray(Image.fromarray(shown).resize((300, 300), Image.BILINEAR), np.float32))
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        with torch.inference_mode():
            feats.append(net_backbone(x).numpy())
    return np.concatenate(feats)


def random_sign_pool(refs, out: Path, eps: int, seed: int):
    """The control: +-eps uniform random signs per pixel, no model involved."""
    from asirra.captcha.defend.derived_pool import derive_pool

    def make(original, key, ref):
        rng = np.random.default_rng(int(key[:15], 16) ^ seed)
        noise = rng.choice(np.array([-eps, eps], np.int16), size=original.shape)
        return np.clip(original.astype(np.int16) + noise, 0, 255).astype(np.uint8), {"method": "random-sign",
                                                                                     "epsilon_255": eps}

    return derive_pool(refs, out, {"maker": "bench-random-sign", "epsilon_255": eps, "seed": seed}, make,
                       desc=f"random-sign eps {eps}/255")


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
    parser.add_argument("--steps", type=int, default=None, help="steps (passes over the crafting set for universal*); default per method")
    parser.add_argument("--crafting-ids", type=int, default=200, help="first id of the 32 per class the universal methods craft on")
    args = parser.parse_args()


    from asirra.captcha.defend.config import HardenConfig, parse_epsilon
    from asirra.captcha.defend.harden import harden_pool, load_surrogates
    from asirra.data import scan
    from asirra.models import DEFAULT_MODEL_DIR, load_model

    os.environ.setdefault("ASIRRA_SURROGATES", str(ROOT / "runs/surrogates"))
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    pool = make_pool(args.data, args.ids, args.out / "pool")
    if args.crafting_ids < args.ids:
        parser.error("--crafting-ids must start above the scored ids")
    crafting = args.out / "crafting"
    crafting.mkdir(parents=True, exist_ok=True)
    for kind in ("cat", "dog"):
        for i in range(args.crafting_ids, args.crafting_ids + 32):
            if not (crafting / f"{kind}.{i}.jpg").exists():
                (crafting / f"{kind}.{i}.jpg").symlink_to((args.data / f"{kind}.{i}.jpg").resolve())
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
    eps_255 = round(epsilon * 255)
    for method in args.methods.split(","):
        start = time.perf_counter()
        crafted = {}
        if method == "random-sign":
            config = None
            result = random_sign_pool(refs, args.out / method, eps_255, args.seed)
        else:
            config = HardenConfig(method=method, epsilon=epsilon, surrogates=tuple(args.surrogates.split(",")),
                                  seed=args.seed, crafting=str(crafting), steps=None if method == "fgsm" else args.steps)
            result = harden_pool(refs, args.out / method, config, surrogates)
            summary = json.loads(Path(result.files["summary"]).read_text())
            crafted = {k: summary[k] for k in ("crafting_images", "crafting_seconds") if k in summary}
        wall = time.perf_counter() - start
        records = {r["source"]: r for r in map(json.loads, open(result.files["manifest"]))}
        made = [records[str(ref.source)] for ref in refs]
        hard_x, hard_z = served_features([args.out / method / r["file"] for r in made], args.seed, backbone, head)
        leak = probe(hard_x[train], labels[train], {"hardened_test": (hard_x[test], labels[test]),
                                                   "clean_test": (clean_x[test], labels[test])})
        noise = probe((hard_x - clean_x)[train], labels[train], {"noise_test": ((hard_x - clean_x)[test], labels[test])})
        alone = noise_features([(Path(ref.source), args.out / method / r["file"]) for ref, r in zip(refs, made)],
                               eps_255, backbone)
        pixel = probe(alone[train], labels[train], {"test": (alone[test], labels[test])})
        seconds = [r["seconds"] for r in made]
        rows.append({"method": method, "steps": config.n_steps if config else 0, "eot": config.eot if config else 0,
                     "shipped_acc": float(((hard_z > 0) == labels).mean()),
                     **{f"probe_{k}": v for k, v in leak.items()}, "noise_probe_test": noise["noise_test"],
                     "pixel_noise_probe": pixel["test"], **crafted,
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
               "pixel_noise_probe", "ssim_median", "psnr_median", "seconds_per_image", "minutes_per_1000"]
    print(table([{c: _fmt(row.get(c, "")) for c in columns} for row in rows], [(c, c, "") for c in columns]))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
