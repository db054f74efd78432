"""Data-parallel training across processes started by ``torchrun`` (gloo on CPU, nccl on CUDA).

Every process holds the whole model and the same shuffling generator, so all of them see the same
global batch order; process r trains on slice r of each global batch of ``batch_size x world``
samples, its loss weighted by its share of the global batch, and the gradients are summed before
every optimiser step. BatchNorm layers become ``GlobalBatchNorm``: they normalise by the statistics
of the whole global batch, exchanged with a differentiable all_reduce (gloo and nccl alike; torch's
SyncBatchNorm refuses CPU tensors), so their running statistics are the same on every process. The
result equals one process training on the global batch, parameters and buffers, uneven last
batches included. Process 0 evaluates and writes the checkpoint and metrics.

    torchrun --nproc_per_node 4 -m training.train --device cuda ...            # one machine
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 \\
             --nproc_per_node 8 -m training.train --device cuda ...            # on each node
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes, on every process; its gradient is the sum of theirs,
    since each process's loss depends on every process's input through the sum."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total


def _sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    total: torch.Tensor = _SumOverProcesses.apply(tensor)
    return total


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


def param_divergence(model: nn.Module, world: World) -> float:
    """Largest difference of any parameter or buffer (BatchNorm's running statistics) between
    processes: 0.0 when they are in step."""
    if not world.active:
        return 0.0
    tensors = [*model.parameters(), *model.buffers()]
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).abs().max())


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, summed over the processes.

    Two all_reduce calls per forward (the sums giving the mean, then the squared deviations from
    it) and, through their gradients, two per backward; each process calls them in the same order,
    also with an empty slice of a short last batch. Outside training, or in a single process, it
    is plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input [batch, channels, ...], got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)  # per channel, broadcast over batch and space
        count = torch.full((1,), input.numel() // input.shape[1], dtype=input.dtype, device=input.device)
        sums = _sum_over_processes(torch.cat([input.sum(dims), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centred = input - mean.view(shape)
        var = _sum_over_processes((centred * centred).sum(dims)) / n  # biased, as BatchNorm normalises
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None and self.bias is not None:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach() * n / (n - 1).clamp_min(1))
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def use_global_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm inside ``module`` by a GlobalBatchNorm holding the same parameters and
    buffers (so optimisers and state dicts are unaffected). Returns how many were replaced."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            for key in ("weight", "bias"):
                setattr(bn, key, getattr(child, key))
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(bn, key, getattr(child, key))
            bn.train(child.training)
            setattr(module, name, bn)
            replaced += 1
        else:
            replaced += use_global_batchnorm(child)
    return replaced


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def teardown(world: World) -> None:
    if world.active:
        dist.destroy_process_group()
