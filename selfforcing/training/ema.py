"""Exponential moving average of the generator's weights (kept in float32, sharded like the model)."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class EMA:
    """shadow <- decay * shadow + (1 - decay) * param after every generator update from ``start_step`` on;
    the shadow is created from the current weights at ``start_step`` (as the reference does)."""

    def __init__(self, model: torch.nn.Module, decay: float, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.model, self.decay, self.start_step = model, decay, start_step
        self.shadow: dict[str, torch.Tensor] | None = None

    @property
    def initialized(self) -> bool:
        return self.shadow is not None

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step < self.start_step:
            return
        params = dict(self.model.named_parameters())
        if self.shadow is None:
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
            return
        for n, p in params.items():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    # local (possibly sharded) state, for torch.distributed.checkpoint
    def state_dict(self) -> dict:
        return {"shadow": self.shadow if self.shadow is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = dict(state["shadow"]) or None

    def full_state_dict(self) -> dict:
        """Unsharded shadow on CPU (a collective under FSDP2)."""
        if self.shadow is None:
            return {"shadow": {}}
        return {"shadow": {n: (t.full_tensor() if isinstance(t, DTensor) else t).cpu() for n, t in self.shadow.items()}}

    def load_full_state_dict(self, state: dict) -> None:
        full = state.get("shadow") or {}
        if not full:
            self.shadow = None
            return
        params = dict(self.model.named_parameters())
        self.shadow = {}
        for n, p in params.items():
            t = full[n].float()
            self.shadow[n] = (distribute_tensor(t.to(p.device), p.device_mesh, p.placements)
                              if isinstance(p, DTensor) else t.to(p.device))
