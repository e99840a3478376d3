"""torch.distributed helpers shared by the trainers: process group from the torchrun environment, DDP or FSDP2
wrapping, and the few collectives the trainers need.

A single process (no `WORLD_SIZE` in the environment, or `WORLD_SIZE=1`) runs the same code with every
collective a no-op, so the trainers never branch on "distributed or not" beyond `DistributedContext`.
Backends: nccl for CUDA devices, gloo for CPU.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from rlhf_fast.models._common import transformer_blocks  # noqa: F401 (one home: models/)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place and returned (no-op on one process). No host synchronization."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's `tensor` along dim 0 in rank order; all ranks must pass the same shape."""
        if not self.is_distributed:
            return tensor
        tensor = tensor.contiguous()
        gathered = tensor.new_empty((self.world_size * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(gathered, tensor)
        return gathered

    def broadcast_object(self, value, src: int = 0):
        """Rank `src`'s picklable `value` on every rank (a host round trip; use outside hot loops)."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(
    device: str | torch.device | None = "auto", timeout_s: float = 1800.0
) -> DistributedContext:
    """The context of this process, initializing the default process group from torchrun's env vars.

    torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. Without them (or with
    WORLD_SIZE=1) the context is a single process and nothing is initialized. An already initialized default
    group is reused, so several trainers can run one after another in one job.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    resolved = _resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=resolved if resolved.type == "cuda" else None,
        )
        world_size, rank = dist.get_world_size(), dist.get_rank()
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=resolved)


def wrap_model(
    model: nn.Module,
    ctx: DistributedContext,
    *,
    fsdp: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """The module to run trainable forward passes through.

    One process: `model` itself. DDP: a DistributedDataParallel wrapper (gradients averaged over ranks in
    backward). FSDP2 (`fsdp=True`): `fully_shard` applied to each transformer block, then to the whole model;
    the model is sharded in place and returned as is (its methods and attributes stay reachable).
    """
    if not ctx.is_distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        broadcast_module(model, ctx)  # as DDP does: every rank starts from rank 0's weights
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
        broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


@torch.no_grad()
def broadcast_module(model: nn.Module, ctx: DistributedContext) -> None:
    """Copies rank 0's parameters and buffers to every rank (before sharding, so each shard is rank 0's)."""
    if not ctx.is_distributed:
        return
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The underlying model of a DDP wrapper (an FSDP2 model is its own underlying model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def unsharded(root: nn.Module):
    """Gathers every FSDP2 shard group of `root` for the duration (a no-op without FSDP): for code that reads
    the weights directly, outside the modules' forward hooks, like the sampler (the whole model is unsharded
    while it runs)."""
    groups = [module for module in root.modules() if is_fsdp(module)]
    blocks = [module for module in groups if module is not root]
    for module in blocks:  # the prefill runs the blocks' forward: keep them gathered afterwards
        module.set_reshard_after_forward(False, recurse=False)
    for module in groups:
        module.unshard()
    try:
        yield
    finally:
        for module in blocks:
            module.set_reshard_after_forward(True, recurse=False)
        for module in groups:
            module.reshard()


def local_tensor(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly-DTensor value (a replicated DTensor's full value)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return value
    return value.full_tensor() if isinstance(value, DTensor) else value


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (CPU and every CUDA device) with `seed`."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
