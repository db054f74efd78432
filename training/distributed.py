"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, nccl on CUDA).

Every process holds the whole model and the same shuffling generator, so all of them see the same
global batch order; process r trains on slice r of each global batch of ``batch_size x world``
samples, its loss weighted by its share of the global batch, and the gradients are summed before
every optimiser step. The result equals one process training on the global batch, uneven last
batches included. Process 0 evaluates and writes the checkpoint and metrics.

    torchrun --nproc_per_node 4 -m training.train --device cuda ...            # one machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m training.train --device cuda ...            # on each node
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def setup(device: str) -> World:
    """Join the process group that torchrun describes in the environment (a no-op without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank)


def device_for(world: World, device: str) -> str:
    return f"cuda:{world.local_rank}" if device == "cuda" and world.active else device


def sum_gradients(model: nn.Module, world: World) -> None:
    """Sum each gradient over the processes (each already carries its share of the global mean).

    A process with no samples in a short last batch contributes zeros.
    """
    if not world.active:
        return
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)


def prepare_data_once(world: World, prepare: Callable[[], object]) -> None:
    """Let one process per machine fetch the data set while the others wait, then all read it."""
    if world.local_rank == 0:
        prepare()
    barrier(world)


def sum_over_ranks(values: list[float], world: World, device: str) -> list[float]:
    if not world.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def max_over_ranks(value: float, world: World, device: str) -> float:
    if not world.active:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def parameter_divergence(model: nn.Module, world: World) -> float:
    """Largest difference of any parameter between processes (0.0 when they are in step)."""
    if not world.active:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def teardown(world: World) -> None:
    if world.active:
        dist.destroy_process_group()
