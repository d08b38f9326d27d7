"""Sharded runs under ``torchrun`` (issue 5): every rank takes its share of the images, rank 0
gathers the results and writes the outputs.

``torchrun --nproc_per_node=K classify.py ...`` (and ``--nnodes`` across machines) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them a run is one process, unchanged. Images are
dealt out in whole batches (batch j goes to rank j mod K), so every batch holds the same images
as in a one-process run and the scores are the same as far as the arithmetic is (run the
one-process comparison with the same threads per process: thread counts move the last bits).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist


class Shard(NamedTuple):
    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Shard(0, 1, 0)


def init_from_env(device: Optional[str]) -> Shard:
    """The process's shard; starts the process group under torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    shard = Shard(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        on_cuda = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda"
        dist.init_process_group("nccl" if on_cuda else "gloo")
    return shard


def device_for(shard: Shard, device: Optional[str]) -> Optional[str]:
    """Each rank on its own GPU when the device is plain ``cuda`` (or unset with CUDA present)."""
    if shard.world > 1 and (device == "cuda" or (device is None and torch.cuda.is_available())):
        return f"cuda:{shard.local_rank}"
    return device


def owned_indices(n: int, batch: int, shard: Shard) -> list[int]:
    """Indices of the items of the batches ``shard.rank, shard.rank + world, ...``."""
    return [i for start in range(shard.rank * batch, n, batch * shard.world)
            for i in range(start, min(start + batch, n))]


def gather(obj: Any, shard: Shard) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (in rank order), None elsewhere."""
    if shard.world == 1:
        return [obj]
    out = [None] * shard.world if shard.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def finish(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sharded(run, args, device: Optional[str]):
    """``run(args, shard)`` inside this process's shard (process group set up and torn down)."""
    shard = init_from_env(device)
    try:
        return run(args, shard)
    finally:
        finish(shard)
