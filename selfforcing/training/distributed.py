"""Process-group helpers. Everything works unchanged in a single process (no torchrun)."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> torch.device:
    """Join the torchrun process group if launched by torchrun (NCCL on CUDA, gloo on CPU); pick the device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not is_distributed():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            # 2 cores shared by the ranks: one thread each avoids oversubscription
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s value of ``obj`` on every rank (shared randomness: exit steps, rollout lengths)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (for logging)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return {k: float(v) / world_size() for k, v in zip(keys, t.tolist())}


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (each rank adds its rank, so data differs while models start equal)."""
    s = seed + rank()
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
