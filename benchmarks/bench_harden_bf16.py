"""PGD hardening with the surrogate's passes in bfloat16 (HardenConfig.bf16) against fp32: time and effect.

    python benchmarks/bench_harden_bf16.py [--data PATH] [--photos 16] [--surrogate runs/bill/cache/surrogate/*/run]

The study hardens its pools with bf16 (half the CPU on a CPU with native bf16, such as AVX-512-BF16).
PGD steps by the gradient's sign, so what matters is whether the perturbation still does its job:
this prints, for the same photos and the same random start, seconds per photo (wall and CPU), the
share of pixels whose perturbation has the same sign, and the surrogate's P(true class) on served
views after hardening, for both. Timings are of one process on a shared machine: compare the ratio.
"""

from __future__ import annotations

import argparse
import glob
import time

import numpy as np
import torch

from asirra.captcha.defend.config import HardenConfig
from asirra.captcha.defend.harden import Hardener, load_surrogate
from asirra.data import scan
from asirra.labels import DOG


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/study-pool")
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--surrogate", default=None, help="a model folder (default: the study's cached surrogate)")
    args = parser.parse_args()
    surrogate = load_surrogate(args.surrogate or sorted(glob.glob("runs/bill/cache/surrogate/*/run/model"))[0])
    refs = scan(args.data, labelled=True)[: args.photos]
    results = {}
    for bf16 in (False, True):
        hardener = Hardener(HardenConfig(method="pgd", epsilon=4 / 255, eot=2, bf16=bf16,
                                         surrogates=(surrogate.folder,)), [surrogate])
        wall, cpu, rows = time.perf_counter(), time.process_time(), []
        for ref in refs:
            original = np.asarray(ref.load().convert("RGB"))
            changed, fields = hardener(original, ref.name, ref)
            after = fields["surrogate_p_dog_after"]
            rows.append((changed.astype(int) - original.astype(int), after if ref.label == DOG else 1 - after))
        results[bf16] = rows
        print(f"bf16={bf16}: {(time.perf_counter() - wall) / len(refs):.2f} s wall, "
              f"{(time.process_time() - cpu) / len(refs):.2f} CPU-s per photo; surrogate P(true class) after "
              f"hardening, median {np.median([p for _, p in rows]):.3f}")
    agree = np.mean([(np.sign(a) == np.sign(b)).mean() for (a, _), (b, _) in zip(results[False], results[True])])
    print(f"perturbation signs agree on {agree:.1%} of pixels; torch {torch.__version__}, "
          f"{len(refs)} photos of {args.data}")


if __name__ == "__main__":
    main()
