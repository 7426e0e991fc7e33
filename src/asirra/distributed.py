"""Data-parallel training with torch.distributed: the few calls the training loop makes.

`asirra train --nproc N` (or `torchrun ... -m asirra train [train options]`) runs the same
`asirra.training.train` on N processes. Every helper here is a no-op in a world of one process, so a
plain run is unchanged. What makes N processes one run:

- each epoch's seeded permutation of the training images is the same on every rank and `shard`
  gives each rank an interleaved, equal share of it; with `local_batch_size` (the batch split N
  ways) a step of N ranks trains on exactly the batch one process would, so a recipe (batch
  size, steps per epoch, LR schedule) means the same with any N;
- `average_gradients` after backward (every task, whether the whole network or only a backbone's
  top trains) and `average_buffers` after an epoch (batch-norm statistics) keep the replicas equal;
- rank 0 alone writes the run folder and computes validation (`main_only`, which hands its result
  to every rank), so early stopping and LR cuts are decided once and no rank waits on another
  that already stopped; `main_first` lets one process per machine fill a cache the others then read.

Backend: gloo for CPU tensors, NCCL for CUDA ones. Plain BatchNorm: SyncBatchNorm refuses CPU tensors.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Sequence, TypeVar

import numpy as np

from asirra.errors import ConfigError, DataError

T = TypeVar("T")

# Ranks wait at a collective while a machine's first process fills a cache: the backbone pass over 19,000 images takes
# ~10 min here with 2 views, longer with more views or under load. The default 30 min is too short.
WAIT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # place among the processes on this machine
    local_size: int = 1  # processes on this machine

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place in the run, from torchrun's environment; joins its process group on first use."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    _join()
    env = os.environ
    return World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])), int(env.get("LOCAL_WORLD_SIZE", size)))


def _join() -> None:
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    # Collectives go to gloo for CPU tensors and to NCCL for CUDA ones (the loop trains on CPU here).
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=WAIT)
    atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)


def leave() -> None:
    """Leave the process group once every rank is done: all ranks meet, then the group is torn down
    while the interpreter is still whole (torch's advice: never leave it to interpreter shutdown)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launched_as_rank() -> bool:
    """This process is one rank of several (torchrun's environment), without joining any group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def end_rank_process() -> None:
    """End a finished torchrun rank now (`os._exit`), skipping interpreter shutdown; for the process's owner, the CLI.

    After a complete run, whose process group `leave` has already torn down, a rank still aborted now
    and then at exit ("terminate called without an active exception", SIGABRT: 1 run in 10-25 of the
    two-rank test here, the code before this change included): a C++ thread of torch's distributed
    runtime outlives the interpreter's teardown. The run folder is complete by then; output is flushed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def threads_per_process() -> int:
    """The machine's cores shared among the processes running on it (all of them for one process)."""
    return max(1, (os.cpu_count() or 1) // world().local_size)


# ---- the data -------------------------------------------------------------------------------


def shard(order: np.ndarray, rank: int | None = None, size: int | None = None) -> np.ndarray:
    """This rank's interleaved share of an epoch's order, equal in length on every rank.

    Every rank draws the same permutation (same seed), so the shares are disjoint and together
    cover it; the last `len(order) % size` images sit this epoch out (another permutation next epoch).
    """
    if rank is None or size is None:
        w = world()
        rank, size = w.rank, w.size
    if size == 1:
        return order
    return order[: len(order) // size * size][rank::size]


def local_batch_size(batch_size: int, size: int | None = None) -> int:
    """Each rank's share of a batch: N ranks together step on `batch_size` images, as one process does."""
    size = world().size if size is None else size
    if batch_size % size or batch_size // size < 2:
        raise ConfigError(f"--batch-size {batch_size} does not split into {size} equal batches of 2 or more")
    return batch_size // size


def rank_seed(seed: int) -> int:
    """A seed of this rank's own for random draws that should differ between ranks (augmentation).

    Rank 0 keeps `seed` itself, so a run of one process draws what it always drew.
    """
    rank = world().rank
    return seed if rank == 0 else int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1)


# ---- keeping the replicas equal ---------------------------------------------------------------


def average_gradients(parameters) -> None:
    """Replace each trainable parameter's gradient by its mean over the ranks (one flat all-reduce)."""
    if world().size == 1:
        return
    import torch
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:  # a parameter this batch did not reach still joins, so every rank sends the same layout
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world().size
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view(p.grad.shape))
        offset += n


def average_buffers(module) -> None:
    """Batch-norm running statistics averaged over the ranks: each rank updated them on its own batches."""
    if world().size == 1:
        return
    import torch.distributed as dist

    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= world().size


def broadcast_parameters(module) -> None:
    """Every rank starts from rank 0's weights and buffers."""
    if world().size == 1:
        return
    import torch.distributed as dist

    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Per-rank totals (a loss sum, a count) added up over the ranks."""
    if world().size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total)
    return total.tolist()


# ---- who does what --------------------------------------------------------------------------


def main_only(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on rank 0 only; every rank returns its result (or raises its error) once it is done.

    For work with one outcome for the whole run: writing the run folder, validation, deciding the split.
    `fn` itself must not call collectives (only rank 0 runs it).
    """
    w = world()
    if w.size == 1:
        return fn(*args, **kwargs)
    outcome = _outcome_of(fn, *args, **kwargs) if w.is_main else None
    received = _broadcast(_sendable(outcome) if w.is_main else None)
    return _settle(outcome if w.is_main else received)


def main_first(fn: Callable[..., T], *args, **kwargs) -> T:
    """Run `fn` on each machine's first process, then on the others: it fills a cache they only read.

    Every rank returns its own result (a memory-mapped cache cannot be sent). Caches are per
    machine, so each machine's first process fills its own.
    """
    w = world()
    if w.size == 1:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    outcome = _outcome_of(fn, *args, **kwargs) if w.local_rank == 0 else (True, None)
    outcomes = [None] * w.size
    dist.all_gather_object(outcomes, _sendable(outcome))
    failed = [(rank, o[1]) for rank, o in enumerate(outcomes) if not o[0]]
    if failed:  # every rank gives up, none waits for one that did
        _settle(outcome)
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    return outcome[1] if w.local_rank == 0 else fn(*args, **kwargs)


def agree(value, what: str) -> None:
    """Refuse to go on unless every rank holds the same `value` (say, a hash of the images it found)."""
    w = world()
    if w.size == 1:
        return
    import torch.distributed as dist

    values = [None] * w.size
    dist.all_gather_object(values, value)
    odd = [rank for rank, v in enumerate(values) if v != values[0]]
    if odd:
        raise DataError(f"rank {odd[0]} sees different {what} from rank 0")


def _outcome_of(fn, *args, **kwargs) -> tuple[bool, object]:
    try:
        return True, fn(*args, **kwargs)
    except Exception as exc:  # handed to every rank, so none waits forever for a rank that gave up
        return False, exc


def _sendable(outcome: tuple[bool, object]) -> tuple[bool, object]:
    """An outcome that pickles: an error that cannot travel as itself travels as its message."""
    import pickle

    ok, value = outcome
    if ok:
        return outcome
    try:
        pickle.dumps(value)
        return outcome
    except Exception:
        return False, RuntimeError(f"{type(value).__name__}: {value}")


def _broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _settle(outcome: tuple[bool, object]):
    ok, value = outcome
    if not ok:
        raise value
    return value


# ---- launching --------------------------------------------------------------------------------


def launch(nproc: int, train_args: list[str]) -> int:
    """Run `asirra train` with `train_args` on `nproc` local processes under torchrun; its exit code.

    --standalone: a rendezvous on a free local port. Only rank 0's output is shown (the others print
    the same epochs); torchrun still names any rank that fails.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--local-ranks-filter=0", "-m", "asirra", "train", *train_args]
    # The cores shared among the ranks (what torchrun would set, with a warning, as 1).
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc)), **os.environ}
    return subprocess.run(command, env=env).returncode
