"""Data-parallel training over a few processes on one machine (`vqs models` on the 2 cores).

Torch runs one thread per process (`train.TRAIN_THREADS`): two threads of one process wait on each
other at every reduction, and on shared cores under load most of their time went to that. Two
processes that meet once per step, to average their gradients, do not. Every rank starts from the
same seed, so it builds the same model (or gets its own copy of the one it is given) and draws the
same batch; it then computes the loss on its share of that batch (`Shard.take`), and the gradients
are averaged before every optimiser step, so the parameters stay equal on every rank. BatchNorm statistics are each rank's own until
`average_buffers` makes them equal at the end. The sum of a fixed number of tensors is the same
from run to run, so training stays deterministic for a fixed number of processes (a different
number splits each batch differently: part of what reproduces a run, like the thread count).

What a process is given is handed over by value (`_by_value`). torch.multiprocessing would hand
every process the same shared memory for each tensor instead, so that processes each training
"their" copy of a model would all step one model: two ranks applied every update twice, and
three models trained at once on one encoder wrecked it.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` data-parallel processes."""

    rank: int = 0
    world: int = 1

    def take(self, batch):
        """This rank's share of a batch every rank drew alike (its items rank, rank + world, ...)."""
        return batch[self.rank :: self.world]

    @property
    def leads(self) -> bool:
        """Rank 0 prints progress and hands back the result."""
        return self.rank == 0


SINGLE = Shard()


def average_gradients(parameters: Iterable[nn.Parameter], shard: Shard) -> None:
    """Replace every gradient by its mean over the ranks, in one flat all-reduce (a parameter
    without a gradient on some rank counts as zero there, as its step would)."""
    if shard.world == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= shard.world
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def average_buffers(module: nn.Module, shard: Shard) -> None:
    """Floating-point buffers (BatchNorm's running statistics) averaged over the ranks."""
    if shard.world == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= shard.world


def _by_value(fn: Callable, args: tuple) -> bytes:
    """`fn` and `args` with their tensors' data in the bytes (plain pickle, not multiprocessing's)."""
    return pickle.dumps((fn, args))


def _rank_main(rank: int, world: int, store: str, job: bytes, out: str) -> None:
    # A file store, not rank 0's TCP store: with a barrier before leaving, rank 0 hosting the
    # rendezvous still aborted now and then as the ranks tore down ("terminate called without an
    # active exception", twice in CI). With the file store, a CI run saw rank 1 abort the same way
    # in gloo's teardown. So once every rank is past the barrier (the result is on disk), each
    # leaves without tearing gloo down: there is nothing left for the teardown to do.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        fn, args = pickle.loads(job)
        result = fn(Shard(rank, world), *args)
        if rank == 0:
            torch.save(result, out)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run(fn: Callable, world: int, *args):
    """`fn(shard, *args)` in `world` processes (world 1: here, in this process); rank 0's return
    value. `fn` and `args` must pickle (datasets do: their frames are reopened, not copied)."""
    if world == 1:
        return fn(SINGLE, *args)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        store = str(Path(tmp) / "rendezvous")
        mp.spawn(_rank_main, args=(world, store, _by_value(fn, args), out), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


def concurrently(jobs: list[tuple[Callable, tuple]]) -> list:
    """Independent jobs `fn(*args)`, one process each, at the same time; their return values in order."""
    if len(jobs) == 1:
        fn, args = jobs[0]
        return [fn(*args)]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [str(Path(tmp) / f"job{i}.pt") for i in range(len(jobs))]
        mp.spawn(_job_main, args=([_by_value(fn, args) for fn, args in jobs], outs), nprocs=len(jobs), join=True)
        return [torch.load(o, weights_only=False) for o in outs]


def _job_main(index: int, jobs: list[bytes], outs: list[str]) -> None:
    fn, args = pickle.loads(jobs[index])
    torch.save(fn(*args), outs[index])
