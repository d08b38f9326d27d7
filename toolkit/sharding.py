"""Sharded runs under ``torchrun``: every rank takes its share of the images, rank 0 gathers
the results and writes the outputs.

``torchrun --nproc_per_node=K classify.py ...`` (and ``--nnodes`` across machines) sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them a run is one process, unchanged. Images are
dealt out in whole batches (batch j goes to rank j mod K), so every batch holds the same images
as in a one-process run and the scores are the same as far as the arithmetic is (run the
one-process comparison with the same threads per process: thread counts move the last bits).

Devices and backends (:func:`plan`): with ``--device cuda`` (or no ``--device`` where CUDA is
present) local rank r takes GPU r mod G of the G on its node, and that GPU becomes the
process's current device before the process group starts. The default group is NCCL when
every rank on the node has a GPU of its own, gloo otherwise (CPU ranks, or ranks sharing a
GPU, which NCCL refuses). The toolkit's only collective is the gather of Python results on
rank 0; it always runs over a gloo group, so pickled results never travel through GPU memory
(``gather_object`` over NCCL would put every rank's bytes on the current CUDA device).
"""
from __future__ import annotations

import datetime
import os
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from toolkit.devices import resolve_device
from toolkit.errors import InputError

# How long a rank that finished its share waits for the others at the final gather. Ranks
# finish at different times (image sizes, crop counts), and over a long run the gap can pass
# torch's default of 30 minutes, which would crash the run at its very end.
GATHER_TIMEOUT = datetime.timedelta(hours=24)
# Environment that torchrun sets for every process.
WORLD_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
LOCAL_WORLD_ENV = "LOCAL_WORLD_SIZE"


class Shard(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: Optional[torch.device] = None  # this process's device (None: not planned)
    group: Any = None                       # gloo process group for gathering results (None: one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``.rank{r}of{K}`` under torchrun, empty for one process: names this rank's journal
        and lock files, so ranks never share one."""
        return "" if self.world == 1 else f".rank{self.rank}of{self.world}"


SINGLE = Shard(0, 1, 0)


class Plan(NamedTuple):
    device: torch.device
    backend: str   # "nccl" or "gloo"


def plan(device: Optional[str], local_rank: int, local_world: int, cuda_count: int) -> Plan:
    """This rank's device and the default group's backend (rules in the module docstring).

    ``device``: the ``--device`` value (None: CUDA where present); ``cuda_count``: GPUs
    visible on this node. An explicit index (``cuda:1``) is kept for every rank, which then
    share it. Pure function of its arguments, so every case runs in a CPU test."""
    if device is None:
        device = "cuda" if cuda_count else "cpu"
    chosen = torch.device(device)
    if chosen.type != "cuda":
        return Plan(chosen, "gloo")
    if cuda_count == 0:
        raise InputError("--device", f"{device!r} asked for, but no CUDA device is available")
    if chosen.index is None:
        chosen = torch.device("cuda", local_rank % cuda_count)
        own_gpu = local_world <= cuda_count
    else:
        own_gpu = local_world == 1
    return Plan(chosen, "nccl" if own_gpu else "gloo")


def _env_int(name: str, default: Optional[int] = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise InputError(name, f"is not set, but {WORLD_ENV}={os.environ.get(WORLD_ENV)} is: "
                                   "start sharded runs with torchrun")
        return default
    try:
        return int(text)
    except ValueError:
        raise InputError(name, f"must be an integer, got {text!r}") from None


def init_from_env(device: Optional[str]) -> Shard:
    """The process's shard and device. Under torchrun: the device is planned, made current
    (CUDA) and the process groups are started; alone: ``device`` resolved and checked."""
    world = _env_int(WORLD_ENV, 1)
    if world <= 1:
        return SINGLE._replace(device=resolve_device(device))
    rank, local_rank = _env_int(RANK_ENV), _env_int(LOCAL_RANK_ENV, 0)
    local_world = _env_int(LOCAL_WORLD_ENV, world)
    if device is not None:
        resolve_device(device)  # a bad name or an absent GPU: one line, before anything starts
    chosen = plan(device, local_rank, local_world, torch.cuda.device_count())
    if chosen.device.type == "cuda":
        torch.cuda.set_device(chosen.device)  # before the process group, so NCCL uses this GPU
    if not dist.is_initialized():
        dist.init_process_group(chosen.backend, timeout=GATHER_TIMEOUT)
    # Results travel over a gloo group of their own, whatever the default backend: the same
    # code then runs on CPU ranks (tested) and GPU ranks.
    return Shard(rank, world, local_rank, chosen.device, dist.new_group(backend="gloo", timeout=GATHER_TIMEOUT))


def owned_indices(n: int, batch: int, shard: Shard) -> list[int]:
    """Indices of the items of the batches ``shard.rank, shard.rank + world, ...``."""
    return [i for start in range(shard.rank * batch, n, batch * shard.world)
            for i in range(start, min(start + batch, n))]


def gather(obj: Any, shard: Shard) -> Optional[list]:
    """Every rank's ``obj`` on rank 0 (in rank order, over the shard's gloo group), None elsewhere."""
    if shard.world == 1:
        return [obj]
    out = [None] * shard.world if shard.is_main else None
    dist.gather_object(obj, out, dst=0, group=shard.group)
    return out


def finish(shard: Shard) -> None:
    if shard.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def sharded(run, args, device: Optional[str]):
    """``run(args, shard)`` inside this process's shard (process groups set up and torn down);
    ``shard.device`` is the device the command runs on."""
    shard = init_from_env(device)
    try:
        return run(args, shard)
    finally:
        finish(shard)
