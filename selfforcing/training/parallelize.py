"""Parallelism applied to models from outside (as torchtitan does): the model code knows nothing of it.

* ``fsdp2``: ``fully_shard`` on every transformer block, then on the root (parameters become DTensors sharded
  over the ranks; bf16 parameters with float32 gradient reduction on CUDA).
* ``ddp``: data parallelism by averaging gradients over the ranks after backward
  (:func:`all_reduce_gradients`). torch's DistributedDataParallel wrapper expects one forward per backward,
  while a Self Forcing rollout runs one differentiable forward per chunk; averaging the gradients once after
  backward is the same update and works for every method.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import is_distributed, world_size


def apply_fsdp2(model: torch.nn.Module, device: torch.device, bf16: bool = False) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    blocks = getattr(model, "blocks", None)
    if blocks is None and hasattr(model, "backbone"):  # a GAN critic: shard its backbone's blocks
        blocks = model.backbone.blocks
    for block in blocks or []:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def all_reduce_gradients(model: torch.nn.Module) -> None:
    """grad <- mean over ranks of grad, for every parameter (one flat buffer per dtype)."""
    if not is_distributed():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (data-parallel mode)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)
