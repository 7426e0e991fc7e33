"""Training throughput of seed-cnn on this CPU: precision / memory-format variants side by side.

    python benchmarks/bench_train.py [--data PATH] [--batches 4] [--rounds 3] [--epoch-images 384]
                                     [--cache-dir /tmp/asirra-bench-cache] [--no-compile] [--skip-memory]

Four measurements, each through the code `asirra train` runs (PixelTask + the epoch loop of fit):
1. img/s of one training step (uint8 -> float, random affine, forward, backward, AdamW) at 128 px,
   batch 64, per variant: fp32, channels_last, bf16 autocast, both, + heap reuse
   (train.reuse_freed_memory), + torch.compile. Variants take turns in rounds, so a burst of load
   from other processes hits them all alike; the ratio to fp32 and the CPU time per image are the
   figures to trust on a shared machine.
2. a whole epoch read from the PixelCache memmap vs the same images already in RAM vs pure compute
   on pre-built, pre-augmented tensors: how much of an epoch the data path costs.
3. OpenMP settings (all cores with libgomp's default spin-waiting, all cores with
   OMP_WAIT_POLICY=PASSIVE, one thread), each in a fresh process since libgomp reads them once.
4. peak memory (ru_maxrss) of building a fresh 128 px cache over the whole data set and iterating
   it once, in a child process so the other sections do not count. ru_maxrss counts the memmap's
   resident file pages, which the kernel may evict; RssAnon is the memory that cannot be.

Sections 1-3 read a cache in --cache-dir (not ~/.cache/asirra); section 4 builds its own in a
temporary folder beside it and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from report import table  # benchmarks/report.py, beside this script

from asirra.cache import PixelCache
from asirra.config import TrainConfig
from asirra.data import scan
from asirra.errors import DataError
from asirra.models import create_model
from asirra.tasks import PixelTask
from asirra.training import _train_one_epoch, reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAIN = ROOT.parent / "shared" / "datasets" / "dogs-vs-cats" / "train"
IMAGE_SIZE = 128
BATCH = 64
REFERENCES = {"Keras 3 + TensorFlow (issue)": 83.0, "eager PyTorch (issue)": 52.0}

class Variant(NamedTuple):
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False
    heap_reuse: bool = False  # train.reuse_freed_memory


VARIANTS = {
    "eager fp32": Variant(),
    "channels_last": Variant(channels_last=True),
    "bf16 autocast": Variant(bf16=True),
    "channels_last + bf16": Variant(channels_last=True, bf16=True),
    "channels_last + bf16 + heap reuse": Variant(channels_last=True, bf16=True, heap_reuse=True),
    "channels_last + bf16 + heap reuse + compile": Variant(channels_last=True, bf16=True, compile=True,
                                                           heap_reuse=True),
}


def base_config(**overrides) -> TrainConfig:
    # schedule "plateau" steps once per epoch, outside the timed loop.
    config = TrainConfig(data="", out="", model="seed-cnn", batch_size=BATCH, schedule="plateau", tta=False)
    return replace(config, **overrides)


def make_task(cached, indices: np.ndarray, config: TrainConfig):
    torch.manual_seed(0)
    task = PixelTask(create_model("seed-cnn"), cached, indices, indices[:0], config)
    optimizer = torch.optim.AdamW(task.parameter_groups(config), lr=config.lr)
    return task, optimizer


def timed_epoch(task, optimizer, config: TrainConfig, epoch: int = 0) -> float:
    """Seconds for one pass of fit's epoch loop over the task's training images."""
    started = time.perf_counter()
    _train_one_epoch(task, optimizer, None, config, epoch)
    return time.perf_counter() - started


def in_ram(cached, indices: np.ndarray):
    """The same images as `cached`, rows copied into an ordinary array (no memmap, no disk)."""
    from asirra.cache import CachedImages

    return CachedImages([cached.refs[i] for i in indices], np.arange(len(indices)),
                        [cached.keys[i] for i in indices], cached.pixels(indices))


# ---- 1. variants ---------------------------------------------------------------------------


def bench_variants(cached, args) -> list[dict]:
    ram = in_ram(cached, np.arange(args.batches * BATCH))
    indices = np.arange(len(ram))
    runs, notes = {}, {}
    for name, v in VARIANTS.items():
        if v.compile and args.no_compile:
            continue
        config = base_config(channels_last=v.channels_last, bf16=v.bf16, compile=v.compile)
        task, optimizer = make_task(ram, indices, config)
        started = time.perf_counter()
        try:
            with settings(v):
                timed_epoch(_first_batches(task, 2), optimizer, config)  # warm up (and compile)
        except Exception as exc:  # torch.compile needs a working C++ toolchain
            print(f"skipping {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", file=sys.stderr)
            continue
        notes[name] = f"warm-up + compile {time.perf_counter() - started:.0f} s" if v.compile else ""
        runs[name] = (v, task, optimizer, config)
    rates = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, (v, task, optimizer, config) in runs.items():
            with settings(v):
                before = _cpu_seconds()
                seconds = timed_epoch(task, optimizer, config, epoch=round_ + 1)
                cpu[name].append((_cpu_seconds() - before) / len(indices) * 1000)
            rates[name].append(len(indices) / seconds)
        print(f"round {round_ + 1}/{args.rounds} done; load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    base = statistics.median(rates["eager fp32"])
    return [{"variant": name, "img_s": statistics.median(r), "min": min(r), "max": max(r),
             "vs_fp32": statistics.median(r) / base, "cpu_ms": statistics.median(cpu[name]),
             "note": notes[name]} for name, r in rates.items()]


@contextmanager
def settings(variant: Variant):
    """The process-wide setting of a variant, undone afterwards so the next variant starts clean."""
    reuse_freed_memory(variant.heap_reuse)
    try:
        yield
    finally:
        reuse_freed_memory(False)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- 2. epoch: data path vs compute ---------------------------------------------------------


class PrebuiltTask:
    """Pure compute: pre-augmented float batches already in memory, no reading or warping."""

    def __init__(self, task: PixelTask):
        self.task, self.model = task, task.model
        self.batches = list(task.train_batches(0))

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_batches(self, epoch):
        return iter(self.batches)


def bench_epoch(cached, config: TrainConfig, args) -> list[dict]:
    picks = np.random.default_rng(0).choice(len(cached), size=min(args.epoch_images, len(cached)), replace=False)
    picks = np.sort(picks)
    memmap_task = make_task(cached, picks, config)
    ram = in_ram(cached, picks)
    ram_task = make_task(ram, np.arange(len(ram)), config)
    prebuilt_task, prebuilt_opt = make_task(ram, np.arange(len(ram)), config)
    kinds = {
        "epoch from memmap (asirra train)": memmap_task,
        "same images already in RAM": ram_task,
        "pure compute (pre-built tensors)": (PrebuiltTask(prebuilt_task), prebuilt_opt),
    }
    for task, optimizer in kinds.values():  # warm-up (and compile) on a short slice
        timed_epoch(_first_batches(task, 2), optimizer, config)
    seconds = {name: [] for name in kinds}
    cpu = {name: [] for name in kinds}
    for repeat in range(args.rounds):
        names = list(kinds)
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:  # no kind always runs first
            task, optimizer = kinds[name]
            before = _cpu_seconds()
            seconds[name].append(timed_epoch(task, optimizer, config, epoch=repeat + 1))
            cpu[name].append((_cpu_seconds() - before) / len(picks) * 1000)
    pure = statistics.median(seconds["pure compute (pre-built tensors)"])
    pure_cpu = statistics.median(cpu["pure compute (pre-built tensors)"])
    return [{"kind": name, "images": len(picks), "seconds": statistics.median(s), "img_s": len(picks) / statistics.median(s),
             "vs_pure": statistics.median(s) / pure, "cpu_ms": statistics.median(cpu[name]),
             "cpu_vs_pure": statistics.median(cpu[name]) / pure_cpu} for name, s in seconds.items()]


class _first_batches:
    def __init__(self, task, n: int):
        self.task, self.n, self.model = task, n, task.model

    def __getattr__(self, name):
        return getattr(self.task, name)

    def n_train(self):
        return min(self.task.n_train(), self.n * BATCH)

    def train_batches(self, epoch):
        for i, batch in enumerate(self.task.train_batches(epoch)):
            if i == self.n:
                return
            yield batch


# ---- 3. OpenMP threads: settings read once, when torch loads, so each runs in its own process --


THREAD_SETTINGS = {  # name -> (torch threads, extra environment)
    "all cores, OpenMP default (active wait)": (0, {}),
    "all cores, OMP_WAIT_POLICY=PASSIVE": (0, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "1 thread": (1, {}),
}


def threads_child(args) -> dict:
    """Runs in a fresh process: img/s of the asirra train step (channels_last + bf16 + heap reuse)."""
    torch.set_num_threads(args.threads_child or os.cpu_count() or 1)
    reuse_freed_memory()
    refs = scan(args.data, labelled=True)
    refs = [refs[i] for i in np.random.default_rng(0).choice(len(refs), size=args.batches * BATCH, replace=False)]
    ram = in_ram(PixelCache(IMAGE_SIZE, Path(args.cache_dir)).build(refs, progress=False), np.arange(len(refs)))
    config = base_config()
    task, optimizer = make_task(ram, np.arange(len(ram)), config)
    timed_epoch(_first_batches(task, 2), optimizer, config)
    before = _cpu_seconds()
    seconds = timed_epoch(task, optimizer, config, epoch=1)
    return {"img_s": len(ram) / seconds, "cpu_ms": (_cpu_seconds() - before) / len(ram) * 1000}


def bench_threads(args) -> list[dict]:
    results = {name: [] for name in THREAD_SETTINGS}
    for _ in range(args.rounds):
        for name, (threads, env) in THREAD_SETTINGS.items():
            command = [sys.executable, __file__, "--threads-child", str(threads), "--data", args.data,
                       "--cache-dir", args.cache_dir, "--batches", str(args.batches)]
            out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **env})
            results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["img_s"] for r in results[next(iter(THREAD_SETTINGS))])
    return [{"setting": name, "img_s": statistics.median(r["img_s"] for r in runs),
             "vs_default": statistics.median(r["img_s"] for r in runs) / base,
             "cpu_ms": statistics.median(r["cpu_ms"] for r in runs)} for name, runs in results.items()]


# ---- 4. memory of the cache over the whole data set -----------------------------------------


def memory_child(data: str, cache_dir: str) -> dict:
    """Runs in a fresh process: build the cache over every image of `data`, then read it all once."""
    refs = scan(data, labelled=True)
    cache = PixelCache(IMAGE_SIZE, Path(cache_dir))
    rows_before = cache.store_path.stat().st_size // cache.row_bytes if cache.store_path.exists() else 0
    started = time.perf_counter()
    cached = cache.build(refs, workers=2, progress=False)
    built = {"build_s": time.perf_counter() - started, "new_rows": len(cached.store) - rows_before,
             "maxrss_mb": _maxrss_mb(), **_rss()}
    task = PixelTask(create_model("seed-cnn"), cached, np.arange(len(cached)), np.arange(0), base_config())
    started = time.perf_counter()
    for _ in task.train_batches(0):  # read + uint8->float + random affine, no model
        pass
    iterated = {"iterate_s": time.perf_counter() - started, "maxrss_mb": _maxrss_mb(), **_rss()}
    return {"images": len(refs), "usable": len(cached), "build": built, "iterate": iterated}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def _rss() -> dict:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                fields[f"{key}_mb"] = int(value.split()[0]) / 1024
    return fields


def bench_memory(args) -> dict:
    """A cold build every time: the child fills a fresh cache folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="asirra-bench-cold-", dir=Path(args.cache_dir).parent) as cold:
        out = subprocess.run([sys.executable, __file__, "--memory-child", "--data", args.data, "--cache-dir", cold],
                             check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- report ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED_TRAIN))
    parser.add_argument("--batches", type=int, default=4, help="timed batches per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epoch-images", type=int, default=384)
    parser.add_argument("--cache-dir", default="/tmp/asirra-bench-cache")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--skip-memory", action="store_true", help="skip the full-data-set memory section")
    parser.add_argument("--json", action="store_true", help="also print all results as one JSON object")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        scan(args.data, labelled=True)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    if args.memory_child:
        print(json.dumps(memory_child(args.data, args.cache_dir)))
        return
    if args.threads_child is not None:
        print(json.dumps(threads_child(args)))
        return

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # as asirra train does
    results = {"load_before": os.getloadavg(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if not args.skip_memory:
        print("building / iterating a fresh cache of the whole data set in a child process ...", file=sys.stderr)
        results["memory"] = bench_memory(args)
    refs = scan(args.data, labelled=True)
    n = max(args.batches * BATCH, args.epoch_images)
    refs = [refs[i] for i in np.random.default_rng(0).choice(len(refs), size=min(n, len(refs)), replace=False)]
    cached = PixelCache(IMAGE_SIZE, Path(args.cache_dir)).build(refs, progress=False)

    results["variants"] = bench_variants(cached, args)
    default = TrainConfig(data="", out="")
    config = base_config(channels_last=default.channels_last, bf16=default.bf16, compile=default.compile)
    reuse_freed_memory()  # as asirra train does
    results["epoch"] = bench_epoch(cached, config, args)
    results["threads_settings"] = bench_threads(args)
    results["load_after"] = os.getloadavg()

    print(f"\nseed-cnn training, {IMAGE_SIZE} px, batch {BATCH}, {results['threads']} threads, torch {torch.__version__}; "
          f"load average {results['load_before'][0]:.1f} before, {results['load_after'][0]:.1f} after "
          f"({os.cpu_count()} cores)")
    print(f"\n1. training step throughput (median of {args.rounds} rounds x {args.batches} batches)\n")
    print(table(results["variants"], [("variant", "variant", ""), ("img_s", "img/s", ".1f"), ("min", "min", ".1f"),
                                      ("max", "max", ".1f"), ("vs_fp32", "x fp32", ".2f"),
                                      ("cpu_ms", "CPU ms/img", ".1f"), ("note", "note", "")]))
    print("   references on this CPU: " + ", ".join(f"{k} {v:.0f} img/s" for k, v in REFERENCES.items()))
    best = max(results["variants"], key=lambda r: r["img_s"])
    print(f"   fastest: {best['variant']}; asirra train uses channels_last={default.channels_last}, bf16={default.bf16}, "
          f"compile={default.compile}, heap reuse, all cores")
    print(f"\n2. epoch of {args.epoch_images} images as asirra train runs it (median of {args.rounds})\n")
    print(table(results["epoch"], [("kind", "pipeline", ""), ("seconds", "seconds", ".1f"), ("img_s", "img/s", ".1f"),
                                   ("vs_pure", "x pure compute", ".2f"), ("cpu_ms", "CPU ms/img", ".1f"),
                                   ("cpu_vs_pure", "CPU x pure", ".2f")]))
    print(f"\n3. OpenMP threads, the asirra train step, one process each (median of {args.rounds})\n")
    print(table(results["threads_settings"], [("setting", "setting", ""), ("img_s", "img/s", ".1f"),
                                              ("vs_default", "x default", ".2f"), ("cpu_ms", "CPU ms/img", ".1f")]))
    if "memory" in results:
        m = results["memory"]
        rows = [{"phase": f"build cache ({m['build']['new_rows']} images decoded)", "s": m["build"]["build_s"], **m["build"]},
                {"phase": "iterate all batches (read+float+augment)", "s": m["iterate"]["iterate_s"], **m["iterate"]}]
        print(f"\n4. memory over the whole data set ({m['usable']} of {m['images']} images usable, {IMAGE_SIZE} px)\n")
        print(table(rows, [("phase", "phase", ""), ("s", "seconds", ".1f"), ("maxrss_mb", "peak RSS MB", ".0f"),
                           ("RssAnon_mb", "RssAnon MB", ".0f"), ("RssFile_mb", "RssFile MB", ".0f")]))
        store_mb = m["usable"] * IMAGE_SIZE * IMAGE_SIZE * 3 / 2**20
        print(f"   the pixel store is {store_mb:.0f} MB; its resident pages (RssFile) are page cache the kernel can evict")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
